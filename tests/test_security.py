"""Secure defaults: lock files never follow a planted symlink, what the CLI writes is owner-only
unless ALPHAFUSE_UMASK says otherwise."""
from __future__ import annotations

import os
import stat

import pytest

from alphafuse_dist.cli import main
from alphafuse_dist.errors import AlphaFuseError
from alphafuse_dist.runtime.manifest import run_dir_lock


def test_lock_refuses_a_planted_symlink(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".lock").symlink_to(victim)
    with pytest.raises(AlphaFuseError) as e:
        with run_dir_lock(run_dir):
            pass
    assert str(e.value) == f"lock file {run_dir / '.lock'} is a symbolic link; remove it or choose another folder"
    assert victim.read_text() == "precious"


def test_lock_is_exclusive_and_owner_only(tmp_path):
    with run_dir_lock(tmp_path):
        with pytest.raises(AlphaFuseError, match="another alphafuse run is using it"):
            with run_dir_lock(tmp_path):
                pass
    assert stat.S_IMODE((tmp_path / ".lock").stat().st_mode) & 0o077 == 0
    with run_dir_lock(tmp_path):  # released: taken again
        pass


@pytest.fixture
def restore_umask():
    old = os.umask(0o022)
    os.umask(old)
    yield
    os.umask(old)


def test_cli_writes_owner_only_by_default(tmp_path, monkeypatch, capsys, restore_umask):
    src = tmp_path / "src.bin"
    src.write_bytes(b"x")
    digest = "2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881"
    monkeypatch.delenv("ALPHAFUSE_UMASK", raising=False)
    assert main(["download", str(src), "--sha256", digest, "--to", str(tmp_path / "out" / "a.bin")]) == 0
    assert stat.S_IMODE((tmp_path / "out" / "a.bin").stat().st_mode) & 0o077 == 0
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) & 0o077 == 0
    monkeypatch.setenv("ALPHAFUSE_UMASK", "022")
    assert main(["download", str(src), "--sha256", digest, "--to", str(tmp_path / "shared" / "a.bin")]) == 0
    assert stat.S_IMODE((tmp_path / "shared" / "a.bin").stat().st_mode) == 0o644
    monkeypatch.setenv("ALPHAFUSE_UMASK", "9x")
    capsys.readouterr()
    assert main(["download", str(src), "--sha256", digest, "--to", str(tmp_path / "x.bin")]) == 2
    assert capsys.readouterr().err == ("alphafuse: error: ALPHAFUSE_UMASK='9x': expected an octal umask such as "
                                       "077 or 022\n")
