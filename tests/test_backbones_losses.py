"""Backbones (sasrec, gru4rec, bert4rec) and losses (infonce, bce, full_ce; shared / per-sequence
negatives; uniform / popularity sampling; logQ): numbers against direct computations, the
padding and masking rules, and that every backbone x loss learns a sequential pattern."""
from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from _workers import on_workers, recipe_steps

from alphafuse_dist.config import load_config
from alphafuse_dist.errors import ConfigError
from alphafuse_dist.evaluate.metrics import metrics_from_ranks, target_ranks
from alphafuse_dist.evaluate.stage import load_model
from alphafuse_dist.model.backbones import BERT4RecEncoder, GRU4RecEncoder, cloze_mask, draw_cloze_mask
from alphafuse_dist.model.losses import (bce_loss, expected_count_log_q, full_softmax_loss, logq_correct,
                                         sampled_softmax_loss)
from alphafuse_dist.model.sasrec import user_states_from_table
from alphafuse_dist.data.sequences import eval_inputs
from alphafuse_dist.model.recommender import build_model
from alphafuse_dist.train.checkpoint import save_model
from alphafuse_dist.train.inputs import TrainInputs
from alphafuse_dist.train.recipe import train_model
from alphafuse_dist.train.sampling import draw_negatives

NEG_INF = float("-inf")


# ----------------------------------------------------------------------------- loss functions

def _logits():
    pos = torch.tensor([1.5, -0.3, 0.2], dtype=torch.float64)
    neg = torch.tensor([[0.5, -1.0, 2.0], [NEG_INF, 0.1, -0.2], [0.0, NEG_INF, NEG_INF]], dtype=torch.float64)
    return pos, neg


def test_sampled_softmax_matches_numpy():
    pos, neg = _logits()
    got = sampled_softmax_loss(pos, neg)
    p, n = pos.numpy(), neg.numpy()
    want = [-(p[m] - np.log(np.exp(p[m]) + np.exp(n[m][np.isfinite(n[m])]).sum())) for m in range(3)]
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-12)


def test_bce_matches_numpy_mean_over_kept_negatives():
    pos, neg = _logits()
    got = bce_loss(pos, neg)
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    p, n = pos.numpy(), neg.numpy()
    want = []
    for m in range(3):
        kept = n[m][np.isfinite(n[m])]
        want.append(-np.log(sig(p[m])) - np.log(1 - sig(kept)).sum() / len(kept))
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-12)
    # a masked negative contributes neither a term nor a gradient
    neg_g = neg.clone().requires_grad_(True)
    bce_loss(pos, neg_g).sum().backward()
    assert torch.all(neg_g.grad[~torch.isfinite(neg)] == 0)
    assert torch.all(neg_g.grad[torch.isfinite(neg)] > 0)


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunked_full_ce_equals_cross_entropy(chunk):
    g = torch.Generator().manual_seed(0)
    M, N, d, scale = 9, 64, 8, 1 / 0.07
    h = F.normalize(torch.randn(M, d, generator=g), dim=-1).requires_grad_(True)
    items = F.normalize(torch.randn(N, d, generator=g), dim=-1).requires_grad_(True)
    y = torch.randint(0, N, (M,), generator=g)
    pos = (h * items[y]).sum(-1) * scale
    got = full_softmax_loss(h, items, pos, scale, chunk)
    gh, gi = torch.autograd.grad(got.sum(), (h, items))
    want = F.cross_entropy(h @ items.T * scale, y, reduction="none")
    wh, wi = torch.autograd.grad(want.sum(), (h, items))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # gradients reach the users and every item; float32 rounding of logits scaled by 1/0.07
    torch.testing.assert_close(gh, wh, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gi, wi, rtol=1e-5, atol=1e-5)


