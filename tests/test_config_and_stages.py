"""Configs (presets, overrides, key errors), stage manifests (skip, atomicity), and the CLI's
one-line errors for bad input with no manifest left behind."""
from __future__ import annotations

from pathlib import Path

import pytest

from alphafuse_dist.cli import main
from alphafuse_dist.config import config_from_dict, load_config, parse_override, preset_names
from alphafuse_dist.errors import ConfigError
from alphafuse_dist.runtime.manifest import fingerprint_path, read_manifest, run_stage


# ----------------------------------------------------------------------------- config
def test_presets_load_and_overrides_apply():
    assert {"quickstart", "ml-1m"} <= set(preset_names())
    cfg = load_config("quickstart", ["train.epochs=3", "method=sasrec_id", "eval.ks=[5, 10]", "data.min_rating=3.5"])
    assert (cfg.train.epochs, cfg.method, cfg.eval.ks, cfg.data.min_rating) == (3, "sasrec_id", [5, 10], 3.5)
    assert cfg.train.lr == pytest.approx(1e-3)  # untouched defaults stay
    assert config_from_dict(cfg.to_dict()) == cfg  # round trip used to ship configs to workers


def test_yaml_file_config(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("name: mine\ntrain:\n  lr: 0.01\n")
    cfg = load_config(str(f), ["train.lr=0.02"])
    assert (cfg.name, cfg.train.lr) == ("mine", 0.02)


@pytest.mark.parametrize("override, key", [
    ("train.lrr=0.1", "train.lrr"),
    ("bogus=1", "bogus"),
    ("model.dim=abc", "model.dim"),
    ("train.epochs=1.5", "train.epochs"),
    ("train.backend=tensorflow", "train.backend"),
    ("method=bert", "method"),
    ("eval.ks=10", "eval.ks"),
    ("model=3", "model"),
])
def test_bad_keys_and_types_name_the_key(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config("quickstart", [override])


def test_cross_field_rules_name_the_keys():
    with pytest.raises(ConfigError, match=r"^model\.id_dims=128: must be < model\.dim=128$"):
        load_config("quickstart", ["model.id_dims=128"])
    with pytest.raises(ConfigError, match="train.batch_size"):
        load_config("quickstart", ["train.batch_size=5", "train.num_workers=2"])
    with pytest.raises(ConfigError, match="no such file and no such preset"):
        load_config("nope")


def test_retired_and_renamed_keys_say_what_to_do(tmp_path):
    with pytest.raises(ConfigError, match=r"^decompose\.null_dims: renamed to model\.id_dims$"):
        load_config("quickstart", ["decompose.null_dims=32"])
    for key in ("decompose.task_cpus=2", "decompose.precision=float64"):
        with pytest.raises(ConfigError, match=rf"^{key.split('=')[0]}: retired; "):
            load_config("quickstart", [key])
    path = tmp_path / "old.yaml"
    path.write_text("decompose:\n  null_dims: 64\n")
    with pytest.raises(ConfigError, match="renamed to model.id_dims"):
        load_config(str(path))
    assert load_config("quickstart", ["model.id_dims=32"]).model.id_dims == 32


def test_id_dims_is_outside_the_decompose_hash_and_checked_against_the_threshold_rule(tmp_path):
    import json

    from alphafuse_dist import pipeline
    from alphafuse_dist.config import section_hash

    a, b = load_config("quickstart"), load_config("quickstart", ["model.id_dims=32"])
    assert section_hash(a.decompose, a.model.dim) == section_hash(b.decompose, b.model.dim)  # the stage's identity
    for stage in ("prepare", "embed", "decompose"):
        def build(tmp, stage=stage):
            if stage == "decompose":  # as the threshold rule records it
                (tmp / "basis.json").write_text(json.dumps({"d": 128, "d_null": 40}))
            return {"rows": {"items": 5}}
        run_stage(tmp_path, stage, config_hash="x", inputs={}, build=build)
    with pytest.raises(ConfigError, match=r"^model\.id_dims=64: decompose\.null_rule=threshold derived d_n=40 .*"
                                          r"set model\.id_dims=40$"):
        pipeline.train_stage(load_config("quickstart", [f"run_dir={tmp_path}"]))


def test_override_values_typed_by_key():
    cfg = load_config("quickstart", ["data.min_rating=none", "eval.exclude_history=true",
                                     "data.text_template={title} ({genres})", "run_dir=runs/{name}"])
    assert cfg.data.min_rating is None and cfg.eval.exclude_history is True
    assert cfg.data.text_template == "{title} ({genres})" and cfg.run_dir == "runs/{name}"
    assert parse_override("a.b=1") == {"a": {"b": "1"}}


# ----------------------------------------------------------------------------- stages
def _build_counter(calls: list, fail: bool = False):
    def build(tmp: Path) -> dict:
        calls.append(tmp)
        (tmp / "out.txt").write_text("partial")
        if fail:
            raise RuntimeError("killed midway")
        return {"rows": {"out": 1}}
    return build


def test_stage_skips_when_manifest_matches_and_reruns_on_change(tmp_path):
    calls: list = []
    out = run_stage(tmp_path, "s", config_hash="a", inputs={"x": "1"}, build=_build_counter(calls))
    m = read_manifest(out)
    assert m["rows"] == {"out": 1} and m["config_hash"] == "a" and len(m["digest"]) == 16
    run_stage(tmp_path, "s", config_hash="a", inputs={"x": "1"}, build=_build_counter(calls))
    assert len(calls) == 1  # skipped
    run_stage(tmp_path, "s", config_hash="b", inputs={"x": "1"}, build=_build_counter(calls))
    run_stage(tmp_path, "s", config_hash="b", inputs={"x": "2"}, build=_build_counter(calls))
    assert len(calls) == 3


def test_failed_stage_leaves_nothing_and_keeps_previous_output(tmp_path):
    with pytest.raises(RuntimeError):
        run_stage(tmp_path, "s", config_hash="a", inputs={}, build=_build_counter([], fail=True))
    assert list(tmp_path.iterdir()) == []  # no stage folder, no temporary
    run_stage(tmp_path, "s", config_hash="a", inputs={}, build=_build_counter([]))
    before = read_manifest(tmp_path / "s")
    with pytest.raises(RuntimeError):
        run_stage(tmp_path, "s", config_hash="b", inputs={}, build=_build_counter([], fail=True))
    assert read_manifest(tmp_path / "s") == before  # the complete earlier output is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_fingerprint_changes_with_content(tmp_path):
    f = tmp_path / "a.csv"
    f.write_text("x\n1\n")
    a = fingerprint_path(f)
    f.write_text("x\n2\n")
    assert fingerprint_path(f) != a


# ----------------------------------------------------------------------------- CLI bad input
def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


ITEMS = "item_id,title\na,Alpha\nb,Beta\nc,Gamma\n"
GOOD = "user_id,item_id,timestamp\nu,a,1\nu,b,2\nu,c,3\n"


CASES = {  # case -> (interactions file name, its bytes, items file text, words the error must name)
    "missing_column": ("inter.csv", b"user_id,item_id\nu,a\n", ITEMS, ["inter.csv", "timestamp"]),
    "empty": ("inter.csv", b"user_id,item_id,timestamp\n", ITEMS, ["inter.csv", "no data rows"]),
    "unknown_item": ("inter.csv", (GOOD + "u,zzz,4\n").encode(), ITEMS, ["inter.csv", "item_id", "zzz"]),
    "unknown_key": ("inter.csv", GOOD.encode(), ITEMS, ["train.epochz"]),
    "null_user": ("inter.csv", (GOOD + ",a,4\n").encode(), ITEMS, ["inter.csv", "user_id"]),
    "negative_time": ("inter.csv", (GOOD + "u,a,-5\n").encode(), ITEMS, ["inter.csv", "timestamp"]),
    "unparsable_time": ("inter.csv", (GOOD + "u,a,yesterday\n").encode(), ITEMS, ["inter.csv", "timestamp"]),
    "not_utf8": ("inter.csv", GOOD.encode() + b"u\xe9,a,4\n", ITEMS, ["inter.csv", "utf-8"]),
    "truncated_gzip": ("inter.csv.gz", __import__("gzip").compress(GOOD.encode())[:-12], ITEMS, ["inter.csv.gz"]),
    "corrupt_parquet": ("inter.parquet", b"PAR1 not really parquet PAR1", ITEMS, ["inter.parquet"]),
    "duplicate_item_text": ("inter.csv", GOOD.encode(), ITEMS + "a,Another Alpha\n", ["items.csv", "item_id"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_cli_bad_input_one_line_error_no_manifest(case, tmp_path, capsys):
    run_dir = tmp_path / "run"
    name, content, items_text, needles = CASES[case]
    inter = tmp_path / name
    inter.write_bytes(content)
    items = _write(tmp_path / "items.csv", items_text)
    overrides = ["data.source=interactions", "data.text_template={title}", f"data.path={inter}", f"data.items_path={items}", f"run_dir={run_dir}"]
    if case == "unknown_key":
        overrides.append("train.epochz=2")
    code = main(["run", "--config", "quickstart", "--stages", "prepare", *overrides])
    lines = capsys.readouterr().err.strip().splitlines()  # progress lines, then the error
    assert code == 2
    err = lines[-1]
    assert err.startswith("alphafuse: error: ") and not [line for line in lines[:-1] if "error" in line], lines
    for n in needles:
        assert n.lower() in err.lower(), err
    assert not list(run_dir.rglob("manifest.json")) if run_dir.exists() else True


KILLED_STAGE = """
import sys, time
from pathlib import Path
from alphafuse_dist.runtime.manifest import run_stage

def build(tmp):
    (tmp / "part-0.parquet").write_bytes(b"half")
    Path(sys.argv[2]).write_text("started")
    time.sleep(60)

run_stage(Path(sys.argv[1]), "embed", config_hash="a", inputs={}, build=build)
"""


def test_sigkilled_stage_leaves_no_readable_output(tmp_path):
    """A stage process killed with SIGKILL mid-write leaves only a hidden temporary folder: no
    stage folder, no manifest; the next run removes the leftover and a later stage refuses to
    read the missing one."""
    import signal
    import subprocess
    import sys
    import time

    from alphafuse_dist.errors import AlphaFuseError
    from alphafuse_dist.runtime.manifest import clean_temporaries, require_stage

    flag = tmp_path / "started"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_STAGE, str(tmp_path / "run"), str(flag)])
    try:
        deadline = time.time() + 60
        while not flag.exists() and time.time() < deadline:
            time.sleep(0.1)
        assert flag.exists()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    run_dir = tmp_path / "run"
    assert not (run_dir / "embed").exists()
    assert [p.name.startswith(".embed.tmp-") for p in run_dir.iterdir()] == [True]
    with pytest.raises(AlphaFuseError, match="no manifest"):
        require_stage(run_dir, "embed")
    clean_temporaries(run_dir)
    assert list(run_dir.iterdir()) == []


def test_second_run_on_a_busy_run_dir_is_refused(tmp_path):
    import fcntl

    from alphafuse_dist.errors import AlphaFuseError
    from alphafuse_dist.pipeline import run_pipeline

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with open(run_dir / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(AlphaFuseError, match="another alphafuse run"):
            run_pipeline(load_config("quickstart", [f"run_dir={run_dir}"]), stages=("prepare",))


# ----------------------------------------------------------------------------- Ray readiness
def test_check_workers_fails_fast_with_the_reason(ray_session):
    """ensure_ray's first task: a worker that cannot import the package, holds another version
    or never runs the task stops the job before any stage, with the reason."""
    import time as _time

    from alphafuse_dist.runtime.ray import check_workers

    assert 0 < check_workers(60.0) < 60
    with pytest.raises(ConfigError, match=r"ray.ready_timeout_s=0: must be a positive"):
        check_workers(0)

    def cannot_import() -> str:
        raise ModuleNotFoundError("No module named 'alphafuse_dist'")

    with pytest.raises(ConfigError, match=r"on node 127.0.0.1 could not run alphafuse_dist's first task: "
                                          "ModuleNotFoundError: No module named 'alphafuse_dist'"):
        check_workers(60.0, cannot_import)
    with pytest.raises(ConfigError, match="on node 127.0.0.1 imports alphafuse_dist 0.0.0, this driver"):
        check_workers(60.0, lambda: "0.0.0")

    def never() -> str:
        _time.sleep(600)
        return ""

    start = _time.perf_counter()
    with pytest.raises(ConfigError, match=r"node\(s\) 127.0.0.1 ran a task within ray.ready_timeout_s=1 s"):
        check_workers(1.0, never)
    assert _time.perf_counter() - start < 30
