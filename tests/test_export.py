"""Export and recommend (alphafuse_dist.serve): the torch.export encoder + exported vectors score as the
library does, retired items are never served, recommend's contract and errors, the model card, and
a failed export leaves the previous one untouched.

The run directory is real up to prepare (tests/test_methods.py's cycle data set, smaller); the
train stages hold untrained models of known weights (one per backbone), so the tests need no
training and run in seconds."""
from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from alphafuse_dist import __version__, cli
from alphafuse_dist.config import load_config
from alphafuse_dist.errors import AlphaFuseError, ConfigError, DataError
from alphafuse_dist.evaluate.stage import load_model
from alphafuse_dist.model.backbones import build_encoder
from alphafuse_dist.model.sasrec import user_states_from_table
from alphafuse_dist.serve import export as export_mod
from alphafuse_dist.serve.export import export_run
from alphafuse_dist.serve.recommend import Recommender, recommend
from alphafuse_dist.runtime.manifest import read_manifest, run_stage

N_ITEMS, N_USERS, D, DN, L = 30, 40, 16, 8, 6
# seed -> (backbone, similarity): every backbone, both score rules
MODELS = {1: ("sasrec", "cosine"), 2: ("gru4rec", "dot"), 3: ("bert4rec", "cosine")}
H0 = ["m3", "m4", "m5", "m6"]  # the history whose library top-1 item is retired by the fixture


def _cfg(run_dir, root, seed=1, backbone="sasrec", similarity="cosine"):
    return load_config(None, [
        "data.source=interactions", f"data.path={root / 'inter.csv'}", f"data.items_path={root / 'items.csv'}",
        "data.text_template={title}", f"run_dir={run_dir}", f"seed={seed}", f"model.backbone={backbone}",
        f"model.similarity={similarity}", f"model.dim={D}", f"model.id_dims={DN}", f"model.max_len={L}",
        "model.num_blocks=2", "model.num_heads=2"])


def _library_scores(run_dir, seed, histories: list[list[int]]) -> torch.Tensor:
    """[B, N] float64 scores by the evaluation's path: user_states_from_table + the similarity rule."""
    cfg = json.loads((run_dir / f"train-alphafuse-s{seed}" / "config.json").read_text())
    from alphafuse_dist.config import config_from_dict

    cfg = config_from_dict(cfg)
    table, encoder = load_model(run_dir / f"train-alphafuse-s{seed}" / "model.safetensors", cfg)
    N = table.shape[0]
    seqs = torch.full((len(histories), L), N, dtype=torch.long)
    for i, h in enumerate(histories):
        last = torch.tensor(h[-L:])
        seqs[i, L - len(last):] = last
    with torch.no_grad():
        users = user_states_from_table(encoder, table, seqs).double()
    items = table.double()
    if cfg.model.similarity == "cosine":
        users, items = F.normalize(users, dim=1), F.normalize(items, dim=1)
    return users @ items.T


