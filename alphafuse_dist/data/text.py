"""Item text for the prepare stage: clean the item table's text, fill in ``data.text_template``,
cut to ``data.text_max_tokens`` tokens of the embedding model's tokenizer, handle empty text.

Cleaning (each field value, before the template is filled in):

1. HTML entities are decoded as by :func:`html.unescape` (``&amp;`` -> ``&``, ``&#233;`` -> ``é``);
2. control characters other than whitespace (``\\x00``, ``\\x1b``, ``\\x7f``...) are removed;
3. runs of whitespace (tabs and newlines included) become one space, ends are stripped.

Example::

    texts = item_text(DataConfig(text_template="{title}"), src)   # item_id, text, empty
"""
from __future__ import annotations

import html
import string
from typing import Callable

import polars as pl

from ..config import DataConfig
from ..errors import ConfigError, DataError
from .sources import Source

_CONVERSIONS: dict[str | None, Callable[[str], str]] = {None: str, "s": str, "r": repr, "a": ascii}
# Cc is the Unicode control category; whitespace controls (\t \n \r \f \v) are kept for step 3,
# which turns them into single spaces instead of gluing the words on either side together
_CONTROL = r"[\p{Cc}--\s]"
_TOKENIZE_BATCH = 4096  # texts per tokenizer call: bounds the memory of the token lists


def clean_text(value: pl.Expr) -> pl.Expr:
    """``value`` (a string expression) with HTML entities decoded, control characters removed and
    whitespace collapsed; null stays null."""
    decoded = value.map_batches(_unescape, return_dtype=pl.String)
    return (decoded.str.replace_all(_CONTROL, "")
            .str.replace_all(r"\s+", " ").str.strip_chars())


def _unescape(values: pl.Series) -> pl.Series:
    """:func:`html.unescape` of the values where an entity can start (``&`` then ``#`` or a letter or
    digit); the rest (nearly all) are not touched, so the Python call runs only where needed."""
    has_entity = values.str.contains(r"&[#0-9A-Za-z]").fill_null(False)
    if not has_entity.any():
        return values
    rows = has_entity.arg_true()
    return values.scatter(rows, [html.unescape(v) for v in values.gather(rows).to_list()])


def default_template(columns: list[str]) -> str:
    """The item text template for ``data.text_template=None``, over the item table ``columns``
    (``item_id`` first): the first text column bare, every other one labelled, e.g.
    ``["item_id", "title", "genres", "release_year"]`` -> ``"{title}. Genres: {genres}. Release
    year: {release_year}."``; ``"item {item_id}"`` when there is no text column."""
    text = [c for c in columns[1:] if c.isidentifier()]  # str.format fields must be identifiers
    if not text:
        return "item {item_id}"
    labelled = (f"{c.replace('_', ' ').capitalize()}: {{{c}}}." for c in text[1:])
    return " ".join([f"{{{text[0]}}}.", *labelled])


def template_for(cfg: DataConfig, src: Source) -> str:
    """``data.text_template``, or :func:`default_template` of ``src``'s item columns when it is None."""
    return cfg.text_template if cfg.text_template is not None else default_template(src.items.columns)


def item_text(cfg: DataConfig, src: Source) -> pl.DataFrame:
    """The text of every catalogue item: ``item_id:str``, ``text:str``, ``empty:bool``.

    ``text`` is the template (:func:`template_for`) filled in as by ``str.format`` from the item's cleaned
    columns (``item_id`` and the text columns; missing values render as ""), then whitespace
    collapsed again. ``empty`` is true where every field the template names is empty after
    cleaning (the literal parts alone say nothing about the item). Conversions and format specs
    (``{title!r}``, ``{title:.40}``) work as in ``str.format``.

    Raises:
        ConfigError: the template is not a valid format string or has positional fields.
        DataError: a field names no column of the item table (the columns are listed).
    """
    template = template_for(cfg, src)
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ConfigError(f"data.text_template={template!r}: {e}") from None
    items = src.items
    fields = []
    for _, field, _, _ in parts:
        if field is None:
            continue
        if field == "" or field.isdigit():
            raise ConfigError(f"data.text_template={template!r}: fields must name item columns, "
                              f"e.g. {{title}}; found {{{field}}}")
        if field not in items.columns:
            raise DataError(f"data.text_template names an item column that does not exist; item columns: "
                            f"{', '.join(items.columns)} (data.text_template=null builds the template from them)",
                            file=src.files.get("items"), column=field)
        fields.append(field)
    cleaned = items.lazy().select("item_id", *(clean_text(pl.col(f).cast(pl.String)).fill_null("").alias(f)
                                               for f in dict.fromkeys(fields) if f != "item_id"))
    pieces: list[pl.Expr] = []
    for literal, field, spec, conversion in parts:
        if literal:
            pieces.append(pl.lit(literal))
        if field is None:
            continue
        value = pl.col(field)
        if spec or conversion:
            # rare, so a per-item Python call is acceptable here; plain fields stay vectorised
            convert = _CONVERSIONS[conversion]
            value = value.map_elements(lambda v, c=convert, s=spec: format(c(v), s), return_dtype=pl.String)
        pieces.append(value)
    text = pl.concat_str(pieces) if pieces else pl.lit("")
    empty = pl.all_horizontal([pl.col(f) == "" for f in fields]) if fields else pl.lit(True)
    return cleaned.select("item_id", text.str.replace_all(r"\s+", " ").str.strip_chars().alias("text"),
                          empty.alias("empty")).collect()