def test_logq_subtracts_log_expected_count():
    pos, neg = _logits()
    probs = torch.tensor([0.5, 0.25, 0.125, 0.125], dtype=torch.float64)
    log_q = expected_count_log_q(probs, 4)  # log(K q): 4 draws with replacement
    torch.testing.assert_close(log_q, torch.log(torch.tensor([2.0, 1.0, 0.5, 0.5])), rtol=0, atol=1e-7)
    tgt = torch.tensor([0, 1, 2])
    negs = torch.tensor([[1, 2, 3], [0, 2, 3], [3, 0, 1]])
    p2, n2 = logq_correct(pos, neg, log_q[tgt].double(), log_q[negs].double())
    torch.testing.assert_close(pos - p2, log_q[tgt].double())
    fin = torch.isfinite(neg)
    torch.testing.assert_close((neg - n2)[fin], log_q[negs].double()[fin])
    assert torch.equal(torch.isfinite(n2), fin)


# ----------------------------------------------------------------------------- loss_terms wiring

N, L, D = 30, 6, 16


def _net(*overrides):
    cfg = load_config(None, ["method=sasrec_id", "train.backend=torch", f"model.dim={D}", "model.id_dims=8",
                             f"model.max_len={L}", "model.dropout=0.0", *overrides])
    return build_model(cfg, N, None, torch.device("cpu")).eval()