@pytest.fixture(scope="module")
def run(tmp_path_factory, write_cycle_data):
    """(run_dir, item_id -> item_idx, retired item ids)."""
    from alphafuse_dist.pipeline import prepare_stage

    root = tmp_path_factory.mktemp("export")
    rng = np.random.default_rng(0)
    write_cycle_data(root, N_USERS, N_ITEMS, (4, 10), rng)
    run_dir = root / "run"
    prep = prepare_stage(_cfg(run_dir, root))
    items = pq.read_table(prep / "items.parquet")
    N = items.num_rows
    index = dict(zip(items.column("item_id").to_pylist(), items.column("item_idx").to_pylist()))

    for seed, (backbone, similarity) in MODELS.items():
        cfg = _cfg(run_dir, root, seed, backbone, similarity)
        torch.manual_seed(seed)
        encoder = build_encoder(cfg.model)
        with torch.no_grad():  # LayerNorm affine away from (1, 0), so that every weight matters
            for name, p in encoder.named_parameters():
                if name.endswith(("ln.weight", "ln1.weight", "ln2.weight")):
                    p.add_(0.3 * torch.randn_like(p))
        # rows of very different norms: cosine and dot rank them differently
        table = torch.randn(N, D) * torch.linspace(0.2, 3.0, N).unsqueeze(1)
        tensors = {"item_table": table.float().contiguous(),
                   **{f"encoder.{k}": v.contiguous() for k, v in encoder.state_dict().items()}}

        def build(tmp, cfg=cfg, tensors=tensors):
            (tmp / "config.json").write_text(json.dumps(cfg.to_dict()))
            save_file(tensors, str(tmp / "model.safetensors"))
            (tmp / "history.json").write_text(json.dumps({"best_epoch": 3, "best_val_ndcg10": 0.25,
                                                          "epochs": [{"epoch": e} for e in range(1, 6)]}))
            return {}

        run_stage(run_dir, f"train-alphafuse-s{seed}", config_hash="test", inputs={}, build=build)

    def evaluate(tmp):
        (tmp / "metrics.json").write_text(json.dumps({
            "split": "test", "protocol": "full", "history_masked": False, "data_split": "leave_one_out",
            "metrics": {"overall": {"HR@10": 0.5, "NDCG@10": 0.123, "MRR@10": 0.1, "users": N_USERS}}}))
        return {}

    def decompose(tmp):
        # the count rule: d_null comes from the trained config's model.id_dims
        (tmp / "basis.json").write_text(json.dumps({"d": D, "d_null": None, "d_l": 20, "whiten": True,
                                                    "scale": 1.0, "format_version": 1}))
        cumulative = [(k + 1) / 20 for k in range(20)]
        (tmp / "spectrum.json").write_text(json.dumps({"cumulative_explained_variance": cumulative}))
        return {}

    run_stage(run_dir, "evaluate-alphafuse-s1", config_hash="test", inputs={}, build=evaluate)
    run_stage(run_dir, "decompose", config_hash="test", inputs={}, build=decompose)

    # retire the library's best item for H0 (model seed 1) and one more
    best = int(_library_scores(run_dir, 1, [[index[i] for i in H0]])[0].argmax())
    ids_by_idx = {v: k for k, v in index.items()}
    retired = {ids_by_idx[best], "m20" if ids_by_idx[best] != "m20" else "m21"}
    flags = pc.is_in(items.column("item_id"), value_set=pa.array(sorted(retired)))
    items = items.set_column(items.column_names.index("retired"), "retired", flags)

    def retire(tmp):  # prepare again, with those items retired (a stage's files are never edited in place)
        for f in prep.iterdir():
            if f.name != "manifest.json":
                shutil.copy2(f, tmp / f.name)
        pq.write_table(items, tmp / "items.parquet")
        return {"rows": read_manifest(prep)["rows"]}

    run_stage(run_dir, "prepare", config_hash="retired", inputs={}, build=retire, force=True)
    return run_dir, index, retired


def _exported(folder):
    """(item_idx -> vector row of either Parquet file, servable item_idx array, servable vectors [M, d])."""
    servable = pq.read_table(folder / "items.parquet")
    retired = pq.read_table(folder / "retired_items.parquet")
    lookup = {}
    for t in (servable, retired):
        vecs = np.asarray(t.column("vector").to_pylist(), dtype=np.float32).reshape(t.num_rows, D)
        lookup.update(zip(t.column("item_idx").to_pylist(), vecs))
    idx = np.array(servable.column("item_idx").to_numpy())
    return lookup, idx, torch.from_numpy(np.stack([lookup[i] for i in idx]))


