"""A stage's identity: its code fingerprint in the manifest, the Ray Train run keyed by the train
stage's full identity (config, inputs' digests, code), and ``--force``."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from alphafuse_dist import pipeline
from alphafuse_dist.cli import main
from alphafuse_dist.config import load_config
from alphafuse_dist.runtime import manifest
from alphafuse_dist.runtime.manifest import STAGE_SOURCES, code_fingerprint, read_manifest, run_stage, stage_kind
from alphafuse_dist.train.launch import ray_run_name, remove_stale_runs

INPUTS = {"prepare": "p1", "decompose": "d1"}


def _name(cfg, inputs=INPUTS) -> str:
    return ray_run_name(cfg, pipeline.train_identity(cfg, inputs))


# ----------------------------------------------------------------------------- code fingerprint
def test_code_fingerprint_covers_the_stage_sources():
    assert stage_kind("train-alphafuse-s1") == "train" and stage_kind("prepare") == "prepare"
    prints = {kind: code_fingerprint(kind) for kind in STAGE_SOURCES}
    assert len(set(prints.values())) == len(prints)  # each kind hashes its own files
    assert all(len(p) == 16 for p in prints.values())
    assert code_fingerprint("train") == code_fingerprint("train")


def test_manifest_holds_the_code_fingerprint_and_a_changed_one_reruns(tmp_path, monkeypatch):
    calls = []

    def build(tmp: Path) -> dict:
        calls.append(tmp)
        (tmp / "out.txt").write_text("x")
        return {}

    out = run_stage(tmp_path, "prepare", config_hash="a", inputs={}, build=build)
    m = read_manifest(out)
    assert m["code_version"] == code_fingerprint("prepare") and "package_version" in m
    run_stage(tmp_path, "prepare", config_hash="a", inputs={}, build=build)
    assert len(calls) == 1  # same fingerprint: skipped
    monkeypatch.setattr(manifest, "code_fingerprint", lambda kind: "0" * 16)
    run_stage(tmp_path, "prepare", config_hash="a", inputs={}, build=build)
    assert len(calls) == 2 and read_manifest(out)["code_version"] == "0" * 16
    run_stage(tmp_path, "prepare", config_hash="a", inputs={}, build=build)
    assert len(calls) == 2
    run_stage(tmp_path, "prepare", config_hash="a", inputs={}, build=build, force=True)
    assert len(calls) == 3


def test_the_fingerprint_follows_the_stage_kind(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(manifest, "code_fingerprint", lambda kind: seen.append(kind) or kind.ljust(16, "0"))
    run_stage(tmp_path, "train-alphafuse-s3", config_hash="a", inputs={}, build=lambda tmp: {})
    run_stage(tmp_path, "my-export", config_hash="a", inputs={}, build=lambda tmp: {}, kind="export")
    assert seen == ["train", "export"]


# ----------------------------------------------------------------------------- Ray Train run name
def test_train_run_name_follows_inputs_code_and_output_changing_config(monkeypatch):
    cfg = load_config("quickstart")
    name = _name(cfg)
    assert name.startswith(f"train-{cfg.method}-s{cfg.seed}-") and _name(cfg) == name
    # an upstream stage's digest
    assert _name(cfg, INPUTS | {"prepare": "p2"}) != name
    assert _name(cfg, INPUTS | {"warm_start": "w"}) != name
    # a config key that changes the model
    assert _name(load_config("quickstart", ["train.lr=0.02"])) != name
    # keys that leave the output unchanged
    quiet = load_config("quickstart", ["train.log_every=7", "train.timeout_s=30", "train.max_failures=3"])
    assert _name(quiet) == name
    assert pipeline.train_config_hash(quiet) == pipeline.train_config_hash(cfg)
    # the train code's fingerprint
    monkeypatch.setattr(manifest, "code_fingerprint", lambda kind: "f" * 16 if kind == "train" else "0" * 16)
    assert _name(cfg) != name


def test_stale_ray_train_runs_are_removed(tmp_path):
    cfg = load_config("quickstart", ["seed=1"])
    keep = ray_run_name(cfg, "a" * 16)
    for run in (keep, ray_run_name(cfg, "b" * 16), "train-alphafuse-s12-cccc", "train-sasrec_id-s1-dddd"):
        (tmp_path / run / "checkpoint_000001").mkdir(parents=True)
    remove_stale_runs(tmp_path, cfg, keep)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([keep, "train-alphafuse-s12-cccc",
                                                                 "train-sasrec_id-s1-dddd"])
    remove_stale_runs(tmp_path / "missing", cfg, keep)  # no storage yet: nothing to do


# ----------------------------------------------------------------------------- --force
@pytest.mark.parametrize("argv, message", [
    (["run", "--force", "trian"], "--force: unknown stage(s) trian (stages: prepare, embed, decompose, train, evaluate)"),
    (["run", "--stages", "prepare", "--force", "train"], "--force: stage(s) train not among the stages that run (prepare)"),
    (["compare", "--force", "prepare,bogus"], "--force: unknown stage(s) bogus (stages: "),
])
def test_force_errors_are_one_line_with_exit_code_2(argv, message, capsys, tmp_path):
    assert main(argv + [f"run_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"alphafuse: error: {message}")
    assert list(tmp_path.iterdir()) == []


def _fake_stages(monkeypatch, calls: list) -> None:
    def fake(name):
        def stage(cfg, force=False):
            calls.append((name, cfg.method, cfg.seed, force))
            if name == "evaluate":
                out = cfg.run_path / f"evaluate-{cfg.method}-s{cfg.seed}"
                out.mkdir(parents=True, exist_ok=True)
                (out / "metrics.json").write_text(json.dumps({"NDCG@10": 0.1}))
        return stage

    for name in pipeline.STAGES:
        monkeypatch.setattr(pipeline, f"{name}_stage", fake(name))


def test_run_forces_the_named_stages(tmp_path, monkeypatch):
    calls = []
    _fake_stages(monkeypatch, calls)
    cfg = load_config("quickstart", [f"run_dir={tmp_path}", "method=alphafuse"])
    pipeline.run_pipeline(cfg, force=("embed", "train"))
    assert [(n, f) for n, _, _, f in calls] == [("prepare", False), ("embed", True), ("decompose", False),
                                                ("train", True), ("evaluate", False)]


def test_compare_forces_shared_stages_once_and_per_run_stages_every_run(tmp_path, monkeypatch):
    calls = []
    _fake_stages(monkeypatch, calls)
    cfg = load_config("quickstart", [f"run_dir={tmp_path}"])
    pipeline.compare(cfg, ["sasrec_id", "alphafuse"], [1, 2], force=("prepare", "decompose", "train"))
    forced = [(n, m, s) for n, m, s, f in calls if f]
    assert forced == [("prepare", "sasrec_id", 1), ("train", "sasrec_id", 1), ("train", "sasrec_id", 2),
                      ("decompose", "alphafuse", 1), ("train", "alphafuse", 1), ("train", "alphafuse", 2)]


def test_embedding_cache_namespace_follows_the_encoder_source(monkeypatch):
    from alphafuse_dist.config import EmbedConfig
    from alphafuse_dist.embed import job

    before = job.cache_settings(EmbedConfig(), "cpu")
    assert before["code"] == manifest.source_fingerprint("embed/encoder.py")
    monkeypatch.setattr(job, "source_fingerprint", lambda *sources: "e" * 16)
    assert job.cache_settings(EmbedConfig(), "cpu") != before
