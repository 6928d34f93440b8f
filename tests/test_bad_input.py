"""Bad input of every kind through the ``alphafuse`` command: data files, config, the file system,
tampered stage outputs, exports and a busy run directory.

Each case asserts the exact one-line error (or a precise regex of it) with exit status 2, or, for
a tampered stage that is rebuilt, the exact warning naming the file; and that nothing half-written
or stale is left: no temporary folder, no new stage folder, earlier outputs untouched. Most cases
fail before any work; those that need finished stages share one tiny run (prepare, one-process
training of one epoch, evaluate, export: seconds, no Ray), copied per case.
"""
from __future__ import annotations

import errno
import fcntl
import gzip
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alphafuse_dist.cli import main
from alphafuse_dist.runtime import parquet
from alphafuse_dist.runtime.console import LOG_FILE
from alphafuse_dist.runtime.manifest import read_manifest, stage_problem

N_USERS, N_ITEMS = 30, 15
TRAIN, EVALUATE, EXPORT = "train-sasrec_id-s22", "evaluate-sasrec_id-s22", "export-sasrec_id-s22"
SMALL = ["method=sasrec_id", "train.backend=torch", "train.num_workers=1", "train.epochs=1", "train.batch_size=8",
         "model.dim=16", "model.id_dims=8", "model.max_len=5", "data.text_template={title}"]
ERROR = "alphafuse: error: "


# ----------------------------------------------------------------------------- helpers
def _interactions(n_users: int = N_USERS) -> list[tuple[str, str, int]]:
    rng = np.random.default_rng(0)
    rows = []
    for u in range(n_users):
        start, length = rng.integers(N_ITEMS), rng.integers(4, 8)
        rows += [(f"u{u}", f"m{(start + t) % N_ITEMS}", 1000 + 10 * t) for t in range(length)]
    return rows


def _csv(rows) -> str:
    return "user_id,item_id,timestamp\n" + "".join(f"{u},{i},{t}\n" for u, i, t in rows)


def _items_csv() -> str:
    return "item_id,title\n" + "".join(f"m{i},Item {i}\n" for i in range(N_ITEMS))


def _data(root: Path) -> tuple[Path, Path]:
    root.mkdir(parents=True, exist_ok=True)
    (root / "inter.csv").write_text(_csv(_interactions()))
    (root / "items.csv").write_text(_items_csv())
    return root / "inter.csv", root / "items.csv"


def _source(inter: Path, items: Path | None = None) -> list[str]:
    return ["data.source=interactions", f"data.path={inter}"] + ([f"data.items_path={items}"] if items else [])


def _cli(capsys, argv: list[str]) -> tuple[int, list[str], str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.err.splitlines(), captured.out


def _refused(capsys, argv: list[str], message: str | re.Pattern) -> list[str]:
    """Run the CLI; assert exit status 2 and the last stderr line is ``message`` (exact, or a
    full match of a compiled pattern) after the error prefix."""
    code, err, _ = _cli(capsys, argv)
    assert code == 2, err
    assert err and err[-1].startswith(ERROR), err
    got = err[-1][len(ERROR):]
    if isinstance(message, re.Pattern):
        assert message.fullmatch(got), got
    else:
        assert got == message
    return err


def _snapshot(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file below ``folder`` (hidden ones too), except the lock and
    the run's log (which records the failure)."""
    if not folder.exists():
        return {}
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in (".lock", LOG_FILE)}


def _nothing_written(run_dir: Path) -> None:
    """No stage folder, no temporary, nothing but the lock file and the run's log."""
    assert not run_dir.exists() or {p.name for p in run_dir.iterdir()} <= {".lock", LOG_FILE}


def _no_temporaries(run_dir: Path) -> None:
    assert not list(run_dir.glob(".*.tmp-*"))


def _flip(path: Path, offset: int, keep_mtime: bool = False) -> None:
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    if keep_mtime:  # the manifest's size + mtime fast path then passes: the Parquet checksum must catch it
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _column_end(path: Path, column: str) -> int:
    """The offset of the last byte of ``column``'s first column chunk (inside its last data page)."""
    md = pq.ParquetFile(path).metadata
    names = [md.schema.column(i).path.split(".")[0] for i in range(md.num_columns)]  # list columns: a.list.element
    chunk = md.row_group(0).column(names.index(column))
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    return start + chunk.total_compressed_size - 1


# ----------------------------------------------------------------------------- data
def _write(root: Path, name: str, content: bytes | str) -> Path:
    path = root / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def _parquet_bytes(table: pa.Table, **options) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, **options)
    return sink.getvalue().to_pybytes()


def _table() -> pa.Table:
    rows = _interactions()
    return pa.table({"user_id": [r[0] for r in rows], "item_id": [r[1] for r in rows],
                     "timestamp": pa.array([r[2] for r in rows], pa.int64())})


