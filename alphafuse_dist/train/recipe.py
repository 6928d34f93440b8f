"""The training recipe: what every worker of a training run executes, one method per phase.

    recipe = TrainRecipe(cfg, inputs, report=report, log=print)
    recipe.setup(resume_from=None)   # device, model (sharded or DDP), optimiser, data, resumed state
    recipe.train()                   # epochs: train_epoch -> validate -> early stopping -> checkpoint
    result = recipe.finalize(folder) # best model, cold items filled, written to folder

:func:`train_model` runs the three. It runs the same way under Ray Train (``TorchTrainer``
workers), torchrun, or a single process without any process group (plain torch). Each worker
streams train.parquet and keeps every ``world``-th window of each step of the epoch's shuffled
order (:class:`alphafuse_dist.train.batches.EpochBatches`); negatives (and bert4rec's masks)
are drawn from a generator seeded by (seed, epoch, step) for the whole batch, so every sequence
gets the same draws whatever the number of workers; the loss is normalised by the global number
of positions, so the gradients equal those of one process on the whole batch.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..config import RunConfig
from ..data.sequences import eval_inputs, item_counts
from ..errors import ConfigError
from ..evaluate.sharded import read_histories, sharded_metrics
from ..model.backbones import draw_cloze_mask
from ..model.dreamrec import draw_diffusion_noise
from ..model.losses import expected_count_log_q
from ..model.recommender import build_model
from ..runtime.dist import all_reduce_sum, rank_world
from ..runtime.seeding import deterministic_torch, seed_torch, seeded_generator
from .batches import EpochBatches, prefetch
from .checkpoint import load_checkpoint, save_checkpoint, save_model
from .inputs import TrainInputs, load_item_inputs
from .optim import build_optimizer
from .sampling import draw_negatives, sampling_probs

# report(row, write_checkpoint): called after every epoch; write_checkpoint(folder) is None or
# writes this worker's part of a checkpoint (a collective)
Report = Callable[[dict, Callable | None], None]


@dataclass
class TrainResult:
    best_epoch: int
    best_metric: float
    history: list[dict] = field(default_factory=list)
    item_table: torch.Tensor | None = None  # [N, d] fused, at the best epoch
    encoder_state: dict | None = None


def _device(setting: str, world: int) -> torch.device:
    """``train.device`` resolved; with several CUDA workers, this worker's GPU."""
    cuda = setting == "cuda" or (setting == "auto" and torch.cuda.is_available())
    if not cuda:
        return torch.device("cpu")
    if world == 1:
        return torch.device("cuda")
    from ray.train.torch import get_device  # several workers run under Ray Train: its GPU for this worker

    device = get_device()
    torch.cuda.set_device(device)
    return device