@pytest.mark.parametrize("seed", sorted(MODELS))
def test_exported_encoder_and_vectors_score_like_the_library(run, seed):
    run_dir, index, retired = run
    folder = export_run(run_dir, "alphafuse", seed)
    assert folder == run_dir / f"export-alphafuse-s{seed}" and read_manifest(folder) is not None
    schema = pq.read_schema(folder / "items.parquet")
    assert schema.field("item_idx").type == pa.int32() and schema.field("item_id").type == pa.string()
    assert schema.field("vector").type == pa.list_(pa.float32(), D)
    lookup, servable_idx, vectors = _exported(folder)
    encoder = torch.export.load(str(folder / "user_encoder.pt2")).module()

    g = np.random.default_rng(seed)
    N = len(index)
    # short (padded), exactly L, longer than L (cut); one holds a retired item as an input
    histories = [list(g.integers(0, N, n)) for n in (1, 2, L - 1, L, L + 3)]
    histories.append([index[H0[0]], index[min(retired)], index[H0[1]]])
    library = _library_scores(run_dir, seed, histories)[:, servable_idx]

    # (1) the serving contract: left-padded to max_len in one batch
    x = torch.zeros(len(histories), L, D)
    valid = torch.zeros(len(histories), L, dtype=torch.bool)
    for i, h in enumerate(histories):
        rows = h[-L:]
        x[i, L - len(rows):] = torch.from_numpy(np.stack([lookup[j] for j in rows]))
        valid[i, L - len(rows):] = True
    with torch.no_grad():
        users = encoder(x, valid)
    served = users.double() @ vectors.double().T
    assert library.std() > 1e-2  # the scores carry information
    assert (served - library).abs().max() < 1e-5
    if MODELS[seed][1] == "cosine":
        assert torch.allclose(users.norm(dim=1), torch.ones(len(histories)), atol=1e-5)
        assert torch.allclose(vectors.norm(dim=1), torch.ones(len(vectors)), atol=1e-5)
    # (2) the batch dimension is dynamic: one user at a time, and a batch of 13 (rows repeated)
    for i in range(len(histories)):
        with torch.no_grad():
            ui = encoder(x[i:i + 1], valid[i:i + 1])
        assert (ui.double() @ vectors.double().T - library[i]).abs().max() < 1e-5
    with torch.no_grad():
        big = encoder(x.repeat(3, 1, 1)[:13], valid.repeat(3, 1)[:13])
    assert (big.double() @ vectors.double().T - library.repeat(3, 1)[:13]).abs().max() < 1e-5
    with pytest.raises(Exception):  # the history length is the contract's max_len
        encoder(x[:, 1:], valid[:, 1:])

    card = json.loads((folder / "model_card.json").read_text())
    assert card["serving"]["history_input_column"] == "vector"
    assert card["serving"]["self_check_max_abs_score_error"] < 1e-5


def test_encoder_loads_without_the_package(run, tmp_path):
    """torch.export.load alone, in a fresh interpreter that never imports alphafuse_dist."""
    run_dir, index, _ = run
    folder = export_run(run_dir, "alphafuse", 3)  # bert4rec: the most involved user_state
    lookup, _, _ = _exported(folder)
    x = torch.zeros(2, L, D)
    x[:, L - len(H0):] = torch.from_numpy(np.stack([lookup[index[i]] for i in H0]))
    valid = torch.zeros(2, L, dtype=torch.bool)
    valid[0, L - len(H0):] = True
    valid[1, L - len(H0) + 2:] = True
    torch.save({"x": x, "valid": valid}, tmp_path / "inputs.pt")
    code = ("import sys, torch; m = torch.export.load(sys.argv[1]).module(); d = torch.load(sys.argv[2]); "
            "torch.save(m(d['x'], d['valid']), sys.argv[3]); "
            "assert not any(k.startswith('alphafuse_dist') for k in sys.modules), 'imported the package'")
    subprocess.run([sys.executable, "-c", code, str(folder / "user_encoder.pt2"), str(tmp_path / "inputs.pt"),
                    str(tmp_path / "out.pt")], check=True, cwd=tmp_path, timeout=120)
    with torch.no_grad():
        expected = torch.export.load(str(folder / "user_encoder.pt2")).module()(x, valid)
    assert torch.equal(torch.load(tmp_path / "out.pt"), expected)