def fill_missing(texts: pl.DataFrame, cfg: DataConfig, items_file) -> tuple[pl.DataFrame, int]:
    """``texts`` (``item_id``, ``text``, ``empty``) with the empty items handled by
    ``data.missing_text``, and the number of placeholders written.

    ``"placeholder"``: ``data.placeholder_text`` with ``{item_id}`` filled in replaces the text.
    ``"error"``: raises :class:`DataError` naming ``items_file``, the ``text`` column and the first ids.
    """
    empty = texts.filter("empty")["item_id"]
    if empty.len() == 0:
        return texts, 0
    if cfg.missing_text == "error":
        shown = ", ".join(repr(i) for i in empty.head(5).to_list())
        template = repr(cfg.text_template) if cfg.text_template is not None else "built from the item columns"
        raise DataError(f"{empty.len()} items have no text after cleaning (template "
                        f"{template}), e.g. item ids {shown}; fill them in or set "
                        "data.missing_text=placeholder", file=items_file, column="text")
    placeholder = _placeholder(cfg.placeholder_text)
    return texts.with_columns(pl.when("empty").then(placeholder).otherwise("text").alias("text")), empty.len()


def _placeholder(template: str) -> pl.Expr:
    """``template`` with ``{item_id}`` filled in, as a vectorised expression."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ConfigError(f"data.placeholder_text={template!r}: {e}") from None
    pieces: list[pl.Expr] = []
    for literal, field, spec, conversion in parts:
        if literal:
            pieces.append(pl.lit(literal))
        if field is None:
            continue
        if field != "item_id" or spec or conversion:
            raise ConfigError(f"data.placeholder_text={template!r}: the only field allowed is {{item_id}}")
        pieces.append(pl.col("item_id"))
    return pl.concat_str(pieces) if pieces else pl.lit("")


def load_tokenizer(path: str):
    """The tokenizer of the model folder ``path`` (offline), for :func:`truncate_tokens`."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConfigError(f"data.text_max_tokens: cannot load a tokenizer from {path}: "
                          f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None


def truncate_tokens(texts: pl.Series, tokenizer_path: str, max_tokens: int) -> tuple[pl.Series, int]:
    """``texts`` cut to their first ``max_tokens`` tokens of the tokenizer in ``tokenizer_path``
    (special tokens such as ``[CLS]`` not counted), and how many were cut.

    Only texts longer than ``max_tokens // 2`` UTF-8 bytes are tokenised (and the tokenizer is
    loaded only if there are any): every WordPiece, BPE and byte-level token covers at least one
    byte and a SentencePiece word marker adds at most one token per byte, so a shorter text
    cannot exceed the limit. A fast tokenizer's character offsets cut the original string, so the
    kept text is exactly the input's prefix (an uncased tokenizer's decode would lower-case it and
    strip accents); a slow tokenizer's kept tokens are decoded instead.
    """
    rows = (texts.str.len_bytes() > max_tokens // 2).arg_true()
    if rows.len() == 0:
        return texts, 0
    tokenizer = load_tokenizer(tokenizer_path)
    long = texts.gather(rows).to_list()
    cut_rows, cut_texts = [], []
    for start in range(0, len(long), _TOKENIZE_BATCH):
        batch = long[start:start + _TOKENIZE_BATCH]
        enc = tokenizer(batch, add_special_tokens=False, return_offsets_mapping=tokenizer.is_fast,
                        return_attention_mask=False, return_token_type_ids=False)
        for j, ids in enumerate(enc["input_ids"]):
            if len(ids) > max_tokens:
                cut_rows.append(rows[start + j])
                cut_texts.append(batch[j][:enc["offset_mapping"][j][max_tokens - 1][1]] if tokenizer.is_fast
                                 else tokenizer.decode(ids[:max_tokens]))
    if not cut_rows:
        return texts, 0
    return texts.scatter(cut_rows, cut_texts), len(cut_rows)
