"""The paper's baselines (alphafuse_dist.model.methods): each item module against its formula,
frozen tables stay bit-identical through training (plain torch, and TorchRec on 2 workers against
one process), and every method learns a small learnable data set end to end (train_model)."""
from __future__ import annotations

import math
import os
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import save_file

from alphafuse_dist.config import METHODS, load_config
from alphafuse_dist.decompose.basis import WHITEN_MIN_RELATIVE_EIGENVALUE, NullSpaceBasis, whitened_features
from alphafuse_dist.errors import ConfigError, DataError
from alphafuse_dist.model.recommender import build_model
from alphafuse_dist.train.checkpoint import model_state
from alphafuse_dist.train.inputs import TrainInputs, read_embeddings
from alphafuse_dist.train.optim import build_optimizer, trainable_parameters
from alphafuse_dist.train.recipe import TrainResult, train_model

N, DL, D, DN, L, B = 48, 20, 16, 8, 6, 8
BASELINES = ("llminit", "morec", "whitenrec", "unisrec", "rlmrec", "llmesr")
FROZEN = ("alphafuse", "morec", "whitenrec", "unisrec", "rlmrec")  # methods with a frozen table


def _language(n: int) -> torch.Tensor:
    """Language embeddings float32 [n, DL]: non-centred, correlated, eigenvalues spanning 100x."""
    g = torch.Generator().manual_seed(3)
    rotation = torch.linalg.qr(torch.randn(DL, DL, generator=g)).Q
    return ((torch.randn(n, DL, generator=g) * torch.linspace(1.0, 0.1, DL)) @ rotation * 0.1 + 0.2).float()


def _inputs():
    """(E float32 [N, DL], basis, semantic float32 [N, D])."""
    E = _language(N)
    En = E.numpy().astype(np.float64)
    basis = NullSpaceBasis.from_spectrum(En.mean(0), *np.linalg.eigh(np.cov(En, rowvar=False)),
                                         dim=D, null_dims=DN)
    return E, basis, torch.from_numpy(basis.transform(E.numpy()))


def _cfg(method: str, backend: str = "torch", extra: tuple[str, ...] = ()):
    return load_config(None, [f"method={method}", f"train.backend={backend}", f"model.dim={D}",
                              f"model.id_dims={DN}", "model.dropout=0.0", f"model.max_len={L}",
                              f"train.batch_size={B}", "model.id_init=normal", "model.id_init_std=0.1",
                              "train.lr=0.01", "train.weight_decay=0", "train.id_optimizer=adagrad", "train.id_lr=0.1",
                              *extra])


def _build(method: str, backend: str = "torch", extra: tuple[str, ...] = ()):
    E, basis, sem = _inputs()
    return build_model(_cfg(method, backend, extra), N, sem, torch.device("cpu"), language=E, basis=basis)


IDS = torch.tensor([0, 5, 5, 17, N - 1])


# ----------------------------------------------------------------------------- formulas

def test_llminit_starts_from_scaled_semantic_table():
    _, _, sem = _inputs()
    items = _build("llminit").items
    assert torch.equal(items.ids.weight.detach(), sem / math.sqrt(D))
    assert items.ids.weight.requires_grad and items.frozen_modules == ()
    assert torch.equal(items.full_table(), sem / math.sqrt(D))


def test_morec_is_gelu_of_linear_language():
    E, _, _ = _inputs()
    items = _build("morec").items
    W, c = items.adapter.weight.detach().double(), items.adapter.bias.detach().double()
    z = E[IDS].double() @ W.T + c
    expected = 0.5 * z * (1 + torch.erf(z / math.sqrt(2)))
    torch.testing.assert_close(items(IDS).double(), expected, rtol=1e-5, atol=1e-6)


def test_whitened_features_have_identity_covariance():
    E, basis, _ = _inputs()
    Z = whitened_features(E.numpy(), basis)
    assert Z.shape == (N, DL) and Z.dtype == np.float32
    np.testing.assert_allclose(np.cov(Z.astype(np.float64), rowvar=False), np.eye(DL), atol=1e-4)
    np.testing.assert_allclose(Z.mean(0), 0, atol=1e-5)