def test_retired_items_are_not_exported_nor_recommended(run):
    run_dir, index, retired = run
    folder = export_run(run_dir, "alphafuse", 1)
    exported = set(pq.read_table(folder / "items.parquet").column("item_id").to_pylist())
    kept_aside = set(pq.read_table(folder / "retired_items.parquet").column("item_id").to_pylist())
    assert kept_aside == retired and not exported & retired and exported | retired == set(index)
    card = json.loads((folder / "model_card.json").read_text())
    assert card["items"] == {"exported": len(index) - 2, "retired": 2, "total": len(index)}

    library = _library_scores(run_dir, 1, [[index[i] for i in H0]])[0]
    ids_by_idx = {v: k for k, v in index.items()}
    assert ids_by_idx[int(library.argmax())] in retired  # the fixture made the best item a retired one
    everything = recommend(run_dir, H0, k=len(index), seed=1)
    assert len(everything) == len(index) - 2 and not {r["item_id"] for r in everything} & retired
    best_servable = max((i for i in index if i not in retired), key=lambda i: float(library[index[i]]))
    assert everything[0]["item_id"] == best_servable
    # a retired item in the history is a valid input, and still never comes back
    top = recommend(run_dir, H0 + sorted(retired), k=5, seed=1)
    assert len(top) == 5 and not {r["item_id"] for r in top} & retired
    # configurable: serve them too (a separate export folder; the default export is untouched)
    served = export_run(run_dir, "alphafuse", 1, tmp_out := run_dir / "export-with-retired", serve_retired=True)
    assert set(pq.read_table(served / "items.parquet").column("item_id").to_pylist()) == set(index)
    assert pq.read_table(served / "retired_items.parquet").num_rows == 0 and tmp_out == served
    assert recommend(served, H0, k=1)[0]["item_id"] == ids_by_idx[int(library.argmax())]


def test_recommend_top_k_titles_determinism_and_errors(run, caplog):
    run_dir, index, retired = run
    out = recommend(run_dir, H0, k=5, seed=1)
    assert [r["rank"] for r in out] == [1, 2, 3, 4, 5]
    assert all(r["title"] == f"Item {r['item_id'][1:]}" for r in out)
    scores = [r["score"] for r in out]
    assert scores == sorted(scores, reverse=True)
    # the library's top 5 among servable items, same scores
    library = _library_scores(run_dir, 1, [[index[i] for i in H0]])[0]
    ranked = sorted((i for i in index if i not in retired), key=lambda i: (-float(library[index[i]]), index[i]))
    assert [r["item_id"] for r in out] == ranked[:5]
    assert np.allclose(scores, [float(library[index[i]]) for i in ranked[:5]], atol=1e-5)
    # deterministic, and the same from the export folder
    assert recommend(run_dir, H0, k=5, seed=1) == out
    assert recommend(run_dir / "export-alphafuse-s1", H0, k=5) == out
    # longer than max_len: the last L items decide
    long = [f"m{i}" for i in range(10, 10 + L + 4)]
    assert recommend(run_dir, long, k=5, seed=1) == recommend(run_dir, long[-L:], k=5, seed=1)
    # exclude_history
    masked = recommend(run_dir, H0, k=5, seed=1, exclude_history=True)
    assert len(masked) == 5 and not {r["item_id"] for r in masked} & set(H0)
    assert [r["item_id"] for r in masked] == [i for i in ranked if i not in H0][:5]

    # unknown ids without text are left out with a warning; none known at all is an error
    with caplog.at_level(logging.WARNING, logger="alphafuse_dist"):
        kept = recommend(run_dir, ["m1", "nope", "m3", "m999"], k=5, seed=1)
    assert kept == recommend(run_dir, ["m1", "m3"], k=5, seed=1)
    assert "left out 2 unknown item(s) 'nope', 'm999'" in caplog.text
    with pytest.raises(DataError, match="no known item in the history: 'nope', 'm999'"):
        recommend(run_dir, ["nope", "m999"], k=5, seed=1)
    # an item's title (the text returned) stands for it in a history
    assert recommend(run_dir, ["Item 3", "m4"], k=5, seed=1) == recommend(run_dir, ["m3", "m4"], k=5, seed=1)
    with pytest.raises(ConfigError, match="empty"):
        recommend(run_dir, [], k=5, seed=1)
    with pytest.raises(ConfigError, match="k=0"):
        recommend(run_dir, H0, k=0, seed=1)
    with pytest.raises(ConfigError, match="seeds 1, 2, 3"):  # several models of the method: pick one
        recommend(run_dir, H0, k=5)
    with pytest.raises(AlphaFuseError, match="train-alphafuse-s9.*finished: train-alphafuse-s1"):
        recommend(run_dir, H0, k=5, seed=9)