def _batch(B=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    seqs = torch.randint(0, N, (B, L), generator=g)
    seqs[:, :2] = N
    tgts = torch.randint(0, N, (B, L), generator=g)
    tgts[:, :2] = N
    return seqs, tgts


@pytest.mark.parametrize("loss", ["infonce", "bce"])
def test_per_sequence_negatives_are_each_rows_own_and_hits_masked(loss):
    net = _net(f"train.loss={loss}")
    seqs, tgts = _batch()
    negs = torch.randint(0, N, (4, 5), generator=torch.Generator().manual_seed(3))
    negs[1, 2] = tgts[1, -1]  # an accidental hit for row 1's last position
    with torch.no_grad():
        total, count = net.loss_terms(seqs, tgts, negs, last_only=True)
        # per-sequence = each row alone with its own row as shared negatives
        rows = [net.loss_terms(seqs[b:b + 1], tgts[b:b + 1], negs[b], last_only=True)[0] for b in range(4)]
        # the hit is masked out: the same as row 1 without that negative
        row1_without = net.loss_terms(seqs[1:2], tgts[1:2], negs[1, [0, 1, 3, 4]], last_only=True)[0]
        row1_unmasked = _manual_row_loss(net, seqs[1:2], tgts[1, -1], negs[1], loss)
    assert count.item() == 4
    torch.testing.assert_close(total, torch.stack(rows).sum(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rows[1], row1_without, rtol=1e-6, atol=1e-6)
    assert abs(rows[1].item() - row1_unmasked) > 1e-4  # the masking changed the number


def _manual_row_loss(net, seq, target, negs, loss) -> float:
    """Loss of one sequence's last position with every negative kept (no hit masking)."""
    table = net.items.full_table()
    h = F.normalize(net.user_states(seq), dim=-1)[0]
    t = F.normalize(table, dim=-1)
    pos, neg = (h @ t[target]) / 0.07, (t[negs] @ h) / 0.07
    if loss == "infonce":
        return (-(pos - torch.logsumexp(torch.cat([pos[None], neg]), 0))).item()
    return (F.softplus(-pos) + F.softplus(neg).mean()).item()


def test_loss_terms_logq_and_full_ce_numbers():
    seqs, tgts = _batch()
    negs = torch.randint(0, N, (7,), generator=torch.Generator().manual_seed(5))
    net = _net()
    log_q = torch.log(torch.rand(N, generator=torch.Generator().manual_seed(6)) * 3 + 0.1)
    with torch.no_grad():
        plain, _ = net.loss_terms(seqs, tgts, negs, last_only=True)
        corrected, _ = net.loss_terms(seqs, tgts, negs, last_only=True, log_q=log_q)
        h = F.normalize(net.user_states(seqs), dim=-1)
        t = F.normalize(net.items.full_table(), dim=-1)
        y = tgts[:, -1]
        pos = (h * t[y]).sum(-1) / 0.07 - log_q[y]
        neg = (h @ t[negs].T) / 0.07 - log_q[negs]
        neg = neg.masked_fill(negs[None] == y[:, None], NEG_INF)
        want = (-(pos - torch.logsumexp(torch.cat([pos[:, None], neg], 1), 1))).sum()
    torch.testing.assert_close(corrected, want, rtol=1e-5, atol=1e-5)
    assert abs(corrected.item() - plain.item()) > 1e-3
    # full_ce: the cross-entropy over all N items, chunked (3 items per block)
    full = _net("train.loss=full_ce", "train.ce_chunk=3")
    with torch.no_grad():
        got, count = full.loss_terms(seqs, tgts, torch.empty(0, dtype=torch.long))
        valid = tgts != N
        hs = F.normalize(full.encoder(full.embed_sequences(seqs), seqs != N), dim=-1)[valid]
        want = F.cross_entropy(hs @ F.normalize(full.items.full_table(), dim=-1).T / 0.07, tgts[valid], reduction="sum")
    assert count.item() == valid.sum().item()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_extra_loss_hook_is_added():
    net = _net()
    seqs, tgts = _batch()
    negs = torch.arange(5)
    with torch.no_grad():
        base, _ = net.loss_terms(seqs, tgts, negs)
        seen = {}

        def extra_loss(ids, vecs):
            seen["ids"] = ids
            return vecs.sum() * 0 + 2.5

        net.items.extra_loss = extra_loss
        got, _ = net.loss_terms(seqs, tgts, negs)
    torch.testing.assert_close(got, base + 2.5)
    assert torch.equal(seen["ids"], torch.unique(torch.cat([seqs[seqs != N], tgts[tgts != N], negs])))


def test_negatives_per_sequence_split_over_workers_equals_global_draw():
    cfg = load_config(None, ["train.negatives=per_sequence", "train.batch_size=6", "train.num_negatives=4",
                             "train.num_workers=2"])
    whole = draw_negatives(load_config(None, ["train.negatives=per_sequence", "train.batch_size=6",
                                              "train.num_negatives=4", "train.num_workers=1"]),
                           torch.Generator().manual_seed(9), N, None, 0, 1)
    parts = [draw_negatives(cfg, torch.Generator().manual_seed(9), N, None, r, 2) for r in range(2)]
    assert whole.shape == (6, 4)
    assert torch.equal(whole[0::2], parts[0]) and torch.equal(whole[1::2], parts[1])
    probs = torch.zeros(N, dtype=torch.float64)
    probs[[3, 7]] = torch.tensor([0.75, 0.25], dtype=torch.float64)
    pop = draw_negatives(cfg, torch.Generator().manual_seed(9), N, probs, 0, 2)
    assert set(pop.unique().tolist()) == {3, 7}


def test_config_rejects_meaningless_combinations():
    with pytest.raises(ConfigError, match="train.loss_positions"):
        load_config(None, ["model.backbone=bert4rec", "train.loss_positions=last"])
    with pytest.raises(ConfigError, match="train.logq"):
        load_config(None, ["train.loss=full_ce", "train.logq=true"])
    with pytest.raises(ConfigError, match="model.mask_prob"):
        load_config(None, ["model.mask_prob=0"])
    with pytest.raises(ConfigError, match="model.backbone"):
        load_config(None, ["model.backbone=transformer"])


# ----------------------------------------------------------------------------- backbones

def test_gru4rec_does_not_depend_on_left_padding():
    torch.manual_seed(0)
    enc = GRU4RecEncoder(8, num_layers=2, dropout=0.0).eval()
    seq = torch.randn(1, 3, 8)
    ref = enc(seq, torch.ones(1, 3, dtype=torch.bool))
    for pads in (1, 5):
        x = torch.cat([torch.zeros(1, pads, 8), seq], 1)
        valid = torch.arange(pads + 3) >= pads
        out = enc(x, valid.unsqueeze(0))
        torch.testing.assert_close(out[:, pads:], ref, rtol=0, atol=1e-6)
        assert torch.all(out[:, :pads] == 0)
    # a batch mixing padding amounts gives each row its unpadded result
    x = torch.cat([torch.cat([torch.zeros(1, 2, 8), seq], 1), torch.randn(1, 5, 8)])
    valid = torch.tensor([[False, False, True, True, True], [True] * 5])
    torch.testing.assert_close(enc(x, valid)[0, 2:], ref[0], rtol=0, atol=1e-6)
    # the same padded input through a GRU run from the left differs: the test has teeth
    naive, _ = enc.gru(F.normalize(torch.cat([torch.zeros(1, 5, 8), seq], 1), dim=-1) * 8 ** 0.5)
    assert (naive[:, 5:] - ref).abs().max() > 1e-3


def test_cloze_mask_deterministic_split_invariant_and_never_empty():
    valid = torch.arange(L).expand(64, L) >= torch.randint(0, L, (64, 1), generator=torch.Generator().manual_seed(1))
    a = draw_cloze_mask(torch.Generator().manual_seed(4), valid, 64, 0, 1, 0.2)
    b = draw_cloze_mask(torch.Generator().manual_seed(4), valid, 64, 0, 1, 0.2)
    assert torch.equal(a, b)
    halves = [draw_cloze_mask(torch.Generator().manual_seed(4), valid[r::2], 64, r, 2, 0.2) for r in range(2)]
    assert torch.equal(a[0::2], halves[0]) and torch.equal(a[1::2], halves[1])
    assert not (a & ~valid).any()
    assert a.any(1).all()
    # the Bernoulli part: mask exactly where the draw is below mask_prob; the forced one is valid
    u = torch.tensor([[0.9, 0.1, 0.9, 0.9], [0.9, 0.9, 0.9, 0.9]])
    v = torch.tensor([[False, True, True, True], [False, False, True, True]])
    m = cloze_mask(v, u, torch.tensor([0.0, 0.99]), 0.2)
    assert m.tolist() == [[False, True, False, False], [False, False, False, True]]


def test_bert4rec_user_state_masks_the_last_position():
    torch.manual_seed(0)
    enc = BERT4RecEncoder(8, max_len=4, num_heads=2, dropout=0.0).eval()
    x = torch.randn(2, 4, 8)
    x[1, 0] = 0
    valid = torch.tensor([[True] * 4, [False, True, True, True]])
    got = enc.user_state(x, valid)
    shifted = torch.cat([x[:, 1:], enc.mask_token.detach().expand(2, 1, 8)], 1)
    want = enc(shifted, torch.ones(2, 4, dtype=torch.bool))[:, -1]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    x2 = x.clone()
    x2[0, 0] = torch.randn(8)  # the oldest item leaves the window: no effect
    torch.testing.assert_close(enc.user_state(x2, valid), got, rtol=0, atol=1e-6)
    with torch.no_grad():
        enc.mask_token.add_(1.0)
    assert (enc.user_state(x, valid) - got).abs().max() > 1e-3
    # bidirectional: a masked middle position sees the items after it
    masked = torch.tensor([[False, True, False, False]] * 2)
    h = enc(x, torch.ones(2, 4, dtype=torch.bool), masked)
    x3 = x.clone()
    x3[:, 3] += 1.0
    assert (enc(x3, torch.ones(2, 4, dtype=torch.bool), masked)[:, 1] - h[:, 1]).abs().max() > 1e-4


# ----------------------------------------------------------------------------- learning

N_ITEMS, N_USERS = 40, 120
# random ranking of 40 items: NDCG@10 = (1/40) * sum_{r=1..10} 1/log2(r+1) = 0.114
RANDOM_NDCG10 = sum(1 / math.log2(r + 1) for r in range(1, 11)) / N_ITEMS


def _write_prepare(folder):
    """Users walk a cycle (item i -> i+1 mod 40); the last item of each walk is the valid target."""
    rng = np.random.default_rng(0)
    train, hist, tgt = [], [], []
    for _ in range(N_USERS):
        start, length = rng.integers(N_ITEMS), rng.integers(6, 14)
        walk = [(start + t) % N_ITEMS for t in range(length)]
        train.append(walk[:-1])
        hist.append(walk[:-1])
        tgt.append(walk[-1])
    users = pa.array(range(N_USERS), pa.int32())
    pq.write_table(pa.table({"user_idx": users, "items": pa.array(train, pa.list_(pa.int32()))}),
                   folder / "train.parquet")
    pq.write_table(pa.table({"user_idx": users, "history": pa.array(hist, pa.list_(pa.int32())),
                             "target": pa.array(tgt, pa.int32())}), folder / "valid.parquet")


@pytest.fixture(scope="module")
def prepare_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prepare")
    _write_prepare(folder)
    return folder


@pytest.fixture
def one_thread():
    """Tiny models on a shared 2-core machine: one torch thread is faster and a better neighbour."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _train_cfg(backbone, loss, *extra):
    return load_config(None, [
        "method=sasrec_id", "train.backend=torch", "train.num_workers=1", f"model.backbone={backbone}",
        f"train.loss={loss}", "model.dim=32", "model.id_dims=16", "model.max_len=8", "model.dropout=0.0",
        "train.batch_size=32", "train.epochs=12", "train.patience=12", "train.num_negatives=16", "train.lr=0.01",
        "train.id_lr=0.1", "train.log_every=0", "eval.ks=[10]", *extra])


@pytest.mark.parametrize("backbone, loss, extra", [
    ("sasrec", "infonce", ()),
    ("sasrec", "bce", ()),
    ("sasrec", "full_ce", ()),
    ("gru4rec", "infonce", ()),
    ("gru4rec", "bce", ()),
    ("gru4rec", "full_ce", ("train.ce_chunk=16",)),
    # Cloze training scores ~1-2 masked positions per window: more steps to converge
    ("bert4rec", "infonce", ("train.epochs=20",)),
    ("bert4rec", "bce", ("train.epochs=20",)),
    ("bert4rec", "full_ce", ("train.epochs=20",)),
    ("sasrec", "infonce", ("train.negatives=per_sequence", "train.negative_sampler=popularity", "train.logq=true")),
    ("bert4rec", "bce", ("train.negatives=per_sequence", "train.logq=true", "train.epochs=20")),
])
def test_backbone_and_loss_learn_the_cycle(backbone, loss, extra, prepare_dir, tmp_path, one_thread):
    cfg = _train_cfg(backbone, loss, *extra)
    result = train_model(cfg, TrainInputs(str(prepare_dir), None, N_ITEMS), log=lambda s: None)
    losses = [row["loss"] for row in result.history]
    assert losses[-1] < 0.8 * losses[0], losses
    assert result.best_metric > max(0.5, 4 * RANDOM_NDCG10), (result.best_metric, RANDOM_NDCG10)
    # the evaluate stage rebuilds the same encoder from the config and reproduces the metric
    save_model(tmp_path, result)
    table, encoder = load_model(tmp_path / "model.safetensors", cfg)
    assert type(encoder).__name__ == {"sasrec": "SASRecEncoder", "gru4rec": "GRU4RecEncoder",
                                      "bert4rec": "BERT4RecEncoder"}[backbone]
    _, hist, tgt = eval_inputs(prepare_dir / "valid.parquet", 8, N_ITEMS)
    with torch.no_grad():
        states = user_states_from_table(encoder, table, torch.as_tensor(hist))
    ranks = target_ranks(states, table, torch.as_tensor(tgt), similarity="cosine")
    assert abs(metrics_from_ranks(ranks, [10])["NDCG@10"] - result.best_metric) < 1e-5


# ----------------------------------------------------------------------------- 2 workers = 1 process

PARITY_CASES = (("sasrec", "infonce", "train.negatives=per_sequence"), ("bert4rec", "bce", "train.negatives=shared"))


def _parity_cfg(backbone, loss, negatives, workers):
    return _train_cfg(backbone, loss, negatives, "train.epochs=2", f"train.num_workers={workers}")


def _parity_train(prepare, workers):
    results = [train_model(_parity_cfg(*case, workers), TrainInputs(prepare, None, N_ITEMS), log=lambda s: None)
               for case in PARITY_CASES]
    return [(r.history, r.item_table) for r in results]


def test_two_torch_workers_equal_one_process(prepare_dir, one_thread):
    """Per-sequence negatives and bert4rec's masks are drawn for the whole batch, and the loss is
    normalised by the global count: 2 DDP workers train exactly what 1 process trains."""
    got = on_workers(_parity_train, 2, str(prepare_dir), 2)
    for case, (history, table) in zip(PARITY_CASES, got):
        ref = train_model(_parity_cfg(*case, 1), TrainInputs(str(prepare_dir), None, N_ITEMS), log=lambda s: None)
        assert len(history) == 2
        for a, b in zip(history, ref.history):
            assert abs(a["loss"] - b["loss"]) < 1e-5, (case, a, b)
            assert abs(a["val_NDCG@10"] - b["val_NDCG@10"]) < 1e-5, (case, a, b)
        torch.testing.assert_close(table, ref.item_table, rtol=1e-5, atol=1e-5)
        assert history[-1]["loss"] < history[0]["loss"]


# ----------------------------------------------------------------------------- TorchRec, 2 workers

TR_CASES = (("gru4rec", "full_ce", "shared"), ("bert4rec", "bce", "per_sequence"))
TR_B, TR_STEPS, TR_K = 8, 3, 5


def _tr_cfg(backend, backbone, loss, negatives):
    return load_config(None, [f"train.backend={backend}", "method=alphafuse", f"model.backbone={backbone}",
                              f"train.loss={loss}", f"train.negatives={negatives}", f"model.dim={D}",
                              "model.id_dims=8", "model.dropout=0.0", f"model.max_len={L}", "train.ce_chunk=7",
                              "model.id_init=normal", "model.id_init_std=0.1", f"train.batch_size={TR_B}",
                              f"train.num_negatives={TR_K}", "train.lr=0.01", "train.weight_decay=0",
                              "train.id_optimizer=adagrad", "train.id_lr=0.1", "train.log_every=0"])


def _tr_semantic():
    return torch.randn(N_ITEMS, D, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def tr_inputs(prepare_dir, tmp_path_factory):
    """The cycle's prepared folder and a random semantic table [N_ITEMS, D] for alphafuse."""
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("semantic") / "semantic.safetensors"
    save_file({"semantic": _tr_semantic()}, str(path))
    return TrainInputs(str(prepare_dir), str(path), N_ITEMS)


def _tr_train(backend, inputs):
    """Each case's first TR_STEPS recipe steps on this worker (per-sequence negatives and
    bert4rec's masks drawn by the recipe for the whole batch); the losses and the trained table."""
    out = []
    for case in TR_CASES:
        recipe, losses, _ = recipe_steps(_tr_cfg(backend, *case), inputs, steps=TR_STEPS)
        out.append((losses, recipe.net.items.full_table()))
    return out


def test_torchrec_two_workers_equal_one_process_for_new_backbones_and_losses(tr_inputs, one_thread):
    """full_ce's whole-catalogue lookup, per-sequence negatives and bert4rec's masks under
    TorchRec row-wise sharding (fused Adagrad) equal plain torch in one process."""
    got = on_workers(_tr_train, 2, "torchrec", tr_inputs)
    ref = _tr_train("torch", tr_inputs)
    for case, (losses, table), (ref_losses, ref_table) in zip(TR_CASES, got, ref, strict=True):
        assert len(losses) == TR_STEPS, case
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-5, msg=str(case))
        torch.testing.assert_close(table, ref_table, rtol=1e-5, atol=1e-5, msg=str(case))
        # training moved the ID rows: the test does not compare two untouched tables
        untouched = build_model(_tr_cfg("torch", *case), N_ITEMS, _tr_semantic(), torch.device("cpu")).items.full_table()
        assert (table - untouched).abs().max() > 1e-3, case
