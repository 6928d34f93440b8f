"""Your own data in one try: ``alphafuse inspect-data`` suggests the data.* keys, and those keys
read the files (data.rating_col, data.items_id_col, the template built from the item columns)."""
from __future__ import annotations

import json
import shlex

import polars as pl
import pytest

from alphafuse_dist.cli import main
from alphafuse_dist.config import load_config
from alphafuse_dist.data.prepare import prepare
from alphafuse_dist.data.sources import load_source
from alphafuse_dist.data.text import default_template, item_text

CLICKS = [("anna", "p1", "2024-01-01T10:00:00", 4), ("anna", "p2", "2024-01-02T10:00:00", 2),
          ("anna", "p3", "2024-01-03T10:00:00", 5), ("anna", "p2", "2024-01-05T10:00:00", 4),
          ("ben", "p2", "2024-01-01T09:00:00", 5), ("ben", "p3", "2024-01-02T09:00:00", 3),
          ("ben", "p1", "2024-01-04T09:00:00", 4), ("ben", "p3", "2024-01-06T09:00:00", 4)]


def write_files(folder, fmt: str):
    """clicks (customer, product, when, score) as CSV / JSON lines / Parquet, and products.parquet
    keyed by ``sku``."""
    frame = pl.DataFrame(CLICKS, schema=["customer", "product", "when", "score"], orient="row")
    clicks = folder / f"clicks.{fmt}"
    {"csv": frame.write_csv, "jsonl": frame.write_ndjson, "parquet": frame.write_parquet}[fmt](clicks)
    items = folder / "products.parquet"
    pl.DataFrame({"sku": ["p1", "p2", "p3"], "name": ["Red mug", "Blue cup", "Tea pot"],
                  "category": ["kitchen", "kitchen", None], "price": [3.5, 4.0, 12.0]}).write_parquet(items)
    return clicks, items


def suggested(capsys, *argv) -> list[str]:
    """The key=value overrides of the ``run:`` line inspect-data printed."""
    assert main(["inspect-data", *argv]) == 0
    out = capsys.readouterr().out
    command = out.split("\nrun:\n", 1)[1].strip()
    return shlex.split(command)[4:]  # after "alphafuse run --config quickstart"


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_inspect_data_keys_read_the_files_in_one_try(tmp_path, capsys, fmt):
    clicks, items = write_files(tmp_path, fmt)
    overrides = suggested(capsys, str(clicks), "--items", str(items))
    assert overrides == ["data.source=interactions", f"data.path={clicks}", "data.user_col=customer",
                         "data.item_col=product", "data.time_col=when", "data.rating_col=score",
                         f"data.items_path={items}", "data.items_id_col=sku",
                         "data.text_template={name}. Category: {category}."]
    cfg = load_config("quickstart", overrides + ["data.min_rating=4"])
    src = load_source(cfg.data)
    assert src.interactions["rating"].to_list() == [4.0, 2.0, 5.0, 4.0, 5.0, 3.0, 4.0, 4.0]
    assert item_text(cfg.data, src)["text"].to_list() == ["Red mug. Category: kitchen.",
                                                          "Blue cup. Category: kitchen.", "Tea pot. Category: ."]
    prepare(cfg.data, tmp_path / "out")
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["dropped"]["below_min_rating"] == 2 and stats["interactions"] == 6


def test_inspect_data_shows_columns_types_and_misses(tmp_path, capsys):
    path = tmp_path / "log.csv"
    path.write_text("a,b,c\nx,1,2\n")
    assert main(["inspect-data", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"{path}: CSV, 3 columns, first 1 rows read" in out
    assert "  b  i64" in out
    assert "data.user_col=?  # no column looks like it: pick one of a, b, c" in out
    assert "data.text_template='item {item_id}'" in out or "'data.text_template=item {item_id}'" in out
    assert main(["inspect-data", str(tmp_path / "log.xlsx")]) == 2
    assert "unknown file type" in capsys.readouterr().err


def test_default_template_is_built_from_the_item_columns(tmp_path):
    assert default_template(["item_id", "title", "genres", "release_year"]) == \
        "{title}. Genres: {genres}. Release year: {release_year}."
    assert default_template(["item_id"]) == "item {item_id}"
    clicks, items = write_files(tmp_path, "csv")
    cfg = load_config("quickstart", [f"data.path={clicks}", f"data.items_path={items}", "data.source=interactions",
                                     "data.user_col=customer", "data.item_col=product", "data.time_col=when",
                                     "data.items_id_col=sku", "data.text_template=null"])
    src = load_source(cfg.data)
    assert src.columns == {"user_id": "customer", "item_id": "product", "timestamp": "when"}  # no 'rating' column
    assert item_text(cfg.data, src)["text"][0] == "Red mug. Category: kitchen. Price: 3.5."


def test_rating_col_and_items_id_col_errors_name_the_key(tmp_path, capsys):
    clicks, items = write_files(tmp_path, "csv")
    base = [f"data.path={clicks}", "data.source=interactions", "data.user_col=customer", "data.item_col=product",
            "data.time_col=when", "data.text_template=null"]
    code = main(["run", "--stages", "prepare", *base, "data.min_rating=4", f"run_dir={tmp_path / 'r'}"])
    assert code == 2
    assert "data.min_rating=4.0 is set but the interactions have no column 'rating' (data.rating_col)" \
        in capsys.readouterr().err
    code = main(["run", "--stages", "prepare", *base, f"data.items_path={items}", f"run_dir={tmp_path / 'r2'}"])
    assert code == 2
    assert f"file {items}, column 'product': missing required column" in capsys.readouterr().err
