"""The documentation stays true to the code: the generated config reference, the README's size,
and no pointers to files outside the repository."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from alphafuse_dist import config, configref

ROOT = Path(__file__).resolve().parents[1]


def test_config_reference_matches_the_dataclasses():
    assert (ROOT / "docs" / "config.md").read_text() == configref.render(), \
        "docs/config.md is stale: python -m alphafuse_dist.configref > docs/config.md"


def test_every_config_key_is_described():
    rows = [line for line in configref.render().splitlines() if line.startswith("| `")]
    undocumented = [row.split("`")[1] for row in rows if row.rstrip().endswith("|  |")]
    assert not undocumented, f"keys without a comment in config.py: {undocumented}"
    sections = [f for f in dataclasses.fields(config.RunConfig) if f.default_factory is not dataclasses.MISSING]
    keys = sum(len(dataclasses.fields(f.default_factory())) for f in sections)
    assert len(rows) == keys + len(dataclasses.fields(config.RunConfig)) - len(sections)


def test_readme_is_short_and_starts_with_the_two_commands():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 120
    block = "\n".join(lines[:5])
    assert "alphafuse quickstart" in block and "bash .ci/run" in block


def test_nothing_points_outside_the_repository():
    pattern = re.compile(r"METHOD\.md|STACK notes|STACK\.md|DEVELOPERS\.md|\.\./shared")
    files = [*ROOT.glob("alphafuse_dist/**/*.py"), *ROOT.glob("alphafuse_dist/presets/*.yaml"), ROOT / "README.md",
             ROOT / "pyproject.toml", *ROOT.glob("docs/*.md"), *ROOT.glob("cluster/*"), *ROOT.glob("jobs/*")]
    offenders = [str(f.relative_to(ROOT)) for f in files if f.is_file() and pattern.search(f.read_text())]
    assert not offenders