def test_model_card(run):
    run_dir, index, _ = run
    folder = export_run(run_dir, "alphafuse", 1)
    card = json.loads((folder / "model_card.json").read_text())
    assert (card["method"], card["seed"], card["code_version"]) == ("alphafuse", 1, __version__)
    assert card["config"]["model"]["backbone"] == "sasrec" and card["model"]["max_len"] == L
    assert card["training"] == {"best_epoch": 3, "best_val_ndcg10": 0.25, "epochs_run": 5}
    assert card["test_metrics"]["metrics"]["overall"]["NDCG@10"] == 0.123
    assert card["basis"]["d_null"] == DN and card["basis"]["d_semantic"] == D - DN
    assert card["basis"]["explained_variance_kept"] == D / 20
    assert card["basis"]["explained_variance_semantic"] == (D - DN) / 20
    assert card["data_window"]["rows"]["items"] == len(index)
    # the fixture's decompose stage holds no basis: no text-only items, and the card says why
    assert card["text_items"] == {"supported": False, "reason": f"no finished decompose stage with "
                                  f"basis.safetensors in {run_dir / 'decompose'}"}
    assert set(card["files"]) >= {"items.parquet", "retired_items.parquet", "user_encoder.pt2"}
    md = (folder / "model_card.md").read_text()
    assert "best epoch 3 of 5" in md and "| overall |" in md and "0.1230" in md


def test_failed_export_leaves_the_previous_one_intact(run, monkeypatch, tmp_path, caplog):
    run_dir, _, _ = run
    folder = export_run(run_dir, "alphafuse", 2)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(export_mod, "_write_model_card", broken)  # after the vectors and the encoder
    with pytest.raises(RuntimeError, match="disk full"):
        export_run(run_dir, "alphafuse", 2, force=True)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".export")]
    fresh = tmp_path / "new-export"
    with pytest.raises(RuntimeError, match="disk full"):
        export_run(run_dir, "alphafuse", 2, out_dir=fresh)
    assert not fresh.exists() and list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    # the intact export is still current: a rerun skips it, recommend serves from it
    caplog.set_level(logging.INFO, logger="alphafuse_dist")
    assert export_run(run_dir, "alphafuse", 2) == folder
    assert any("up to date" in line for line in caplog.messages)
    assert len(Recommender(folder).recommend(H0, k=3)) == 3


