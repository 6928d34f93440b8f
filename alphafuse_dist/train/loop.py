"""The per-worker training loop: one function, readable top to bottom.

It runs the same way under Ray Train (``TorchTrainer`` workers), torchrun, or a single process
without any process group (plain torch). Each worker takes every ``world``-th window of the
epoch's shuffled order; negatives (and bert4rec's masks) are drawn from a generator seeded by
(seed, epoch, step) for the whole batch, so every sequence gets the same draws whatever the number
of workers; the loss is normalised by the global number of positions, so the
gradients equal those of one process on the whole batch.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from ..config import METHOD_INPUTS, RunConfig
from ..evaluate.metrics import metrics_from_ranks, sharded_target_ranks
from ..model.methods import build_item_module
from ..model.backbones import build_encoder, draw_cloze_mask
from ..model.losses import expected_count_log_q
from ..model.sasrec import SequentialRecommender
from .data import eval_inputs, item_counts, read_embeddings, training_windows


@dataclass
class TrainInputs:
    """Where a training run reads from (prepare, embed and decompose stage folders); what each
    method needs is ``config.METHOD_INPUTS``."""

    prepare_dir: str
    semantic_path: str | None  # decompose/semantic.safetensors (methods needing "semantic")
    num_items: int
    language_path: str | None = None  # the embed stage folder, part-*.parquet (methods needing "language")
    basis_path: str | None = None  # the decompose stage folder, basis.safetensors/.json (whitenrec)


@dataclass
class TrainResult:
    best_epoch: int
    best_metric: float
    history: list[dict] = field(default_factory=list)
    item_table: torch.Tensor | None = None  # [N, d] fused, at the best epoch
    encoder_state: dict | None = None


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if _world()[1] > 1:
        dist.all_reduce(t)
    return t


def split_parameters(model: torch.nn.Module, items: torch.nn.Module) -> tuple[list, list]:
    """(dense, ID) trainable parameters of ``model`` (the model itself, or its DDP / DMP wrapper).

    ID: the item module's ID tables (``items.id_modules``); dense: everything else that needs a
    gradient (encoder, adapters). Frozen tables (``items.frozen_modules``) are in neither. Names
    are matched as ``items.<module>.`` so that the wrappers' name prefixes do not matter.
    """
    def under(name: str, modules) -> bool:
        return any(f".items.{m}." in f".{name}" for m in modules)

    dense, ids = [], []
    for name, p in model.named_parameters():
        if under(name, items.id_modules):
            ids.append(p)
        elif p.requires_grad and not under(name, items.frozen_modules):
            dense.append(p)
    return dense, ids


def build_model(cfg: RunConfig, num_items: int, semantic: torch.Tensor | None, device: torch.device,
                language: torch.Tensor | None = None, basis=None) -> SequentialRecommender:
    """The unsharded model, identically initialised on every worker (seeded).

    Args:
        semantic: float32 [N, d] decompose table; language: float32 [N, d_l] embed vectors in
            item_idx order; basis: the decompose stage's NullSpaceBasis. Each only where
            ``config.METHOD_INPUTS[cfg.method]`` names it.
    """
    m, t = cfg.model, cfg.train
    gen = torch.Generator().manual_seed(cfg.seed)
    items = build_item_module(cfg, num_items, semantic, language, device, gen, basis=basis)
    torch.manual_seed(cfg.seed)
    encoder = build_encoder(m).to(device)
    return SequentialRecommender(items, encoder, m.similarity, m.temperature, loss=t.loss, ce_chunk=t.ce_chunk)


@torch.no_grad()
def validate(net: SequentialRecommender, hist: np.ndarray, targets: np.ndarray, ks, device, item_chunk: int,
             user_batch: int = 1024) -> dict:
    """Full-ranking metrics of all validation users, over row shards of the item table.

    Each worker builds the fused rows of its own item range only (``N / world`` rows, never the
    whole table) and the user states of its share of users; the states are all-gathered, every
    worker counts, for every user, the items of its range that rank ahead of the target
    (``sharded_target_ranks``), and the counts are summed. The ranks equal single-process
    ``target_ranks`` on the whole table exactly.

    Lookups through the item module are collectives with TorchRec, so every worker makes the same
    number of them (a worker with less work looks up an empty id list).
    """
    rank, world = _world()
    net.eval()
    items = net.items
    n_items, num_users = items.num_items, len(targets)
    lo, hi = n_items * rank // world, n_items * (rank + 1) // world
    widest = -(-n_items // world)
    parts = []
    for c in range(-(-widest // item_chunk)):
        s = min(lo + c * item_chunk, hi)
        parts.append(items(torch.arange(s, min(s + item_chunk, hi), device=device)))
    local_rows = net.normalize(torch.cat(parts)) if parts else torch.empty(0, items.dim, device=device)

    # user states: this worker's share (users rank, rank + world, ...), then gathered in user order
    mine = np.arange(rank, num_users, world)
    share = -(-num_users // world)
    states = torch.zeros(share, items.dim, device=device)
    for b in range(-(-share // user_batch)):
        sel = mine[b * user_batch:(b + 1) * user_batch]
        if len(sel):
            h = torch.as_tensor(hist[sel], device=device)
            states[b * user_batch: b * user_batch + len(sel)] = net.normalize(net.user_states(h)).float()
        else:
            items(torch.empty(0, dtype=torch.long, device=device))  # the collective lookup of an empty batch
    if world > 1:
        gathered = [torch.empty_like(states) for _ in range(world)]
        dist.all_gather(gathered, states)
        states = torch.stack(gathered, dim=1).reshape(-1, items.dim)[:num_users]  # row r*world + w = user
    y = torch.as_tensor(targets, device=device)
    ranks = []
    for s in range(0, num_users, user_batch):
        t = y[s:s + user_batch]
        ranks.append(sharded_target_ranks(states[s:s + user_batch], local_rows, lo, t,
                                          net.normalize(items(t)).float(), item_chunk=item_chunk))
    ranks = torch.cat(ranks) if ranks else torch.empty(0, dtype=torch.long)
    net.train()
    out = metrics_from_ranks(ranks.cpu(), ks)
    return out | {"users": int(out.pop("users"))}


def sampling_probs(cfg: RunConfig, train_parquet: Path, num_items: int) -> torch.Tensor | None:
    """Negative-sampling distribution q [N] (float64): None for uniform; for popularity
    ``count_j ** alpha / sum`` over the training counts (items never trained on are never drawn)."""
    t = cfg.train
    if t.negative_sampler == "uniform":
        return None
    weights = torch.from_numpy(item_counts(train_parquet, num_items)).double()
    weights = torch.where(weights > 0, weights ** t.popularity_alpha, weights)
    return weights / weights.sum()


def draw_negatives(cfg: RunConfig, generator: torch.Generator, num_items: int, probs: torch.Tensor | None,
                   rank: int, world: int) -> torch.Tensor:
    """This worker's negatives of one step: [K] shared by the step, or [B_local, K] per sequence
    (drawn [batch_size, K] for the GLOBAL batch, then rows ``rank::world``, the rows the loop gives
    this worker), or an empty [0] for full_ce. Uniform or from ``probs`` (with replacement)."""
    t = cfg.train
    if t.loss == "full_ce":
        return torch.empty(0, dtype=torch.long)
    shape = (t.num_negatives,) if t.negatives == "shared" else (t.batch_size, t.num_negatives)
    count = math.prod(shape)
    if probs is None:
        ids = torch.randint(0, num_items, (count,), generator=generator)
    else:
        ids = torch.multinomial(probs, count, replacement=True, generator=generator)
    ids = ids.view(shape)
    return ids if t.negatives == "shared" else ids[rank::world]


def train_worker(cfg: RunConfig, inputs: TrainInputs, *, report: Callable[[dict, Callable | None], None] | None = None,
                 resume_from: str | None = None, log: Callable[[str], None] = print) -> TrainResult:
    """Train one model; every worker of a run calls this with the same arguments.

    Args:
        report: called by every worker after each epoch with the epoch's row and, every
            ``train.checkpoint_every`` epochs, a function ``write(folder)`` that writes this
            worker's part of a checkpoint (a collective; Ray Train reports the folder).
        resume_from: a checkpoint folder written that way: training continues after its epoch.
    """
    rank, world = _world()
    t = cfg.train
    device = torch.device("cuda" if t.device == "cuda" or (t.device == "auto" and torch.cuda.is_available()) else "cpu")
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    N = inputs.num_items
    pad = N
    needs = METHOD_INPUTS[cfg.method]
    semantic = load_file(inputs.semantic_path)["semantic"] if "semantic" in needs else None
    language = basis = None
    if "language" in needs:
        language = torch.from_numpy(read_embeddings(Path(inputs.language_path), N))
    if "basis" in needs:
        from ..decompose.basis import NullSpaceBasis

        basis = NullSpaceBasis.load(Path(inputs.basis_path))
    model = build_model(cfg, N, semantic, device, language=language, basis=basis)
    if t.warm_start:
        from .warm_start import apply_warm_start

        facts = apply_warm_start(cfg, model.items, model.encoder, semantic_path=inputs.semantic_path)
        if rank == 0:
            log(f"[train] warm start from {facts['previous']}: {facts['previous_items']} of {facts['items']} items "
                f"keep their ID rows ({facts['ids']}), the rest start fresh; encoder weights loaded")
    net = model
    if t.backend == "torchrec":
        if world == 1 and not dist.is_initialized():
            raise RuntimeError("the torchrec backend needs a process group (Ray Train or torchrun)")
        from .sharding import shard_model

        model = shard_model(model, sharding=t.sharding, id_optimizer_name=t.id_optimizer, id_lr=t.id_lr,
                            device=device, log=log, batch_size=max(1, t.batch_size // world))
        dense_params, _ = split_parameters(model, net.items)  # ID tables: fused optimiser, in backward
        id_opt = None
    else:
        from .sharding import id_optimizer

        dense_params, id_params = split_parameters(net, net.items)
        id_cls, id_kwargs = id_optimizer(t.id_optimizer, t.id_lr, t.weight_decay)
        id_opt = id_cls(id_params, **id_kwargs) if id_params else None
        if world > 1:
            model = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None)
    dense_opt = torch.optim.Adam(dense_params, lr=t.lr, weight_decay=t.weight_decay)

    prep = Path(inputs.prepare_dir)
    win_in, win_tgt = training_windows(prep / "train.parquet", cfg.model.max_len, pad)
    _, val_hist, val_tgt = eval_inputs(prep / "valid.parquet", cfg.model.max_len, pad)
    probs = sampling_probs(cfg, prep / "train.parquet", N)
    log_q = None
    if t.logq:
        q = probs if probs is not None else torch.full((N,), 1.0 / N, dtype=torch.float64)
        log_q = expected_count_log_q(q, t.num_negatives).to(device)
    cloze = cfg.model.backbone == "bert4rec"
    per_worker = t.batch_size // world
    steps = len(win_in) // t.batch_size
    if steps == 0:
        from ..errors import ConfigError

        raise ConfigError(f"train.batch_size={t.batch_size}: larger than the {len(win_in)} training windows")
    if rank == 0:
        log(f"[train] {cfg.method}: {N} items, {len(win_in)} windows of {cfg.model.max_len}, {world} workers "
            f"x {per_worker} sequences, {steps} steps/epoch, backend {t.backend}, device {device}")
    history: list[dict] = []
    best = TrainResult(best_epoch=-1, best_metric=-math.inf)
    bad_epochs, first_epoch = 0, 0
    if resume_from is not None:
        from .checkpoint import load_checkpoint

        progress, history = load_checkpoint(Path(resume_from), model=model, net=net, dense_opt=dense_opt,
                                            id_opt=id_opt, best=best)
        first_epoch, bad_epochs = int(progress["epochs_done"]), int(progress["bad_epochs"])
        if rank == 0:
            log(f"[train] resumed from checkpoint {resume_from} after epoch {first_epoch} "
                f"(best validation NDCG@10 {best.best_metric:.4f} at epoch {best.best_epoch})")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    for epoch in range(first_epoch, t.epochs):
        if bad_epochs >= t.patience:
            break  # resumed after the early stop had already been decided
        # dropout's RNG reseeded per (seed, epoch, rank): a resumed epoch draws what it drew before
        torch.manual_seed((cfg.seed * 1_000_003 + epoch) * 1_000 + rank)
        order = np.random.default_rng([cfg.seed, epoch]).permutation(len(win_in))
        t0 = time.time()
        loss_sum, loss_n = 0.0, 0.0
        net.train()
        for step in range(steps):
            rows = order[step * t.batch_size + rank: (step + 1) * t.batch_size: world]
            seqs = torch.as_tensor(win_in[rows], device=device)
            tgts = torch.as_tensor(win_tgt[rows], device=device)
            g = torch.Generator().manual_seed((cfg.seed * 1_000_003 + epoch) * 1_000_003 + step)
            negs = draw_negatives(cfg, g, N, probs, rank, world).to(device)
            # bert4rec: the masked positions of the window's last L items (tgts), drawn after the negatives
            masked = draw_cloze_mask(g, tgts != pad, t.batch_size, rank, world, cfg.model.mask_prob) if cloze else None
            with autocast:
                # through the DMP/DDP wrapper (its forward is the loss) so dense gradients are synchronised
                lsum, lcnt = model(seqs, tgts, negs, t.loss_positions == "last", masked, log_q)
            total = _all_reduce_sum(lcnt.detach().clone().to(torch.float64)).item()
            # normalise by the GLOBAL count; DDP averages gradients over workers, hence * world
            loss = lsum * (world / max(total, 1.0))
            dense_opt.zero_grad(set_to_none=True)
            if id_opt is not None:
                id_opt.zero_grad(set_to_none=True)
            loss.backward()
            dense_opt.step()
            if id_opt is not None:
                id_opt.step()
            step_loss = _all_reduce_sum(lsum.detach().to(torch.float64).cpu()).item() / max(total, 1.0)
            loss_sum += step_loss
            loss_n += 1
            if rank == 0 and t.log_every and (step + 1) % t.log_every == 0:
                rate = (step + 1) * t.batch_size / (time.time() - t0)
                eta = (steps - step - 1) * t.batch_size / rate
                log(f"[train] epoch {epoch + 1}/{t.epochs} step {step + 1}/{steps} loss {loss_sum / loss_n:.4f} "
                    f"{rate:,.0f} seq/s ETA {eta:.0f}s")
        row = {"epoch": epoch + 1, "loss": loss_sum / loss_n, "seconds": round(time.time() - t0, 2),
               "seq_per_s": round(steps * t.batch_size / (time.time() - t0), 1)}
        improved = False
        if (epoch + 1) % t.eval_every == 0 or epoch + 1 == t.epochs:
            val = validate(net, val_hist, val_tgt, cfg.eval.ks, device, cfg.eval.item_chunk, cfg.eval.user_batch)
            row |= {f"val_{k}": v for k, v in val.items() if k != "users"}
            metric = val["NDCG@10"] if "NDCG@10" in val else val[f"NDCG@{cfg.eval.ks[0]}"]
            if metric > best.best_metric:
                improved = True
                bad_epochs = 0
                best.best_metric, best.best_epoch = metric, epoch + 1
                best.item_table = net.items.full_table().cpu().clone()
                best.encoder_state = {k: v.detach().cpu().clone() for k, v in net.encoder.state_dict().items()}
            else:
                bad_epochs += 1
        history.append(row)
        if rank == 0:
            log(f"[train] epoch {epoch + 1}: loss {row['loss']:.4f}, {row['seq_per_s']:,.0f} seq/s"
                + (f", val NDCG@10 {row.get('val_NDCG@10', float('nan')):.4f} HR@10 {row.get('val_HR@10', float('nan')):.4f}"
                   if "val_NDCG@10" in row else "") + (" (best)" if improved else ""))
        if report is not None:
            writer = None
            if (epoch + 1) % t.checkpoint_every == 0:
                from .checkpoint import save_checkpoint

                progress = {"epochs_done": epoch + 1, "best_metric": best.best_metric,
                            "best_epoch": best.best_epoch, "bad_epochs": bad_epochs}
                snapshot = list(history)

                def writer(folder, progress=progress, snapshot=snapshot):
                    save_checkpoint(Path(folder), model=model, net=net, dense_opt=dense_opt, id_opt=id_opt,
                                    progress=progress, best=best, history=snapshot)
            report(row, writer)
        if bad_epochs >= t.patience:
            if rank == 0:
                log(f"[train] early stop: no validation gain for {t.patience} evaluations (best epoch {best.best_epoch})")
            break
    if best.item_table is None:  # no epoch ran (train.epochs=0, e.g. a warm start applied as is)
        best.best_epoch = 0
        best.item_table = net.items.full_table().cpu().clone()
        best.encoder_state = {k: v.detach().cpu().clone() for k, v in net.encoder.state_dict().items()}
    if t.cold_items == "neighbours":
        from .cold_items import fill_cold_items

        counts = torch.from_numpy(item_counts(prep / "train.parquet", N))
        best.item_table, n_cold = fill_cold_items(best.item_table, semantic, counts, id_dim=net.items.id_dim,
                                                  k=t.cold_neighbours, injection=cfg.model.injection)
        if rank == 0:
            log(f"[train] {n_cold} items without training interactions: ID part from their "
                f"{t.cold_neighbours} nearest trained items (train.cold_items=neighbours)")
    best.history = history
    return best


def save_model(folder: Path, result: TrainResult) -> None:
    """model.safetensors (fused item table + encoder) and history.json."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"item_table": result.item_table.contiguous()}
    tensors |= {f"encoder.{k}": v.contiguous() for k, v in result.encoder_state.items()}
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "history.json").write_text(json.dumps({"best_epoch": result.best_epoch,
                                                     "best_val_ndcg10": result.best_metric,
                                                     "epochs": result.history}, indent=2))
