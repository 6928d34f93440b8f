"""DreamRec (Yang et al., NeurIPS 2023, "Generate What You Prefer"): a DDPM over item vectors,
guided by the history, behind ``model.backbone=dreamrec``.

    forward:   x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,   eps ~ N(0, I),  t ~ U{0..T-1}
    denoiser:  f(x_t, c, t) -> x_0 estimate,  MLP over [x_t, c, step(t)]  (DreamRec's x_0 form)
    loss:      ||x_0 - f(x_t, c, t)||^2 / d  per position  (c = the learned "none" vector with
               probability p_uncond: classifier-free guidance training)
    sampling:  x_0 estimate (1 + w) f(x_t, c, t) - w f(x_t, none, t), DDIM steps (eta = 0) over
               ``sample_steps`` of the T timesteps, from one fixed noise vector x_T

``x_0`` is the target item's vector (with gradient: the item module learns through the diffusion
loss, as in DreamRec), at unit RMS when similarity is cosine. ``c`` is the history encoder's
(the SASRec encoder's) hidden state at the position. The generated x_0 is the user state: every
item is ranked by its similarity (cosine or dot) to it, as for the other backbones.

x_T is the same seeded draw for every user, so a user's generated vector is a deterministic
function of the history (no dependence on batch, chunking or workers); each user's x_T is still
a standard normal draw.

Shapes: ``B`` batch, ``L`` history length, ``d`` width, ``M`` trained positions, ``T`` timesteps.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .sasrec import SASRecEncoder

# the seed of x_T, the noise every generated vector starts from
SAMPLE_NOISE_SEED = 0


def beta_schedule(kind: str, timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """beta_t float64 [T].

    - ``linear``: evenly spaced from ``beta_start`` to ``beta_end`` (DDPM; DreamRec's default).
    - ``cosine``: ``abar(t) = cos^2(((t / T) + s) / (1 + s) * pi / 2)``, s = 0.008, and
      ``beta_t = 1 - abar(t + 1) / abar(t)`` clipped to at most 0.999 (Nichol & Dhariwal 2021);
      ``beta_start`` / ``beta_end`` are not used.
    """
    if kind == "linear":
        return torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)
    if kind == "cosine":
        s = 0.008
        steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
        abar = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        return (1 - abar[1:] / abar[:-1]).clamp(max=0.999)
    raise ValueError(f"beta schedule {kind!r}: expected linear or cosine")


def step_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding [M, dim] of timesteps t [M] (DDPM's; dim even)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000) * torch.arange(half, device=t.device, dtype=torch.float32) / max(half - 1, 1))
    angles = t.float().unsqueeze(1) * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def draw_diffusion_noise(generator: torch.Generator, global_batch: int, length: int, dim: int, rank: int,
                         world: int, timesteps: int, p_uncond: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(t [B_local, L] long, eps [B_local, L, d], uncond [B_local, L] bool) for this worker's rows.

    Drawn for all ``global_batch`` rows, then rows ``rank::world`` are kept (the rows the training
    recipe gives this worker), so a sequence's draws do not depend on how the batch is split.
    """
    t = torch.randint(0, timesteps, (global_batch, length), generator=generator)
    eps = torch.randn(global_batch, length, dim, generator=generator)
    uncond = torch.rand(global_batch, length, generator=generator) < p_uncond
    return t[rank::world], eps[rank::world], uncond[rank::world]


class DreamRecEncoder(nn.Module):
    """History encoder (SASRec) + conditional denoiser: ``forward`` gives the history's hidden
    states [B, L, d] (the guidance), ``user_state`` the generated next-item vector [B, d].

    Example::

        enc = DreamRecEncoder(dim=8, max_len=5, timesteps=50, sample_steps=5)
        enc.user_state(torch.randn(2, 5, 8), torch.ones(2, 5, dtype=torch.bool)).shape  # [2, 8]
    """

    def __init__(self, dim: int, max_len: int, num_blocks: int = 1, num_heads: int = 1, dropout: float = 0.1,
                 normalize_inputs: bool = True, *, timesteps: int = 2000, schedule: str = "linear",
                 beta_start: float = 1e-4, beta_end: float = 0.02, guidance: float = 2.0, p_uncond: float = 0.1,
                 sample_steps: int = 20):
        super().__init__()
        self.dim, self.normalize_inputs = dim, normalize_inputs
        self.timesteps, self.guidance, self.p_uncond = timesteps, guidance, p_uncond
        self.history = SASRecEncoder(dim, max_len, num_blocks, num_heads, dropout, normalize_inputs)
        self.none = nn.Parameter(torch.randn(dim))  # the unconditional guidance vector (DreamRec: N(0, 1))
        self.step = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.denoiser = nn.Sequential(nn.Linear(3 * dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        abar = torch.cumprod(1 - beta_schedule(schedule, timesteps, beta_start, beta_end), 0)
        self.register_buffer("abar", abar.float(), persistent=False)
        # DDIM's timesteps, descending from T-1 to 0
        steps = torch.linspace(timesteps - 1, 0, min(sample_steps, timesteps), dtype=torch.float64).round().long()
        self.register_buffer("sample_t", torch.unique_consecutive(steps), persistent=False)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """The history encoder's hidden states [B, L, d] (position l guides the item after it)."""
        return self.history(x, valid)

    def target(self, x0: torch.Tensor) -> torch.Tensor:
        """Item vectors [M, d] as the diffusion's x_0: at unit RMS when inputs are (cosine)."""
        return F.normalize(x0, dim=-1) * self.dim ** 0.5 if self.normalize_inputs else x0

    def noised(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps  [M, d]."""
        a = self.abar[t].unsqueeze(1).to(x0.dtype)
        return a.sqrt() * x0 + (1 - a).sqrt() * eps

    def denoise(self, x_t: torch.Tensor, c: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The x_0 estimate f(x_t, c, t) [M, d]."""
        return self.denoiser(torch.cat([x_t, c, self.step(step_embedding(t, self.dim).to(x_t.dtype))], dim=1))

    def diffusion_loss(self, c: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
                       uncond: torch.Tensor) -> torch.Tensor:
        """Per-position loss [M]: ``mean_d (x_0 - f(x_t, c', t))^2``, c' = none where ``uncond``.

        Args:
            c: [M, d] guidance (hidden states); x0: [M, d] target item vectors (``target`` form);
            t: [M] timesteps; eps: [M, d] noise; uncond: [M] bool, positions trained unconditionally.
        """
        c = torch.where(uncond.unsqueeze(1), self.none.to(c.dtype), c)
        return ((x0 - self.denoise(self.noised(x0, t, eps), c, t)) ** 2).mean(1)

    def generate(self, c: torch.Tensor) -> torch.Tensor:
        """Generated x_0 [B, d] for guidance c [B, d]: DDIM (eta = 0) with classifier-free guidance."""
        B = c.shape[0]
        noise = torch.randn(self.dim, generator=torch.Generator().manual_seed(SAMPLE_NOISE_SEED))
        x = noise.to(c.device, c.dtype).expand(B, -1)
        none = self.none.to(c.dtype).expand(B, -1)
        x0 = x
        for i, step in enumerate(self.sample_t.tolist()):
            t = torch.full((B,), step, dtype=torch.long, device=c.device)
            x0 = (1 + self.guidance) * self.denoise(x, c, t) - self.guidance * self.denoise(x, none, t)
            if i + 1 == len(self.sample_t):
                break
            a, a_prev = self.abar[step].to(c.dtype), self.abar[self.sample_t[i + 1]].to(c.dtype)
            eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        return x0

    def user_state(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """[B, d]: the next-item vector generated under the guidance of the last position's state."""
        return self.generate(self.history(x, valid)[:, -1])