def test_cli_helpers(run, tmp_path, capsys):
    run_dir, _, _ = run
    assert cli.main(["export", "--run", str(run_dir), "--seed", "1", "--to", str(tmp_path / "exp")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "exp")
    assert cli.main(["recommend", "--run", str(tmp_path / "exp"), "--history", " m3, m4,m5 ", "--k", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["rank", "item_id", "score", "title"] and len(lines) == 5
    assert lines[2].split()[0] == "1" and "Item" in lines[2]
    assert cli.main(["recommend", "--run", str(run_dir), "--seed", "1", "--history", "m3,zz9", "--json"]) == 0
    assert "left out 1 unknown item(s) 'zz9'" in capsys.readouterr().err
    assert cli.main(["recommend", "--run", str(run_dir), "--seed", "1", "--history", "zz9"]) == 2
    assert "no known item in the history: 'zz9'" in capsys.readouterr().err
    assert cli.main(["export", "--run", str(tmp_path / "missing")]) == 2
    assert "no such directory" in capsys.readouterr().err
    # the same history as repeated --item flags and as a JSON list
    table = None
    for args in (["--item", "m3", "--item", "m4", "--item", "m5"], ["--history", '["m3", "m4", "m5"]'],
                 ["--history", "m3,m4,m5"]):
        assert cli.main(["recommend", "--run", str(tmp_path / "exp"), *args, "--k", "3", "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert table is None or out == table
        table = out
    assert cli.main(["recommend", "--run", str(tmp_path / "exp"), "--history", '["m3", ']) == 2
    assert capsys.readouterr().err.startswith("alphafuse: error: --history: not a JSON list of item ids")


def test_cli_serves_a_registry_latest_run(run, tmp_path, capsys):
    from alphafuse_dist.retrain.registry import Registry

    run_dir, _, _ = run
    registry = Registry(tmp_path / "registry")
    registry.register("p1", run_dir, data_window={"start": 0, "end": 1}, metrics={})
    assert cli.main(["recommend", "--run", str(registry.root), "--seed", "1", "--item", "m3", "--k", "2"]) == 2
    assert capsys.readouterr().err == (f"alphafuse: error: --run {registry.root}: a registry with no promoted run yet "
                                       "(no LATEST); run alphafuse retrain first or pass a run directory\n")
    assert cli.main(["serve", "--export", str(registry.root)]) == 2  # resolved before any server starts
    assert capsys.readouterr().err.startswith(f"alphafuse: error: --export {registry.root}: a registry with no "
                                              "promoted run yet")
    assert cli.main(["serve", "--export", str(tmp_path / "missing")]) == 2
    assert "no such directory" in capsys.readouterr().err
    registry.promote("p1", "test")
    assert cli.main(["recommend", "--run", str(registry.root), "--seed", "1", "--item", "m3", "--k", "2",
                     "--json"]) == 0
    direct = recommend(run_dir, ["m3"], k=2, seed=1)
    assert json.loads(capsys.readouterr().out) == direct


def test_recommend_refuses_an_altered_or_escaping_export(run, tmp_path):
    """The model card's sha256 of each file is checked before reading it (a loaded program runs code),
    and file names in the card must stay inside the export folder."""
    import shutil

    from alphafuse_dist.serve.recommend import Recommender

    run_dir, _, _ = run
    folder = tmp_path / "export"
    shutil.copytree(export_run(run_dir, "alphafuse", 1), folder)
    assert Recommender(folder).num_candidates > 0
    card_path = folder / "model_card.json"
    card = json.loads(card_path.read_text())

    encoder = folder / "user_encoder.pt2"
    original = encoder.read_bytes()
    encoder.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    with pytest.raises(DataError) as e:
        Recommender(folder)
    assert str(e.value) == (f"file {encoder}: sha256 differs from the model card's: the export was altered or "
                            "damaged; export again")
    encoder.write_bytes(original)

    for name, message in (("../../etc/passwd", "is not a plain file name inside the export"),
                          ("notes.txt", "is not listed under 'files' with its sha256")):
        altered = json.loads(json.dumps(card))
        altered["serving"]["encoder_file"] = name
        card_path.write_text(json.dumps(altered))
        with pytest.raises(DataError, match=re.escape(message)):
            Recommender(folder)
    card_path.write_text(json.dumps(card))
    assert Recommender(folder).num_candidates > 0


def test_an_export_that_does_not_score_like_the_library_is_refused(run, monkeypatch, tmp_path):
    run_dir, _, _ = run
    monkeypatch.setattr(export_mod, "SELF_CHECK_TOLERANCE", -1.0)  # any error is now too large
    with pytest.raises(AlphaFuseError, match="exported encoder's scores differ from the library's"):
        export_run(run_dir, "alphafuse", 2, out_dir=tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