def test_whitened_features_drop_degenerate_directions():
    # 10 items in 20 dims: the covariance has rank 9, the other 11 eigenvalues are ~0
    E = _language(10)
    En = E.numpy().astype(np.float64)
    basis = NullSpaceBasis.from_spectrum(En.mean(0), *np.linalg.eigh(np.cov(En, rowvar=False)),
                                         dim=8, null_dims=4)
    assert (basis.eigenvalues <= WHITEN_MIN_RELATIVE_EIGENVALUE * basis.eigenvalues[0]).sum() == 11
    Z = whitened_features(E.numpy(), basis)
    assert Z.shape == (10, 9)
    np.testing.assert_allclose(np.cov(Z.astype(np.float64), rowvar=False), np.eye(9), atol=1e-4)
    # a basis holding only the top-k eigenpairs (randomized path): exactly those k are used
    top = NullSpaceBasis.from_spectrum(basis.mean, basis.eigenvalues[:8], basis.eigenvectors[:, :8], dim=8,
                                       null_dims=4, total_variance=float(basis.eigenvalues.sum()))
    np.testing.assert_allclose(whitened_features(E.numpy(), top), Z[:, :8], atol=1e-4)


def test_whitenrec_is_linear_over_whitened_text():
    E, basis, _ = _inputs()
    items = _build("whitenrec").items
    Z = torch.from_numpy(whitened_features(E.numpy(), basis)).double()
    assert torch.equal(items.features.weight, Z.float()) and not items.features.weight.requires_grad
    W, c = items.adapter.weight.detach().double(), items.adapter.bias.detach().double()
    torch.testing.assert_close(items(IDS).double(), Z[IDS] @ W.T + c, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_ids", [False, True])
def test_unisrec_gates_and_mixture_of_experts(with_ids):
    E, _, _ = _inputs()
    items = _build("unisrec", extra=("model.unisrec_experts=3", f"model.unisrec_with_ids={str(with_ids).lower()}")).items
    assert items.expert_weight.shape == (3, DL, D) and items.has_ids == with_ids
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # non-trivial gates and biases (the init has W_g = 0, b = 0)
        items.gate_weight.copy_(torch.randn(DL, 3, generator=g))
        items.expert_bias.copy_(torch.randn(3, DL, generator=g))
    x = E[IDS].numpy().astype(np.float64)
    Wg = items.gate_weight.detach().numpy().astype(np.float64)
    bk = items.expert_bias.detach().numpy().astype(np.float64)
    Wk = items.expert_weight.detach().numpy().astype(np.float64)
    logits = x @ Wg
    gate = np.exp(logits - logits.max(1, keepdims=True))
    gate /= gate.sum(1, keepdims=True)
    expected = sum(gate[:, k:k + 1] * ((x - bk[k]) @ Wk[k]) for k in range(3))
    got_gate = items.gates(E[IDS]).detach().numpy()
    np.testing.assert_allclose(got_gate.sum(1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(got_gate, gate, rtol=1e-5, atol=1e-6)
    if with_ids:
        expected = expected + items.ids.weight.detach().numpy()[IDS.numpy()]
    np.testing.assert_allclose(items(IDS).detach().numpy(), expected, rtol=1e-4, atol=1e-5)


def test_rlmrec_extra_loss_is_weighted_cosine_reconstruction():
    _, _, sem = _inputs()
    items = _build("rlmrec", extra=("model.rlmrec_weight=0.3",)).items
    vecs = items(IDS)
    assert torch.equal(vecs, items.ids.weight[IDS])
    lin1, lin2 = items.decoder[0], items.decoder[2]
    v = vecs.detach().numpy().astype(np.float64)
    h = v @ lin1.weight.detach().numpy().T + lin1.bias.detach().numpy()
    h = np.where(h > 0, h, 0.01 * h)  # LeakyReLU
    r = h @ lin2.weight.detach().numpy().T + lin2.bias.detach().numpy()
    t = sem[IDS].numpy().astype(np.float64)
    cos = (r * t).sum(1) / np.linalg.norm(r, axis=1) / np.linalg.norm(t, axis=1)
    loss = items.extra_loss(IDS, vecs)
    assert loss.dim() == 0
    np.testing.assert_allclose(loss.item(), 0.3 * (1 - cos).sum(), rtol=1e-5)
    loss.backward()
    assert items.ids.weight.grad.abs().sum() > 0 and lin1.weight.grad.abs().sum() > 0


def test_rlmrec_loss_terms_include_the_reconstruction():
    torch.manual_seed(0)
    seqs, tgts, negs = torch.randint(0, N, (4, L)), torch.randint(0, N, (4, L)), torch.randint(0, N, (8,))
    base = _build("rlmrec", extra=("model.rlmrec_weight=0",))
    weighted = _build("rlmrec", extra=("model.rlmrec_weight=2",))
    (l0, n0), (l2, n2) = base(seqs, tgts, negs), weighted(seqs, tgts, negs)
    uniq = torch.unique(torch.cat([seqs.reshape(-1), tgts.reshape(-1), negs]))
    extra = weighted.items.extra_loss(uniq, weighted.items(uniq))
    assert n0 == n2 and extra > 0
    torch.testing.assert_close(l2 - l0, extra, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- wiring

@pytest.mark.parametrize("method", METHODS)
def test_parameter_split_and_checkpoint_state(method):
    net = _build(method)
    items = net.items
    dense, ids = (list(group.values()) for group in trainable_parameters(net))
    frozen = [p for m in items.frozen_modules for p in getattr(items, m).parameters()]
    id_params = [p for m in items.id_modules for p in getattr(items, m).parameters()]
    assert {id(p) for p in ids} == {id(p) for p in id_params}
    assert not {id(p) for p in frozen} & {id(p) for p in dense + ids}
    assert all(not p.requires_grad for p in frozen)
    adapters = [p for n, p in items.named_parameters() if not n.startswith(items.id_modules + items.frozen_modules)]
    assert {id(p) for p in adapters} | {id(p) for p in net.encoder.parameters()} == {id(p) for p in dense}
    assert bool(adapters) == (method in ("morec", "whitenrec", "unisrec", "rlmrec", "llmesr"))
    state = model_state(net)
    assert not [k for k in state if k.startswith(tuple(f"items.{m}." for m in items.frozen_modules))]
    assert len(state) == len(net.state_dict()) - len(frozen)


def test_torchrec_modules_list_their_tables():
    for method in BASELINES:
        items = _build(method, "torchrec", ("model.unisrec_with_ids=true", "train.frozen_tables=sharded")).items
        specs = items.torchrec_tables()
        expected = {"llminit": [False], "morec": [True], "whitenrec": [True]}.get(method, [False, True])
        assert [s.frozen for s in specs] == expected
        assert all(s.initial.shape[1] % 4 == 0 and s.initial.shape[0] == N for s in specs)
        assert tuple(s.module for s in specs if s.frozen) == items.frozen_modules
        for placement in ("sharded", "replicated"):
            state = model_state(_build(method, "torchrec", (f"train.frozen_tables={placement}",)))
            assert not [k for k in state if "features" in k or "semantic" in k]


@pytest.mark.parametrize("method", [m for m in METHODS if m not in ("sasrec_id", "llminit")])
def test_replicated_frozen_table_is_local_and_equal(method):
    """train.frozen_tables=replicated: the frozen table is a local frozen nn.Embedding, not a TorchRec
    table; the torchrec module's lookups of it equal the plain torch module's."""
    items = _build(method, "torchrec", ("train.frozen_tables=replicated",)).items
    plain = _build(method).items
    assert not [s for s in items.torchrec_tables() if s.frozen]
    (name,) = items.frozen_modules
    assert isinstance(getattr(items, name), torch.nn.Embedding) and name == plain.frozen_modules[0]
    assert not getattr(items, name).weight.requires_grad
    lookup = "lookup_semantic" if method == "alphafuse" else "lookup_features"
    assert torch.equal(getattr(items, lookup)(IDS), getattr(plain, lookup)(IDS))


def test_frozen_tables_auto_replicates_up_to_its_size_limit():
    from alphafuse_dist.model.items import REPLICATE_FROZEN_BYTES, frozen_placement

    auto, sharded = load_config(None, []), load_config(None, ["train.frozen_tables=sharded"])
    rows = REPLICATE_FROZEN_BYTES // (4 * 128)
    assert frozen_placement(auto, torch.empty(rows, 128, device="meta")) == "replicated"
    assert frozen_placement(auto, torch.empty(rows + 1, 128, device="meta")) == "sharded"
    assert frozen_placement(sharded, torch.empty(10, 128, device="meta")) == "sharded"
    with pytest.raises(ConfigError, match="train.frozen_tables"):
        load_config(None, ["train.frozen_tables=everywhere"])


def test_config_keys_checked():
    assert load_config(None, ["method=unisrec"]).model.unisrec_experts == 8
    for override, key in (("model.unisrec_experts=0", "model.unisrec_experts"),
                          ("model.rlmrec_weight=-1", "model.rlmrec_weight"),
                          ("model.unisrec_with_ids=maybe", "model.unisrec_with_ids"),
                          ("method=lightgcn", "method")):
        with pytest.raises(ConfigError, match=key):
            load_config(None, [override])


def _write_fragments(folder, E: np.ndarray, order: np.ndarray, parts: int = 2) -> None:
    for k, rows in enumerate(np.array_split(order, parts)):
        vec = pa.FixedSizeListArray.from_arrays(pa.array(E[rows].reshape(-1), pa.float32()), E.shape[1])
        pq.write_table(pa.table({"item_idx": pa.array(rows, pa.int32()), "vector": vec}),
                       folder / f"part-{k:05d}.parquet")


def test_read_embeddings_orders_rows_by_item_idx(tmp_path):
    E = np.random.default_rng(0).normal(size=(30, 8)).astype(np.float32)
    _write_fragments(tmp_path, E, np.random.default_rng(1).permutation(30), parts=3)
    np.testing.assert_array_equal(read_embeddings(tmp_path, 30), E)
    with pytest.raises(DataError, match="no embedding"):
        read_embeddings(tmp_path, 31)
    (tmp_path / "part-00003.parquet").write_bytes((tmp_path / "part-00000.parquet").read_bytes())
    with pytest.raises(DataError, match="more than once"):
        read_embeddings(tmp_path, 30)


STAGE_FNS = ("prepare_stage", "embed_stage", "decompose_stage", "train_stage", "evaluate_stage")


@pytest.mark.parametrize("method, stages", [
    ("alphafuse", ["prepare", "embed", "decompose", "train"]), ("sasrec_id", ["prepare", "train"]),
    ("llminit", ["prepare", "embed", "decompose", "train"]), ("morec", ["prepare", "embed", "train"]),
    ("whitenrec", ["prepare", "embed", "decompose", "train"]), ("unisrec", ["prepare", "embed", "train"]),
    ("rlmrec", ["prepare", "embed", "decompose", "train"]), ("llmesr", ["prepare", "embed", "decompose", "train"])])
def test_pipeline_runs_the_stages_a_method_needs(method, stages, tmp_path, monkeypatch):
    from alphafuse_dist import pipeline

    calls = []
    for fn in STAGE_FNS:
        monkeypatch.setattr(pipeline, fn, lambda cfg, fn=fn, **_: calls.append(fn[:-len("_stage")]))
    cfg = load_config(None, [f"method={method}", f"run_dir={tmp_path}"])
    pipeline.run_pipeline(cfg, stages=("prepare", "embed", "decompose", "train"))
    assert calls == stages


def test_train_stage_passes_and_fingerprints_each_methods_inputs(tmp_path, monkeypatch):
    from alphafuse_dist import pipeline
    from alphafuse_dist.runtime.manifest import read_manifest, run_stage

    for stage, info in (("prepare", {"rows": {"items": 5}}), ("embed", {}), ("decompose", {})):
        run_stage(tmp_path, stage, config_hash="x", inputs={}, build=lambda tmp, info=info: info)
    seen = {}

    def fake_train_local(cfg, inputs, out_dir, log=print):
        seen[cfg.method] = inputs
        return {}

    monkeypatch.setattr("alphafuse_dist.train.launch.train_local", fake_train_local)
    for method in METHODS:
        cfg = load_config(None, [f"method={method}", f"run_dir={tmp_path}", "train.backend=torch",
                                 "train.num_workers=1"])
        pipeline.train_stage(cfg)
    embed, decomposed = str((tmp_path / "embed").resolve()), (tmp_path / "decompose").resolve()
    semantic = str(decomposed / "semantic.safetensors")
    expected = {"alphafuse": (semantic, None, None), "sasrec_id": (None, None, None),
                "llminit": (semantic, None, None), "morec": (None, embed, None),
                "whitenrec": (None, embed, str(decomposed)), "unisrec": (None, embed, None),
                "rlmrec": (semantic, None, None), "llmesr": (semantic, embed, None)}
    for method, (sem, lang, basis) in expected.items():
        got = seen[method]
        assert (got.semantic_path, got.language_path, got.basis_path, got.num_items) == (sem, lang, basis, 5), method
        # the stage's fingerprint covers exactly the stages it reads
        inputs = read_manifest(tmp_path / f"train-{method}-s22")["inputs"]
        assert set(inputs) == {"prepare"} | ({"embed"} if lang else set()) | ({"decompose"} if sem or basis else set())


# ----------------------------------------------------------------------------- frozen tables in training

def _batches(steps: int = 4):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(steps):
        seqs = torch.randint(0, N, (B, L), generator=g)
        seqs[:, :2] = N  # some left padding
        tgts = torch.randint(0, N, (B, L), generator=g)
        tgts[:, :2] = N
        out.append((seqs, tgts, torch.randint(0, N, (16,), generator=g)))
    return out


def _run_steps(model, optimizer, rank: int, world: int, shares: int = 1) -> list[float]:
    """A few steps; worker ``rank`` of ``world`` takes its share of each batch. One process with
    ``shares`` > 1 sums the loss terms of that many shares (what ``shares`` workers compute)."""
    losses = []
    for seqs, tgts, negs in _batches():
        parts = [slice(r * B // world, (r + 1) * B // world) for r in [rank]] if world > 1 else \
            [slice(r * B // shares, (r + 1) * B // shares) for r in range(shares)]
        terms = [model(seqs[p], tgts[p], negs) for p in parts]
        lsum, lcnt = sum(t[0] for t in terms), sum(t[1] for t in terms)
        total, lsum_all = lcnt.clone(), lsum.detach().clone()
        if world > 1:
            dist.all_reduce(total)
            dist.all_reduce(lsum_all)
        loss = lsum * (world / total)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append((lsum_all / total).item())
    return losses


def _expected_frozen(method: str) -> torch.Tensor:
    E, basis, sem = _inputs()
    return {"alphafuse": sem, "rlmrec": sem, "morec": E, "unisrec": E,
            "whitenrec": torch.from_numpy(whitened_features(E.numpy(), basis))}[method]


def _single(method: str, extra: tuple[str, ...] = (), shares: int = 1):
    net = _build(method, extra=extra)
    before = {n: p.detach().clone() for n, p in net.items.named_parameters()}
    losses = _run_steps(net, build_optimizer(_cfg(method, extra=extra), net, net), 0, 1, shares)
    return net, before, losses


@pytest.mark.parametrize("method", FROZEN)
def test_frozen_tables_bit_identical_after_training_torch(method):
    net, before, losses = _single(method)
    frozen_names = {f"{m}.weight" for m in net.items.frozen_modules}
    for name, p in net.items.named_parameters():
        if name in frozen_names:
            assert torch.equal(p, before[name]) and torch.equal(p, _expected_frozen(method)), name
        else:
            assert (p - before[name]).abs().max() > 0, f"{name} was not trained"
    assert all(math.isfinite(x) for x in losses)


def test_checkpoint_round_trip_without_frozen_tables(tmp_path):
    from alphafuse_dist.train.checkpoint import load_checkpoint, save_checkpoint

    extra = ("model.unisrec_with_ids=true",)
    cfg = _cfg("unisrec", extra=extra)
    net, _, _ = _single("unisrec", extra)
    optimizer = build_optimizer(cfg, net, net)
    _run_steps(net, optimizer, 0, 1)
    progress = {"epochs_done": 1, "best_metric": 0.5, "best_epoch": 1, "bad_epochs": 0}
    save_checkpoint(tmp_path, net=net, optimizer=optimizer, progress=progress,
                    best=TrainResult(best_epoch=-1, best_metric=-1.0), history=[])
    import torch.distributed.checkpoint as dcp

    saved = dcp.FileSystemReader(str(tmp_path)).read_metadata().state_dict_metadata
    assert any("items.expert_weight" in k for k in saved) and any("items.ids." in k for k in saved)
    assert not [k for k in saved if "items.features" in k]
    fresh = _build("unisrec", extra=extra)
    f_optimizer = build_optimizer(cfg, fresh, fresh)
    got, _ = load_checkpoint(tmp_path, net=fresh, optimizer=f_optimizer,
                             best=TrainResult(best_epoch=-1, best_metric=-1.0))
    assert got["epochs_done"] == 1
    for (name, a), (_, b) in zip(net.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), name  # adapters, ID rows, encoder restored; features rebuilt equal
    # the optimiser states came back too: training continues with identical losses
    assert _run_steps(net, optimizer, 0, 1) == _run_steps(fresh, f_optimizer, 0, 1)


# frozen feature tables: sharded TorchRec tables for morec and unisrec, replicated (the default at
# this size) for whitenrec and rlmrec
TORCHREC_CASES = (("llminit", ()), ("morec", ("train.frozen_tables=sharded",)), ("whitenrec", ()),
                  ("unisrec", ("model.unisrec_with_ids=true", "train.frozen_tables=sharded")), ("rlmrec", ()))


def _torchrec_worker(rank: int, world: int, store_path: str, out_path: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    try:
        from alphafuse_dist.train.sharding import shard_model

        out = {}
        for method, extra in TORCHREC_CASES:
            net = _build(method, "torchrec", extra)
            model = shard_model(net, sharding="row_wise", id_optimizer_name="adagrad", id_lr=0.1,
                                device=torch.device("cpu"), log=lambda s: None)
            losses = _run_steps(model, build_optimizer(_cfg(method, "torchrec", extra), model, net), rank, world)
            frozen = net.items.lookup_features(torch.arange(N)) if net.items.frozen_modules else None
            out[method] = {"losses": losses, "table": net.items.full_table(), "frozen": frozen,
                           "checkpointed": sorted(model_state(net))}
        if rank == 0:
            torch.save(out, out_path)
    finally:
        dist.destroy_process_group()


def test_torchrec_two_workers_match_one_process_and_keep_frozen_rows():
    with tempfile.TemporaryDirectory() as d:
        out_path = os.path.join(d, "out.pt")
        mp.start_processes(_torchrec_worker, args=(2, os.path.join(d, "store"), out_path), nprocs=2, join=True,
                           start_method="spawn")
        got = torch.load(out_path)
    for method, extra in TORCHREC_CASES:
        # rlmrec's reconstruction term sums over each worker's distinct items (an item in both
        # workers' shares counts twice): the reference sums the terms of the 2 shares likewise
        # (for the InfoNCE part, per position, this equals the whole batch at once)
        net, _, losses = _single(method, extra, shares=2)
        torch.testing.assert_close(torch.tensor(got[method]["losses"]), torch.tensor(losses), rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"{method}: {m}")
        torch.testing.assert_close(got[method]["table"], net.items.full_table(), rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"{method}: {m}")
        if method != "llminit":
            assert torch.equal(got[method]["frozen"], _expected_frozen(method)), method
        # checkpoints of the sharded model hold the ID table and adapters, never the frozen table
        keys = got[method]["checkpointed"]
        assert not [k for k in keys if k.startswith("items.features_ec.")], keys
        assert any(k.startswith("items.id_ec.") for k in keys) == (method in ("llminit", "unisrec", "rlmrec"))
        assert any(k.startswith("items.") and "_ec." not in k for k in keys) == (method != "llminit")


# ----------------------------------------------------------------------------- learning

N_ITEMS, N_USERS, D_L = 40, 120, 48


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, write_cycle_data):
    """A prepared cycle data set (item i -> i+1, as tests/test_pipeline_e2e.py) with synthetic
    random language embeddings written as the embed stage would, and a decompose folder."""
    from alphafuse_dist.pipeline import prepare_stage
    from alphafuse_dist.runtime.manifest import read_manifest

    root = tmp_path_factory.mktemp("methods")
    rng = np.random.default_rng(0)
    write_cycle_data(root, N_USERS, N_ITEMS, (6, 14), rng)
    cfg = load_config(None, ["data.source=interactions", f"data.path={root / 'inter.csv'}",
                             f"data.items_path={root / 'items.csv'}", "data.text_template={title}",
                             f"run_dir={root / 'run'}"])
    prep = prepare_stage(cfg)
    num_items = read_manifest(prep)["rows"]["items"]
    E = rng.normal(size=(num_items, D_L)).astype(np.float32)
    (root / "embed").mkdir()
    _write_fragments(root / "embed", E, rng.permutation(num_items))
    En = E.astype(np.float64)
    basis = NullSpaceBasis.from_spectrum(En.mean(0), *np.linalg.eigh(np.cov(En, rowvar=False)),
                                         dim=32, null_dims=16)
    basis.save(root / "decompose")
    save_file({"semantic": torch.from_numpy(basis.transform(E))}, str(root / "decompose" / "semantic.safetensors"))
    return TrainInputs(prepare_dir=str(prep), semantic_path=str(root / "decompose" / "semantic.safetensors"),
                       num_items=num_items, language_path=str(root / "embed"), basis_path=str(root / "decompose"))


@pytest.mark.parametrize("method", METHODS)
def test_each_method_learns_with_plain_torch(method, prepared):
    cfg = load_config(None, [f"method={method}", "train.backend=torch", "train.num_workers=1", "model.dim=32",
                             "model.id_dims=16", "model.max_len=8", "train.batch_size=32", "train.epochs=12",
                             "train.patience=12", "train.num_negatives=16", "train.lr=0.005", "train.log_every=0",
                             "model.dropout=0.0", "train.eval_every=4", "train.id_lr=0.05"])
    torch.set_num_threads(1)
    result = train_model(cfg, prepared, log=lambda s: None)
    losses = [row["loss"] for row in result.history]
    assert losses[-1] < 0.8 * losses[0], losses
    # random ranking of 40 items: HR@10 = 0.25, NDCG@10 ~ 0.11; the cycle is learnable
    assert result.best_metric > 0.6, (method, result.history[-1])
    assert result.item_table.shape == (N_ITEMS, 32)


def test_compare_command_accepts_every_method(monkeypatch, tmp_path, capsys):
    from alphafuse_dist import cli, pipeline
    from alphafuse_dist.errors import AlphaFuseError

    asked = []

    def fake_compare(cfg, methods, seeds, stages, **_):  # stop once the method names got through
        asked.append(methods)
        raise AlphaFuseError("compare reached")

    monkeypatch.setattr(pipeline, "compare", fake_compare)
    assert cli.main(["compare", "--methods", ",".join(METHODS), f"run_dir={tmp_path}"]) == 2
    assert asked == [list(METHODS)] and "compare reached" in capsys.readouterr().err
    assert cli.main(["compare", "--methods", "alphafuse,lightgcn", f"run_dir={tmp_path}"]) == 2
    assert asked == [list(METHODS)] and "lightgcn" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("method", BASELINES)
def test_baseline_pipeline_with_ray_and_torchrec(method, tmp_path_factory, ray_session):
    """The whole pipeline (real MiniLM embeddings, Ray Train, 2 TorchRec workers, checkpoints,
    evaluation) on tests/test_pipeline_e2e.py's cycle data set, for each baseline."""
    from test_pipeline_e2e import N_USERS, _write_dataset

    from alphafuse_dist.pipeline import run_pipeline

    data = tmp_path_factory.mktemp("data")
    _write_dataset(data)
    cfg = load_config("quickstart", [
        f"method={method}", "data.source=interactions", f"data.path={data / 'inter.csv'}",
        f"data.items_path={data / 'items.csv'}", "data.text_template={title}. Genres: {genres}.",
        f"run_dir={tmp_path_factory.getbasetemp() / 'methods-e2e'}", "model.dim=32", "model.id_dims=16",
        "model.max_len=8", "train.batch_size=32", "train.epochs=25", "train.patience=25",
        "train.num_negatives=16", "train.lr=0.005", "train.log_every=0", "model.dropout=0.0",
        "model.unisrec_with_ids=true"])
    m = run_pipeline(cfg)["metrics"]["metrics"]["overall"]
    assert m["users"] == N_USERS
    assert m["HR@10"] > 0.6, m  # random ranking of 40 items: 0.25


def test_registries_match_the_config_and_name_their_choices():
    from alphafuse_dist.errors import choose
    from alphafuse_dist.model.backbones import ENCODERS
    from alphafuse_dist.model.items import ITEM_METHODS, METHOD_INPUTS
    from alphafuse_dist.model.losses import LOSSES
    from alphafuse_dist.train.optim import ID_OPTIMIZERS
    from alphafuse_dist.train.sharding import SHARDING_PLANS

    assert tuple(ITEM_METHODS) == tuple(METHOD_INPUTS) == METHODS
    for registry, key in ((ITEM_METHODS, "method"), (ENCODERS, "model.backbone"), (LOSSES, "train.loss"),
                          (ID_OPTIMIZERS, "train.id_optimizer"), (SHARDING_PLANS, "train.sharding")):
        with pytest.raises(ConfigError, match=rf"^{key}='nope': expected one of {', '.join(registry)}$"):
            choose(registry, "nope", key)
