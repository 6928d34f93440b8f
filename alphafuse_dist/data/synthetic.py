"""Synthetic interaction logs and item catalogues for benchmarks and tests, in the ``interactions``
source layout (``data.source=interactions``).

Item popularity follows a Zipf-like power law (a few items get most interactions, as in real
logs), user activity a milder one; titles, categories and brands are drawn from word lists, a
small share with HTML entities and stray whitespace, as scraped catalogues have. Everything is
generated with numpy / pyarrow in whole-array operations.

Example::

    write_synthetic(Path("bench"), n_interactions=10_000_000, n_items=1_000_000, n_users=500_000, seed=0)
    # bench/interactions.parquet, bench/items.parquet
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..runtime.seeding import seeded_rng
from ..runtime.parquet import write_table

_ADJECTIVES = ("Classic", "Deluxe", "Portable", "Wireless", "Organic", "Vintage", "Premium", "Compact",
               "Ultra", "Smart", "Heavy-Duty", "Ergonomic", "Stainless", "Handmade", "Waterproof", "Mini",
               "Professional", "Lightweight", "Rechargeable", "Adjustable")
_NOUNS = ("Headphones", "Coffee Maker", "Backpack", "Desk Lamp", "Water Bottle", "Keyboard", "Novel",
          "Yoga Mat", "Phone Case", "Board Game", "Sneakers", "Blender", "Watch", "Jacket", "Cookbook",
          "Speaker", "Tent", "Drill", "Sunglasses", "Notebook", "Guitar Strings", "Puzzle", "Skillet")
_EXTRAS = ("with USB-C", "for Kids", "2-Pack", "Set of 4", "(Black)", "(Large)", "- 2nd Edition",
           "& Carrying Case", "with Stand", "for Travel", "", "", "", "")
_CATEGORIES = ("Electronics", "Home & Kitchen", "Books", "Sports & Outdoors", "Toys & Games",
               "Clothing", "Tools", "Beauty", "Music", "Office Products", "Garden", "Automotive")
_BRANDS = ("Acme", "Northwind", "Globex", "Initech", "Umbrella", "Stark", "Wayne", "Hooli", "Vandelay",
           "Soylent", "Tyrell", "Cyberdyne", "Aperture", "Wonka", "Gringotts")


def write_synthetic(out_dir: Path, n_interactions: int, n_items: int, n_users: int, seed: int = 0
                    ) -> dict[str, Path]:
    """Write ``interactions.parquet`` and ``items.parquet`` into ``out_dir``.

    Columns: interactions ``user_id:string`` (``u<k>``), ``item_id:string`` (``i<k>``),
    ``timestamp:int64`` (epoch seconds in 2020-2024); items ``item_id:string``, ``title:string``,
    ``categories:string`` (one or two, ", "-joined), ``brand:string`` (null for ~5% of items).
    Items are ranked by a random permutation and drawn with probability ~ 1 / rank^0.9; users with
    ~ 1 / rank^0.6. Every item and user occurs in the catalogue; some items get no interaction.

    Returns:
        ``{"interactions": path, "items": path}``.
    """
    rng = seeded_rng(seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    items = _power_law_draw(rng, n_items, n_interactions, 0.9)
    users = _power_law_draw(rng, n_users, n_interactions, 0.6)
    start, end = 1_577_836_800, 1_735_689_600  # 2020-01-01 .. 2025-01-01 UTC
    interactions = pa.table({
        "user_id": _ids("u", users),
        "item_id": _ids("i", items),
        "timestamp": rng.integers(start, end, n_interactions, dtype=np.int64),
    })
    catalogue = pa.table({
        "item_id": _ids("i", np.arange(n_items)),
        "title": _titles(rng, n_items),
        "categories": _categories(rng, n_items),
        "brand": pa.array(np.array(_BRANDS, dtype=object)[rng.integers(0, len(_BRANDS), n_items)],
                          mask=rng.random(n_items) < 0.05, type=pa.string()),
    })
    paths = {"interactions": out_dir / "interactions.parquet", "items": out_dir / "items.parquet"}
    write_table(interactions, paths["interactions"], compression="zstd")
    write_table(catalogue, paths["items"], compression="zstd")
    return paths


def _power_law_draw(rng: np.random.Generator, n: int, size: int, exponent: float) -> np.ndarray:
    """``size`` draws from 0..n-1 with P(k) ~ 1 / rank(k)^exponent, ranks a random permutation."""
    weights = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** exponent
    cdf = np.cumsum(weights)
    ranks = np.searchsorted(cdf, rng.random(size) * cdf[-1], side="right")
    return rng.permutation(n)[np.minimum(ranks, n - 1)]


def _ids(prefix: str, numbers: np.ndarray) -> pa.Array:
    return pc.binary_join_element_wise(prefix, pa.array(numbers).cast(pa.string()), "")


def _pick(rng: np.random.Generator, words: tuple[str, ...], n: int) -> pa.Array:
    return pa.array(np.array(words, dtype=object)[rng.integers(0, len(words), n)], type=pa.string())


def _titles(rng: np.random.Generator, n: int) -> pa.Array:
    """"<Adjective> <Noun> <extra>" with a model number; ~2% with an HTML entity, ~1% with a tab."""
    model = pc.binary_join_element_wise("Model ", pa.array(rng.integers(100, 9999, n)).cast(pa.string()), "")
    title = pc.binary_join_element_wise(_pick(rng, _ADJECTIVES, n), _pick(rng, _NOUNS, n), model,
                                        _pick(rng, _EXTRAS, n), " ")
    entity = pa.array(rng.random(n) < 0.02)
    title = pc.if_else(entity, pc.replace_substring(title, " ", " &amp; ", max_replacements=1), title)
    tab = pa.array(rng.random(n) < 0.01)
    return pc.if_else(tab, pc.binary_join_element_wise(title, "\t(new)", ""), title)


def _categories(rng: np.random.Generator, n: int) -> pa.Array:
    first, second = _pick(rng, _CATEGORIES, n), _pick(rng, _CATEGORIES, n)
    two = pa.array(rng.random(n) < 0.4)
    return pc.if_else(two, pc.binary_join_element_wise(first, second, ", "), first)