class TrainRecipe:
    """One training run on this worker; every worker of the run builds it with the same arguments.

    Args:
        report: see ``Report``; checkpoints are offered every ``train.checkpoint_every`` epochs.
        log: progress lines (printed by rank 0 only).
        progress: a bar's ``update(n, desc=, total=, **postfix)`` (``runtime.progress``), moved
            by rank 0 one step at a time.
    """

    def __init__(self, cfg: RunConfig, inputs: TrainInputs, *, report: Report | None = None,
                 log: Callable[[str], None] = print, progress: Callable[..., None] | None = None):
        self.cfg, self.inputs, self.report = cfg, inputs, report
        self.rank, self.world = rank_world()
        self.log = log if self.rank == 0 else (lambda line: None)
        self.progress = progress if progress is not None and self.rank == 0 else (lambda n=0, **fields: None)

    # ------------------------------------------------------------------ setup
    def setup(self, resume_from: str | None = None) -> None:
        """Build the model (sharded with TorchRec, or DDP-wrapped), the optimiser and the data;
        with ``resume_from`` (a checkpoint folder) continue after its epoch."""
        cfg, t = self.cfg, self.cfg.train
        self.device = _device(t.device, self.world)
        self.num_items = self.pad = self.inputs.num_items
        self.item_inputs = load_item_inputs(cfg.method, self.inputs)
        ii = self.item_inputs
        self.net = build_model(cfg, self.num_items, ii.semantic, self.device, language=ii.language, basis=ii.basis)
        if t.warm_start:
            self._warm_start()
        self.model = self._distribute(self.net)
        self.optimizer = build_optimizer(cfg, self.model, self.net)

        prep = Path(self.inputs.prepare_dir)
        self.batches = EpochBatches(prep / "train.parquet", max_len=cfg.model.max_len, pad_id=self.pad,
                                    batch_size=t.batch_size, chunk=t.shuffle_windows, seed=cfg.seed,
                                    rank=self.rank, world=self.world)
        _, self.val_hist, self.val_tgt = eval_inputs(prep / "valid.parquet", cfg.model.max_len, self.pad)
        # model selection ranks as the evaluation's lead protocol does: filtered with eval.exclude_history
        self.val_exclude = read_histories(prep / "valid.parquet") if cfg.eval.exclude_history else None
        self.probs = sampling_probs(cfg, prep / "train.parquet", self.num_items)
        self.log_q = None
        if t.logq:
            q = self.probs if self.probs is not None else torch.full((self.num_items,), 1.0 / self.num_items,
                                                                     dtype=torch.float64)
            self.log_q = expected_count_log_q(q, t.num_negatives).to(self.device)
        self.cloze = cfg.model.backbone == "bert4rec"
        self.diffusion = cfg.model.backbone == "dreamrec"
        self.steps, windows = self.batches.steps, self.batches.num_windows
        if self.steps == 0:
            raise ConfigError(f"train.batch_size={t.batch_size}: larger than the {windows} training windows")
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda"
                         else torch.autocast("cpu", enabled=False))
        self.log(f"[train] {cfg.method}: {self.num_items} items, {windows} windows of {cfg.model.max_len}, "
                 f"{self.world} workers x {t.batch_size // self.world} sequences, {self.steps} steps/epoch, "
                 f"backend {t.backend}, device {self.device}")

        self.history: list[dict] = []
        self.best = TrainResult(best_epoch=-1, best_metric=-math.inf)
        self.bad_epochs, self.first_epoch = 0, 0
        if resume_from is not None:
            progress, self.history = load_checkpoint(Path(resume_from), net=self.net, optimizer=self.optimizer,
                                                     best=self.best)
            self.first_epoch, self.bad_epochs = int(progress["epochs_done"]), int(progress["bad_epochs"])
            self.log(f"[train] resumed from checkpoint {resume_from} after epoch {self.first_epoch} "
                     f"(best validation NDCG@10 {self.best.best_metric:.4f} at epoch {self.best.best_epoch})")

    def _warm_start(self) -> None:
        from .warm_start import apply_warm_start

        facts = apply_warm_start(self.cfg, self.net.items, self.net.encoder, semantic_path=self.inputs.semantic_path)
        self.log(f"[train] warm start from {facts['previous']}: {facts['previous_items']} of {facts['items']} items "
                 f"keep their ID rows ({facts['ids']}), the rest start fresh; encoder weights loaded")

    def _distribute(self, net: torch.nn.Module) -> torch.nn.Module:
        """The module that is trained: DMP (torchrec: tables sharded, dense part in DDP with several
        workers), DDP (torch with several workers) or ``net`` itself."""
        t = self.cfg.train
        if t.backend == "torchrec":
            if self.world == 1 and not torch.distributed.is_initialized():
                raise RuntimeError("the torchrec backend needs a process group (Ray Train or torchrun)")
            from .sharding import shard_model

            return shard_model(net, sharding=t.sharding, id_optimizer_name=t.id_optimizer, id_lr=t.id_lr,
                               device=self.device, log=self.log, batch_size=max(1, t.batch_size // self.world))
        if self.world > 1:
            ids = [self.device] if self.device.type == "cuda" else None
            return torch.nn.parallel.DistributedDataParallel(net, device_ids=ids)
        return net

    # ------------------------------------------------------------------ the epoch loop
    @property
    def stopped(self) -> bool:
        """Early stopping: ``train.patience`` validations in a row without a gain."""
        return self.bad_epochs >= self.cfg.train.patience

    def train(self) -> None:
        """Epochs from the first not yet done: train, validate every ``train.eval_every`` epochs and
        at the last, stop early, offer a checkpoint every ``train.checkpoint_every`` epochs."""
        t = self.cfg.train
        self.progress(0, total=(t.epochs - self.first_epoch) * self.steps)
        trained = 0
        for epoch in range(self.first_epoch, t.epochs):
            if self.stopped:
                break  # resumed after the early stop had already been decided
            self.progress(0, desc=f"[train] epoch {epoch + 1}/{t.epochs}")
            row = self.train_epoch(epoch)
            trained += 1
            improved = False
            # no validation part (data.split=all): train.epochs epochs, the last model is kept
            if len(self.val_tgt) and ((epoch + 1) % t.eval_every == 0 or epoch + 1 == t.epochs):
                val = self.validate()
                row |= {f"val_{k}": v for k, v in val.items() if k != "users"}
                improved = self._track_best(epoch, val)
            self.history.append(row)
            self.log(f"[train] epoch {epoch + 1}: loss {row['loss']:.4f}, {row['seq_per_s']:,.0f} seq/s"
                     + (f", val NDCG@10 {row.get('val_NDCG@10', float('nan')):.4f} "
                        f"HR@10 {row.get('val_HR@10', float('nan')):.4f}" if "val_NDCG@10" in row else "")
                     + (" (best)" if improved else ""))
            if "val_NDCG@10" in row:
                self.progress(0, **{"val NDCG@10": row["val_NDCG@10"]})
            if self.report is not None:
                self.report(row, self.checkpoint(epoch))
            if self.stopped:
                self.log(f"[train] early stop: no validation gain for {t.patience} evaluations "
                         f"(best epoch {self.best.best_epoch})")
                break
        self.progress(0, total=trained * self.steps)  # early stopping: the steps that ran are all

    def train_epoch(self, epoch: int) -> dict:
        """One pass over the training windows; returns the epoch's row (mean loss, time, speed)."""
        cfg, t = self.cfg, self.cfg.train
        # dropout's generator reseeded per (seed, epoch, rank): a resumed epoch draws what it drew before
        seed_torch(cfg.seed, epoch, rank=self.rank)
        t0 = time.time()
        # the losses stay on the device; reading them (log lines, the epoch's end) waits for the GPU
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.net.train()
        with contextlib.closing(prefetch(self.batches.epoch(epoch))) as batches:  # its thread ends with the epoch
            for step, (inputs, targets) in enumerate(batches):
                loss_sum += self.train_step(epoch, step, inputs, targets)
                self.progress(1)
                if t.log_every and (step + 1) % t.log_every == 0:
                    mean = loss_sum.item() / (step + 1)
                    rate = (step + 1) * t.batch_size / (time.time() - t0)
                    eta = (self.steps - step - 1) * t.batch_size / rate
                    self.progress(0, loss=mean)
                    self.log(f"[train] epoch {epoch + 1}/{t.epochs} step {step + 1}/{self.steps} "
                             f"loss {mean:.4f} {rate:,.0f} seq/s ETA {eta:.0f}s")
        loss = loss_sum.item() / self.steps
        self.progress(0, loss=loss)
        seconds = time.time() - t0
        return {"epoch": epoch + 1, "loss": loss, "seconds": round(seconds, 2),
                "seq_per_s": round(self.steps * t.batch_size / seconds, 1)}

    def _to_device(self, x) -> torch.Tensor:
        """A host array on the device; on CUDA through pinned memory, so the copy does not wait
        for the kernels already queued."""
        x = torch.as_tensor(x)
        if self.device.type != "cuda":
            return x
        # contiguous first: a strided pinned tensor would be copied again, unpinned, by .to()
        return x.contiguous().pin_memory().to(self.device, non_blocking=True)

    def train_step(self, epoch: int, step: int, inputs, targets) -> torch.Tensor:
        """One optimiser step on this worker's training windows (``inputs``, ``targets`` [B_local, L]);
        returns the step's loss (mean over the positions of all workers) as a float64 scalar tensor
        on the device (``float()`` reads it, which waits for the step to finish)."""
        cfg, t = self.cfg, self.cfg.train
        seqs, tgts = self._to_device(inputs), self._to_device(targets)
        g = seeded_generator(cfg.seed, epoch, step)
        negs = self._to_device(draw_negatives(cfg, g, self.num_items, self.probs, self.rank, self.world))
        # bert4rec: the masked positions of the window's last L items (tgts), drawn after the negatives
        masked = (draw_cloze_mask(g, tgts != self.pad, t.batch_size, self.rank, self.world, cfg.model.mask_prob)
                  if self.cloze else None)
        m = cfg.model
        # dreamrec: each position's timestep, noise and guidance dropout, drawn after the negatives
        noise = (tuple(self._to_device(x) for x in draw_diffusion_noise(
            g, t.batch_size, seqs.shape[1], m.dim, self.rank, self.world, m.dreamrec_timesteps, m.dreamrec_p_uncond))
            if self.diffusion else None)
        with self.autocast:
            # through the DMP/DDP wrapper (its forward is the loss) so dense gradients are synchronised
            lsum, lcnt = self.model(seqs, tgts, negs, t.loss_positions == "last", masked, self.log_q, noise)
        # collectives on the device (NCCL has no CPU tensors); the recipe reads nothing back here
        total = all_reduce_sum(lcnt.detach().to(torch.float64, copy=True)).clamp_min(1.0)
        # normalised by the GLOBAL count; DDP averages gradients over workers, hence * world
        loss = lsum * (self.world / total).to(lsum.dtype)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return all_reduce_sum(lsum.detach().to(torch.float64, copy=True)) / total

    # ------------------------------------------------------------------ validation, checkpoints
    def validate(self) -> dict:
        """Full-ranking metrics of the validation users (``evaluate.sharded.sharded_metrics``),
        their histories removed from the ranking with ``eval.exclude_history``."""
        e = self.cfg.eval
        return sharded_metrics(self.net, self.val_hist, self.val_tgt, e.ks, self.device, e.item_chunk, e.user_batch,
                               exclude=self.val_exclude)

    def _track_best(self, epoch: int, val: dict) -> bool:
        """Keep the model of the best validation NDCG@10 (NDCG at the first k without 10); count
        validations without a gain. Returns whether this one is the best so far."""
        metric = val["NDCG@10"] if "NDCG@10" in val else val[f"NDCG@{self.cfg.eval.ks[0]}"]
        if not metric > self.best.best_metric:
            self.bad_epochs += 1
            return False
        self.bad_epochs = 0
        self.best.best_metric, self.best.best_epoch = metric, epoch + 1
        self._keep_current_model()
        return True

    def _keep_current_model(self) -> None:
        """The live item table and encoder weights into ``best`` (a collective with torchrec)."""
        self.best.item_table = self.net.items.full_table().cpu().clone()
        self.best.encoder_state = {k: v.detach().cpu().clone() for k, v in self.net.encoder.state_dict().items()}

    def checkpoint(self, epoch: int) -> Callable[[str], None] | None:
        """After ``epoch``: None, or every ``train.checkpoint_every`` epochs a function
        ``write(folder)`` that writes this worker's part of a checkpoint (a collective)."""
        if (epoch + 1) % self.cfg.train.checkpoint_every:
            return None
        progress = {"epochs_done": epoch + 1, "best_metric": self.best.best_metric,
                    "best_epoch": self.best.best_epoch, "bad_epochs": self.bad_epochs}
        history = list(self.history)

        def write(folder: str) -> None:
            save_checkpoint(Path(folder), net=self.net, optimizer=self.optimizer, progress=progress,
                            best=self.best, history=history)
        return write

    # ------------------------------------------------------------------ the result
    def finalize(self, folder: Path | None = None) -> TrainResult:
        """The best model (the current one if no epoch was validated: a warm start applied as is, or
        a run without a validation part), cold
        items filled (``train.cold_items=neighbours``), written to ``folder`` when given (call it on
        every worker: with torchrec, reading the live table is a collective)."""
        cfg, t = self.cfg, self.cfg.train
        best = self.best
        if best.item_table is None:
            best.best_epoch = len(self.history)
            self._keep_current_model()
        if t.cold_items == "neighbours":
            from .cold_items import fill_cold_items

            counts = torch.from_numpy(item_counts(Path(self.inputs.prepare_dir) / "train.parquet", self.num_items))
            best.item_table, n_cold = fill_cold_items(best.item_table, self.item_inputs.semantic, counts,
                                                      id_dim=self.net.items.id_dim, k=t.cold_neighbours,
                                                      injection=cfg.model.injection)
            self.log(f"[train] {n_cold} items without training interactions: ID part from their "
                     f"{t.cold_neighbours} nearest trained items (train.cold_items=neighbours)")
        best.history = self.history
        if folder is not None:
            save_model(Path(folder), best)
        return best


def train_model(cfg: RunConfig, inputs: TrainInputs, *, report: Report | None = None, resume_from: str | None = None,
                log: Callable[[str], None] = print, folder: Path | None = None,
                progress: Callable[..., None] | None = None) -> TrainResult:
    """Set up, train and finalize a :class:`TrainRecipe` (every worker of a run calls this with the
    same arguments; ``folder``: where to write the model, None to only return it)."""
    deterministic_torch()
    recipe = TrainRecipe(cfg, inputs, report=report, log=log, progress=progress)
    recipe.setup(resume_from)
    recipe.train()
    return recipe.finalize(folder)