def _flipped_user_id_parquet(root: Path) -> Path:
    """Interactions written with page checksums, one byte flipped in the user_id column's page."""
    path = root / "inter.parquet"
    parquet.write_table(_table(), path, compression="none")
    _flip(path, _column_end(path, "user_id"))
    return path


def _movielens_dat(root: Path, ratings: bytes) -> list[str]:
    _write(root, "ratings.dat", ratings)
    _write(root, "movies.dat", "1::A::Drama\n")
    return ["data.source=movielens", f"data.path={root}"]


def _truncated_gzip(root: Path) -> Path:
    return _write(root, "inter.csv.gz", gzip.compress(_csv(_interactions()).encode())[:60])


PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x01\x00"
# name -> (write the files into root and return the overrides, the message with {root} for the folder)
DATA_CASES = {
    "binary file named .csv": (
        lambda r: _source(_write(r, "inter.csv", PNG)),
        "file {root}/inter.csv: not a CSV file: binary content (a NUL byte at byte 8)"),
    "Parquet file named .csv": (
        lambda r: _source(_write(r, "inter.csv", _parquet_bytes(_table()))),
        "file {root}/inter.csv: not a CSV file: it is a Parquet file (give it a .parquet suffix)"),
    "gzip file named .csv": (
        lambda r: _source(_write(r, "inter.csv", gzip.compress(_csv(_interactions()).encode()))),
        "file {root}/inter.csv: not a CSV file: it is gzip-compressed (add .gz to its name)"),
    "binary file named .tsv": (
        lambda r: _source(_write(r, "inter.tsv", b"user_id\titem_id\x00\x01")),
        "file {root}/inter.tsv: not a TSV file: binary content (a NUL byte at byte 15)"),
    "binary items file": (
        lambda r: _source(_write(r, "inter.csv", _csv(_interactions())), _write(r, "items.csv", b"\x00" * 64)),
        "file {root}/items.csv: not a CSV file: binary content (a NUL byte at byte 0)"),
    "empty CSV": (
        lambda r: _source(_write(r, "inter.csv", "")),
        "file {root}/inter.csv: is empty: expected a header and data rows"),
    "header only": (
        lambda r: _source(_write(r, "inter.csv", "user_id,item_id,timestamp\n")),
        "file {root}/inter.csv: has no data rows: expected one interaction per row"),
    "missing column": (
        lambda r: _source(_write(r, "inter.csv", "user_id,item_id\nu1,m1\n")),
        "file {root}/inter.csv, column 'timestamp': missing required column; columns found: user_id, item_id"),
    "control characters in the header are escaped": (
        lambda r: _source(_write(r, "inter.csv", "user_id,item\x1b[31m_id,timestamp\nu1,m1,5\n")),
        "file {root}/inter.csv, column 'item_id': missing required column; columns found: user_id, "
        "item\\x1b[31m_id, timestamp"),
    "unreadable timestamp": (
        lambda r: _source(_write(r, "inter.csv", "user_id,item_id,timestamp\nu1,m1,5\nu1,m2,yesterday\n")),
        "file {root}/inter.csv, column 'timestamp', row 1: cannot read 'yesterday' as a timestamp: expected "
        "integer epoch seconds or an ISO-8601 date"),
    "negative timestamp": (
        lambda r: _source(_write(r, "inter.csv", "user_id,item_id,timestamp\nu1,m1,-5\n")),
        "file {root}/inter.csv, column 'timestamp', row 0: negative timestamp -5: expected epoch seconds >= 0"),
    "missing user id": (
        lambda r: _source(_write(r, "inter.csv", "user_id,item_id,timestamp\nu1,m1,5\n,m2,6\n")),
        "file {root}/inter.csv, column 'user_id', row 1: missing id (null or empty)"),
    "rating that is not a number": (
        lambda r: _source(_write(r, "inter.csv", "user_id,item_id,timestamp,rating\nu1,m1,5,five\n")),
        "file {root}/inter.csv, column 'rating', row 0: cannot read 'five' as a rating: expected a number"),
    "latin-1 CSV": (
        lambda r: _source(_write(r, "inter.csv", "user_id,item_id,timestamp\na,x,1\nJosé,y,2\n".encode("latin-1"))),
        "file {root}/inter.csv: cannot be read as CSV: line 3 is not UTF-8 (byte 0xe9): expected UTF-8 text; "
        "re-encode the file, e.g. iconv -f latin1 -t utf-8"),
    "unknown suffix": (
        lambda r: _source(_write(r, "inter.xlsx", "x")),
        "file {root}/inter.xlsx: unknown file type '.xlsx': expected .parquet, .pq, .csv, .tsv, .tab, .jsonl, "
        ".ndjson, .json, optionally followed by .gz or .zst"),
    "missing file": (
        lambda r: _source(r / "nope.csv"),
        "file {root}/nope.csv: does not exist"),
    "folder instead of a file": (
        lambda r: _source(r),
        "file {root}: is not a file"),
    "repeated item id": (
        lambda r: _source(_write(r, "inter.csv", "user_id,item_id,timestamp\nu1,m1,5\n"),
                          _write(r, "items.csv", "item_id,title\nm1,A\nm1,B\n")),
        "file {root}/items.csv, column 'item_id', row 1: item id 'm1' repeats the item of row 0: item ids must be "
        "unique"),
    "item missing from the item table": (
        lambda r: _source(_write(r, "inter.csv", "user_id,item_id,timestamp\nu1,m1,5\nu1,zz,6\n"),
                          _write(r, "items.csv", "item_id,title\nm1,A\n")),
        "file {root}/inter.csv, column 'item_id', row 1: item id 'zz' is not in the item table {root}/items.csv "
        "(1 interactions, 1 distinct ids missing)"),
    "truncated gzip": (
        lambda r: _source(_truncated_gzip(r)),
        re.compile(r"file {root}/inter\.csv\.gz: cannot be decompressed as gzip \(truncated or corrupt\?\): .+")),
    "random bytes named .parquet": (
        lambda r: _source(_write(r, "inter.parquet", bytes(range(256)) * 4)),
        "file {root}/inter.parquet: not a Parquet file: it does not start with PAR1"),
    "CSV named .parquet": (
        lambda r: _source(_write(r, "inter.parquet", _csv(_interactions()))),
        "file {root}/inter.parquet: not a Parquet file: it is text (a CSV file? give it a .csv suffix)"),
    "gzip file named .parquet": (
        lambda r: _source(_write(r, "inter.parquet", gzip.compress(_parquet_bytes(_table())))),
        "file {root}/inter.parquet: not a Parquet file: it is gzip-compressed (add .gz to its name)"),
    "truncated Parquet": (
        lambda r: _source(_write(r, "inter.parquet", _parquet_bytes(_table())[:-100])),
        re.compile(r"file {root}/inter\.parquet: cannot be read as Parquet: corrupt or not Parquet \(.+\)")),
    "flipped byte in a Parquet text column": (
        lambda r: _source(_flipped_user_id_parquet(r)),
        re.compile(r"file {root}/inter\.parquet: cannot be read as Parquet: corrupt or not Parquet "
                   r"\(.*CRC checksum verification failed.*\)")),
    "Parquet id column of floats with fractions": (
        lambda r: _source(_write(r, "inter.parquet", _parquet_bytes(pa.table(
            {"user_id": [1.5], "item_id": ["m1"], "timestamp": [5]})))),
        "file {root}/inter.parquet, column 'user_id', row 0: id 1.5 is not a whole number: expected strings or "
        "integers"),
    "binary JSON-lines reviews": (
        lambda r: ["data.source=amazon2018", f"data.path={_write(r, 'reviews.json', PNG)}"],
        "file {root}/reviews.json: not a JSON-lines file: binary content (a NUL byte at byte 8)"),
    "JSON-lines line that is a list": (
        lambda r: ["data.source=amazon2018", "data.path=" + str(_write(
            r, "reviews.json", '{"reviewerID": "A", "asin": "B", "unixReviewTime": 1}\n["x"]\n'))],
        "file {root}/reviews.json: line 2 is not a JSON object (a JSON list): expected one JSON object per line"),
    "empty JSON-lines file": (
        lambda r: ["data.source=amazon2018", f"data.path={_write(r, 'reviews.json', '')}"],
        "file {root}/reviews.json: is empty: expected one JSON object per line"),
    "MovieLens folder without ratings": (
        lambda r: ["data.source=movielens", f"data.path={r}"],
        "file {root}: no MovieLens ratings: expected ratings.csv + movies.csv (ml-latest, ml-20m), ratings.dat + "
        "movies.dat (ml-1m) or u.data + u.item (ml-100k); found: nothing"),
    "binary MovieLens .dat": (
        lambda r: _movielens_dat(r, ratings=PNG),
        "file {root}/ratings.dat: not a MovieLens .dat file ('::'-separated records): binary content (a NUL byte "
        "at byte 8)"),
    "RecBole folder without .inter": (
        lambda r: ["data.source=recbole", f"data.path={r}"],
        "file {root}: expected one <name>.inter file (or {name}.inter); found: nothing"),
    "data.path not given": (
        lambda r: ["data.source=interactions"],
        "data.path: required for data.source=interactions (a Parquet or CSV file)"),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_bad_data_is_one_line_naming_the_file_and_writes_nothing(case, tmp_path, capsys):
    make, message = DATA_CASES[case]
    root = tmp_path / "data"
    root.mkdir()
    overrides = make(root)
    if isinstance(message, re.Pattern):
        message = re.compile(message.pattern.replace("{root}", re.escape(str(root))))
    else:
        message = message.format(root=root, name=root.name)
    run_dir = tmp_path / "run"
    _refused(capsys, ["run", "--stages", "prepare", *SMALL, *overrides, f"run_dir={run_dir}"], message)
    _nothing_written(run_dir)


# ----------------------------------------------------------------------------- config
CONFIG_CASES = {
    "unknown key": (["train.epochz=2"], re.compile(r"unknown config key 'train\.epochz' \(known here: .*epochs.*\)")),
    "wrong type": (["train.epochs=abc"], "config key 'train.epochs': expected an integer, got 'abc'"),
    "negative learning rate": (["train.lr=-1"], "train.lr=-1: must be > 0"),
    "dropout above 1": (["model.dropout=1.5"], "model.dropout=1.5: must be in [0, 1)"),
    "zero temperature": (["model.temperature=0"], "model.temperature=0: must be > 0"),
    "negative dim": (["model.dim=-4"], "model.dim=-4: must be >= 1"),
    "unknown method": (["method=bogus"], "config key 'method': 'bogus' is not one of alphafuse, sasrec_id, llminit, "
                                         "morec, whitenrec, unisrec, rlmrec, llmesr"),
    "override without a value": (["train.epochs"], "override 'train.epochs': expected key=value, e.g. train.epochs=3"),
    "k of zero": (["eval.ks=[0]"], "eval.ks=[0]: each element must be >= 1"),
    "unknown stage": (["--stages", "prepare,bogus"], "--stages: unknown stage(s) bogus (stages: prepare, embed, "
                                                      "decompose, train, evaluate)"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_bad_config_is_refused_before_any_work(case, tmp_path, capsys):
    overrides, message = CONFIG_CASES[case]
    run_dir = tmp_path / "run"
    inter, items = _data(tmp_path / "data")
    _refused(capsys, ["run", *SMALL, *_source(inter, items), f"run_dir={run_dir}", *overrides], message)
    assert not run_dir.exists()


CONFIG_FILES = {
    "binary YAML": (b"\xff\xfe\x00x", "config '{path}': not UTF-8 text (byte 0xff at 0): expected a YAML file"),
    "YAML list": (b"- 1\n- 2\n", "{path}: top level must be a mapping of config keys"),
    "section that is not a mapping": (b"train: 5\n", "config key 'train': expected a mapping of its keys, got 5"),
    "CSV given as config": (b"a,b\n", "config '{path}': not a YAML file (expected a .yaml or .yml file or a "
                                      "preset name)"),
}


@pytest.mark.parametrize("case", list(CONFIG_FILES))
def test_bad_config_file_is_one_line(case, tmp_path, capsys):
    content, message = CONFIG_FILES[case]
    path = tmp_path / ("config.csv" if "CSV" in case else "config.yaml")
    path.write_bytes(content)
    _refused(capsys, ["run", "--config", path, f"run_dir={tmp_path / 'run'}"], message.format(path=path))
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- file system
def test_run_dir_that_is_a_file(tmp_path, capsys):
    inter, items = _data(tmp_path / "data")
    run_dir = _write(tmp_path, "run", "precious")
    _refused(capsys, ["run", *SMALL, *_source(inter, items), f"run_dir={run_dir}"],
             f"run_dir {run_dir}: is a file, not a folder; choose another run_dir")
    assert run_dir.read_text() == "precious"


def test_run_dir_below_a_file(tmp_path, capsys):
    inter, items = _data(tmp_path / "data")
    _write(tmp_path, "file", "x")
    run_dir = tmp_path / "file" / "run"
    _refused(capsys, ["run", *SMALL, *_source(inter, items), f"run_dir={run_dir}"],
             f"run_dir {run_dir}: cannot be created (Not a directory)")


NOT_WRITABLE = Path("/sys/kernel")  # exists and refuses new files, even to root


@pytest.mark.skipif(not NOT_WRITABLE.is_dir() or os.access(NOT_WRITABLE / "x", os.F_OK), reason="no sysfs")
def test_run_dir_that_cannot_be_created_or_written(tmp_path, capsys):
    inter, items = _data(tmp_path / "data")
    run_dir = NOT_WRITABLE / "alphafuse-run"
    _refused(capsys, ["run", *SMALL, *_source(inter, items), f"run_dir={run_dir}"],
             re.compile(rf"run_dir {re.escape(str(run_dir))}: cannot be created \((Operation not permitted|"
                        r"Permission denied|Read-only file system)\)"))
    _refused(capsys, ["run", *SMALL, *_source(inter, items), f"run_dir={NOT_WRITABLE}"],
             re.compile(rf"lock file {NOT_WRITABLE}/\.lock cannot be opened \((Operation not permitted|"
                        r"Permission denied|Read-only file system)\); remove it or choose another folder"))


def test_lock_file_planted_as_a_symlink(tmp_path, capsys):
    inter, items = _data(tmp_path / "data")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    victim = _write(tmp_path, "victim", "precious")
    (run_dir / ".lock").symlink_to(victim)
    _refused(capsys, ["run", *SMALL, *_source(inter, items), f"run_dir={run_dir}"],
             f"lock file {run_dir}/.lock is a symbolic link; remove it or choose another folder")
    assert victim.read_text() == "precious" and {p.name for p in run_dir.iterdir()} <= {".lock", LOG_FILE}


@pytest.mark.parametrize("named", [True, False], ids=["error naming its file", "error naming no file"])
def test_disk_full_while_a_stage_writes_keeps_the_previous_output(named, tmp_path, capsys, monkeypatch):
    """ENOSPC from a write: one line naming the file (or else the stage's temporary folder); the
    previous output of the stage stays as it was and no temporary is left."""
    from alphafuse_dist.data import prepare as prepare_mod

    inter, items = _data(tmp_path / "data")
    run_dir = tmp_path / "run"
    argv = ["run", "--stages", "prepare", *SMALL, *_source(inter, items), f"run_dir={run_dir}"]
    assert _cli(capsys, argv)[0] == 0
    before = _snapshot(run_dir)

    def full(table, path, **options):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), *([str(path)] if named else []))

    monkeypatch.setattr(prepare_mod, "write_table", full)
    where = r"/\.prepare\.tmp-[0-9a-f]{8}" + (r"/[a-z]+\.parquet" if named else "")
    _refused(capsys, [*argv[:3], "--force", "prepare", *argv[3:]],
             re.compile(rf"stage 'prepare' not written: {re.escape(str(run_dir))}{where}: No space left on device"))
    assert _snapshot(run_dir) == before
    _no_temporaries(run_dir)


# ----------------------------------------------------------------------------- stage outputs
@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny run (prepare, train, evaluate, export of sasrec_id): (data root, run_dir, metrics)."""
    root = tmp_path_factory.mktemp("finished")
    inter, items = _data(root / "data")
    run_dir = root / "run"
    assert main(["run", *SMALL, *_source(inter, items), f"run_dir={run_dir}"]) == 0
    assert main(["export", "--run", str(run_dir), "--method", "sasrec_id"]) == 0
    metrics = json.loads((run_dir / EVALUATE / "metrics.json").read_text())
    return root, run_dir, metrics


@pytest.fixture
def run_copy(finished, tmp_path):
    """A copy of the finished run (modification times kept) and the overrides that continue it."""
    root, run_dir, metrics = finished
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    return copy, [*SMALL, *_source(root / "data" / "inter.csv", root / "data" / "items.csv"), f"run_dir={copy}"]


def _edit_manifest(path: Path) -> None:
    body = json.loads(path.read_text())
    body["rows"]["items"] += 1
    path.write_text(json.dumps(body))


# name -> (tamper(run_dir), the stage, what the warning says about it)
TAMPERED = {
    "flipped byte in a Parquet file": (lambda d: _flip(d / "prepare" / "items.parquet", 100), "prepare",
                                       "{d}/prepare/items.parquet was changed (its blake2b differs from the "
                                       "manifest's)"),
    "truncated Parquet file": (lambda d: os.truncate(d / "prepare" / "train.parquet", 10), "prepare",
                               "{d}/prepare/train.parquet has 10 bytes, the manifest records {size}"),
    "deleted output file": (lambda d: (d / "prepare" / "stats.json").unlink(), "prepare",
                            "{d}/prepare/stats.json is missing"),
    "file added to a stage": (lambda d: _write(d / "prepare", "extra.parquet", "x"), "prepare",
                              "{d}/prepare/extra.parquet is not an output of the stage (not in its manifest)"),
    "row count edited in the manifest": (lambda d: _edit_manifest(d / "prepare" / "manifest.json"), "prepare",
                                         "{d}/prepare/manifest.json was edited (its content does not match its "
                                         "manifest_digest)"),
    "model file rewritten": (lambda d: _flip(d / TRAIN / "model.safetensors", -5), TRAIN,
                             "{d}/" + TRAIN + "/model.safetensors was changed (its blake2b differs from the "
                             "manifest's)"),
    "metrics edited": (lambda d: (d / EVALUATE / "metrics.json").write_text(
        (d / EVALUATE / "metrics.json").read_text().replace('"users": 30', '"users": 31')), EVALUATE,
        "{d}/" + EVALUATE + "/metrics.json was changed (its blake2b differs from the manifest's)"),
}


@pytest.mark.parametrize("case", list(TAMPERED))
def test_a_tampered_stage_is_named_and_rebuilt(case, run_copy, finished, capsys):
    run_dir, overrides = run_copy
    tamper, stage, what = TAMPERED[case]
    size = (run_dir / "prepare" / "train.parquet").stat().st_size
    tamper(run_dir)
    code, err, out = _cli(capsys, ["run", *overrides])
    assert code == 0, err
    warning = (f"[{stage}] output changed since it was written: {what.format(d=run_dir, size=size)}; "
               "running the stage again")
    assert warning in err, err
    assert f"[{stage}] done in" in "\n".join(err)
    for folder in ("prepare", TRAIN, EVALUATE):
        assert stage_problem(run_dir / folder, read_manifest(run_dir / folder)) is None
    assert json.loads((run_dir / EVALUATE / "metrics.json").read_text())["metrics"] == finished[2]["metrics"]
    _no_temporaries(run_dir)


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b"\xff\xfe"], ids=["not JSON", "a list", "not UTF-8"])
def test_a_stage_with_an_unreadable_manifest_is_run_again(content, run_copy, capsys):
    run_dir, overrides = run_copy
    (run_dir / "prepare" / "manifest.json").write_bytes(content)
    code, err, _ = _cli(capsys, ["run", *overrides])
    assert code == 0 and "[prepare] done in" in "\n".join(err)
    assert f"[{TRAIN}] up to date" in "\n".join(err)  # the same data again: the same digest, training reused
    assert stage_problem(run_dir / "prepare", read_manifest(run_dir / "prepare")) is None


@pytest.mark.parametrize("stages, tampered, file", [
    ("evaluate", TRAIN, "model.safetensors"),
    ("train", "prepare", "train.parquet"),
    ("evaluate", "prepare", "test.parquet"),
])
def test_a_tampered_upstream_stage_outside_the_stages_run_is_refused(stages, tampered, file, run_copy, capsys):
    run_dir, overrides = run_copy
    _flip(run_dir / tampered / file, 40)
    before = _snapshot(run_dir)
    kind = tampered.split("-")[0]
    _refused(capsys, ["run", "--stages", stages, "--force", stages, *overrides],
             f"stage '{tampered}' no longer matches its manifest: {run_dir}/{tampered}/{file} was changed (its "
             f"blake2b differs from the manifest's); run it again (alphafuse run ... --force {kind})")
    assert _snapshot(run_dir) == before
    _no_temporaries(run_dir)


def test_a_flipped_text_byte_behind_an_unchanged_mtime_is_caught_by_the_page_checksum(run_copy, capsys):
    """Size and modification time as recorded (the manifest's fast path passes): the Parquet page
    checksum still reports the file as corrupt, by name, and no export is written."""
    run_dir, _ = run_copy
    items = run_dir / "prepare" / "items.parquet"
    _flip(items, _column_end(items, "text"), keep_mtime=True)
    shutil.rmtree(run_dir / EXPORT)
    _refused(capsys, ["export", "--run", run_dir, "--method", "sasrec_id"],
             re.compile(rf"file {re.escape(str(items))}: cannot be read as Parquet: corrupt or not Parquet "
                        r"\(.*CRC checksum verification failed.*\)"))
    assert not (run_dir / EXPORT).exists()
    _no_temporaries(run_dir)


def test_a_flipped_byte_in_training_data_behind_an_unchanged_mtime_keeps_the_previous_model(run_copy, capsys):
    run_dir, overrides = run_copy
    train = run_dir / "prepare" / "train.parquet"
    _flip(train, _column_end(train, "items"), keep_mtime=True)
    before = _snapshot(run_dir / TRAIN)
    _refused(capsys, ["run", "--stages", "train", "--force", "train", *overrides],
             re.compile(rf"file {re.escape(str(train))}: cannot be read as Parquet: corrupt or not Parquet "
                        r"\(.*CRC checksum verification failed.*\)"))
    assert _snapshot(run_dir / TRAIN) == before
    _no_temporaries(run_dir)


def test_a_tampered_warm_start_model_is_refused(run_copy, tmp_path, capsys):
    run_dir, overrides = run_copy
    _flip(run_dir / TRAIN / "model.safetensors", -5)
    new_run = tmp_path / "next"
    _refused(capsys, ["run", *overrides, f"run_dir={new_run}", f"train.warm_start={run_dir / TRAIN}",
                          f"data.id_map={run_dir / 'prepare'}"],
             f"train.warm_start={run_dir / TRAIN}: the stage no longer matches its manifest: "
             f"{run_dir / TRAIN}/model.safetensors was changed (its blake2b differs from the manifest's)")
    assert not (new_run / TRAIN).exists()
    _no_temporaries(new_run)


def test_a_stage_folder_without_a_manifest_is_not_replaced(run_copy, capsys):
    """A folder at a stage's path that holds no manifest was not written by a stage: it is refused,
    never deleted."""
    run_dir, overrides = run_copy
    (run_dir / "prepare" / "manifest.json").unlink()
    before = _snapshot(run_dir)
    _refused(capsys, ["run", *overrides], f"{run_dir}/prepare: exists and is not a stage folder (no manifest.json); "
                                          "it is not replaced: move it away or choose another path")
    assert _snapshot(run_dir) == before
    _no_temporaries(run_dir)


# ----------------------------------------------------------------------------- exports
def _card(run_dir: Path) -> dict:
    return json.loads((run_dir / EXPORT / "model_card.json").read_text())


def _set_card(run_dir: Path, card: dict) -> None:
    (run_dir / EXPORT / "model_card.json").write_text(json.dumps(card))


RECOMMEND_CASES = {
    "unknown item id": (None, ["--item", "zz"],
                        "file {e}/items.parquet, column 'item_id': no known item in the history: 'zz' (not in "
                        "this model's catalogue, and no text given for them as new items)"),
    "k of zero": (None, ["--item", "m1", "--k", "0"], "k=0: must be an integer of at least 1"),
    "history that is not JSON": (None, ["--history", "[1,"],
                                 "--history: not a JSON list of item ids (Expecting value at character 3)"),
    "history of objects": (None, ["--history", '[{"a": 1}]'],
                           "--history: expected a JSON list of item ids (strings or integers)"),
    "altered item vectors": (lambda d: _flip(d / EXPORT / "items.parquet", 50), ["--item", "m1"],
                             "file {e}/items.parquet: sha256 differs from the model card's: the export was altered "
                             "or damaged; export again"),
    "replaced encoder": (lambda d: _write(d / EXPORT, "user_encoder.pt2", b"PK\x03\x04 not a model"), ["--item", "m1"],
                         "file {e}/user_encoder.pt2: sha256 differs from the model card's: the export was altered or "
                         "damaged; export again"),
    "card pointing outside the export": (
        lambda d: _set_card(d, _card(d) | {"serving": _card(d)["serving"] | {"encoder_file": "../../x.pt"}}),
        ["--item", "m1"],
        "file {e}/model_card.json: file name '../../x.pt' is not a plain file name inside the export"),
    "card without file hashes": (lambda d: _set_card(d, _card(d) | {"files": {}}),
                                 ["--item", "m1"],
                                 "file {e}/model_card.json: items.parquet is not listed under 'files' with its sha256"),
    "card that is not JSON": (lambda d: _write(d / EXPORT, "model_card.json", "{"), ["--item", "m1"],
                              "file {e}/model_card.json: not valid JSON (Expecting property name enclosed in double "
                              "quotes: line 1 column 2 (char 1)): the export was altered or damaged; export again"),
    "card without its sections": (lambda d: _write(d / EXPORT, "model_card.json", "[1]"), ["--item", "m1"],
                                  "file {e}/model_card.json: expected a JSON object with the sections model, serving, "
                                  "files: the export was altered or damaged; export again"),
    "card with a history length that is not a number": (
        lambda d: _set_card(d, _card(d) | {"model": _card(d)["model"] | {"max_len": "five"}}), ["--item", "m1"],
        "file {e}/model_card.json: model.max_len='five': expected an integer >= 1: the export was altered or damaged; "
        "export again"),
    "export without a manifest": (lambda d: (d / EXPORT / "manifest.json").unlink(), ["--item", "m1"],
                                  "export {e}: not a finished export (no manifest.json / model_card.json); run "
                                  "alphafuse export first"),
}


@pytest.mark.parametrize("case", list(RECOMMEND_CASES))
def test_recommend_from_a_bad_export_or_request_is_one_line(case, run_copy, capsys):
    run_dir, _ = run_copy
    tamper, args, message = RECOMMEND_CASES[case]
    if tamper:
        tamper(run_dir)
    before = _snapshot(run_dir)
    _refused(capsys, ["recommend", "--run", run_dir / EXPORT, *args], message.format(e=run_dir / EXPORT))
    assert _snapshot(run_dir) == before


EXPORT_CASES = {
    "unknown method": (["--method", "alphafuse"],
                       "run {d}: no finished train stage train-alphafuse-s<seed> (finished: " + TRAIN + "); train it "
                       "first (alphafuse run ... method=alphafuse)"),
    "unknown seed": (["--method", "sasrec_id", "--seed", "5"],
                     "run {d}: no finished train stage train-sasrec_id-s5 (finished: " + TRAIN + "); train it first "
                     "(alphafuse run ... method=sasrec_id)"),
}


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_export_of_a_missing_model_is_one_line(case, run_copy, capsys):
    run_dir, _ = run_copy
    args, message = EXPORT_CASES[case]
    before = _snapshot(run_dir)
    _refused(capsys, ["export", "--run", run_dir, *args], message.format(d=run_dir))
    assert _snapshot(run_dir) == before


@pytest.mark.parametrize("target", ["file", "folder"])
def test_export_to_a_path_holding_user_files_refuses_and_keeps_them(target, run_copy, tmp_path, capsys):
    run_dir, _ = run_copy
    to = tmp_path / "mine"
    if target == "file":
        to.write_text("precious")
    else:
        to.mkdir()
        (to / "notes.txt").write_text("precious")
    before = _snapshot(to) if target == "folder" else to.read_text()
    _refused(capsys, ["export", "--run", run_dir, "--method", "sasrec_id", "--to", to],
             f"{to}: exists and is not a stage folder (no manifest.json); it is not replaced: move it away or choose "
             "another path")
    assert (_snapshot(to) if target == "folder" else to.read_text()) == before
    _no_temporaries(tmp_path)


def test_export_of_a_missing_run_directory(tmp_path, capsys):
    _refused(capsys, ["export", "--run", tmp_path / "nope"], f"run {tmp_path / 'nope'}: no such directory")
    assert not (tmp_path / "nope").exists()


def test_an_altered_export_is_named_and_exported_again(run_copy, capsys):
    run_dir, _ = run_copy
    _flip(run_dir / EXPORT / "items.parquet", 50)
    code, err, out = _cli(capsys, ["export", "--run", run_dir, "--method", "sasrec_id"])
    assert code == 0 and out.strip() == str(run_dir / EXPORT)
    assert (f"[{EXPORT}] output changed since it was written: {run_dir / EXPORT}/items.parquet was changed (its "
            "blake2b differs from the manifest's); running the stage again") in err
    assert stage_problem(run_dir / EXPORT, read_manifest(run_dir / EXPORT)) is None
    assert _cli(capsys, ["recommend", "--run", run_dir / EXPORT, "--item", "m1"])[0] == 0


def test_compare_with_seeds_that_are_not_numbers(tmp_path, capsys):
    inter, items = _data(tmp_path / "data")
    _refused(capsys, ["compare", "--seeds", "1,x", *SMALL, *_source(inter, items), f"run_dir={tmp_path / 'run'}"],
             "--seeds 1,x: expected comma-separated integers, e.g. 22,23")
    assert not (tmp_path / "run").exists()


def test_compare_output_that_is_a_folder_is_named_and_kept(run_copy, tmp_path, capsys):
    run_dir, overrides = run_copy
    out = tmp_path / "out"
    out.mkdir()
    _refused(capsys, ["compare", "--methods", "sasrec_id", "--output", out, *overrides], f"{out}: Is a directory")
    assert list(out.iterdir()) == []
    assert not list(tmp_path.glob(".*.tmp-*"))


# ----------------------------------------------------------------------------- concurrency
@pytest.fixture
def held_lock(run_copy):
    """The copy's run lock held by another open file, as a running pipeline holds it."""
    run_dir, _ = run_copy
    with open(run_dir / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield run_dir


def _busy(run_dir: Path) -> str:
    return f"run_dir {run_dir}: another alphafuse run is using it; wait for it or choose another run_dir"


@pytest.mark.parametrize("argv", [
    ["run"], ["run", "--stages", "prepare", "--force", "prepare"],
    ["compare", "--methods", "sasrec_id"], ["export", "--force"],
], ids=["run", "run --force prepare", "compare", "export --force"])
def test_a_busy_run_directory_is_refused_and_left_as_it_is(argv, held_lock, run_copy, capsys):
    run_dir, overrides = run_copy
    before = _snapshot(run_dir)
    if argv[0] == "export":
        argv = [*argv, "--run", run_dir, "--method", "sasrec_id"]
    else:
        argv = [*argv, *overrides]
    _refused(capsys, argv, _busy(run_dir))
    assert _snapshot(run_dir) == before
    _no_temporaries(run_dir)


def test_a_current_export_is_served_while_a_pipeline_holds_the_lock(held_lock, capsys):
    run_dir = held_lock
    before = _snapshot(run_dir)
    code, err, out = _cli(capsys, ["export", "--run", run_dir, "--method", "sasrec_id"])
    assert code == 0 and out.strip() == str(run_dir / EXPORT), err
    code, err, out = _cli(capsys, ["recommend", "--run", run_dir, "--method", "sasrec_id", "--item", "m1", "--json"])
    assert code == 0 and json.loads(out)[0]["rank"] == 1, err
    assert _snapshot(run_dir) == before


def test_an_export_that_must_be_written_waits_for_the_lock(held_lock, capsys):
    run_dir = held_lock
    shutil.rmtree(run_dir / EXPORT)
    _refused(capsys, ["export", "--run", run_dir, "--method", "sasrec_id"], _busy(run_dir))
    assert not (run_dir / EXPORT).exists()
    _no_temporaries(run_dir)
