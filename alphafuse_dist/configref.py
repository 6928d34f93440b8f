"""The config reference (docs/config.md), generated from the dataclasses in :mod:`alphafuse_dist.config`.

Each key's description is the comment written beside it or directly above it in ``config.py``, so
the reference cannot drift from the code (a test compares docs/config.md with :func:`render`).

    python -m alphafuse_dist.configref > docs/config.md
"""
from __future__ import annotations

import dataclasses
import inspect
import io
import tokenize
import types
import typing
from typing import Any, Literal

from . import config


def _comments(source: str) -> dict[int, str]:
    """Line number -> the text of the comment on that line."""
    out = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            out[tok.start[0]] = tok.string.lstrip("#").strip()
    return out


def _field_docs(cls: type) -> dict[str, str]:
    """Field name -> the comment block directly above it plus its trailing comment."""
    lines, first = inspect.getsourcelines(cls)
    source = "".join(lines)
    comments = _comments(source)
    docs = {}
    for number, line in enumerate(lines, start=1):
        stripped = line.strip()
        name = stripped.split(":", 1)[0]
        if not name.isidentifier() or ":" not in stripped or stripped.startswith(("def ", "#", "@")):
            continue
        above = []
        previous = number - 1
        while previous >= 1 and lines[previous - 1].strip().startswith("#"):
            text = comments.get(previous, "")
            if text.startswith("---"):  # a section marker, not this key's description
                break
            above.insert(0, text)
            previous -= 1
        trailing = comments.get(number, "") if "#" in line else ""
        docs[name] = " ".join(part for part in (*above, trailing) if part)
    return docs


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " \\| ".join(f"`{c}`" for c in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _default(f: dataclasses.Field) -> str:
    value = f.default_factory() if f.default is dataclasses.MISSING else f.default
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return f"`{value}`" if value != "" else '`""`'


def render() -> str:
    """docs/config.md as a string."""
    out = ["# Config reference",
           "",
           "Generated from `alphafuse_dist/config.py` by `python -m alphafuse_dist.configref > docs/config.md`;",
           "a test checks that this file matches the code. Set keys in a YAML file or preset, or on the command",
           "line as `key=value` overrides (`train.lr=0.01`, `eval.ks=[10,50]`).",
           ""]
    sections = [("", config.RunConfig)] + [
        (f.name, f.default_factory().__class__) for f in dataclasses.fields(config.RunConfig)
        if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory())]
    for prefix, cls in sections:
        hints = typing.get_type_hints(cls)
        docs = _field_docs(cls)
        title = f"`{prefix}.*`" if prefix else "top level"
        out += [f"## {title}", ""]
        doc = inspect.getdoc(cls)
        if doc and doc != inspect.getdoc(object) and not doc.startswith(cls.__name__ + "("):
            out += [doc.splitlines()[0], ""]
        out += ["| key | type | default | meaning |", "|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                continue
            key = f"{prefix}.{f.name}" if prefix else f.name
            meaning = docs.get(f.name, "").replace("|", "\\|")
            out.append(f"| `{key}` | {_type_name(hints[f.name])} | {_default(f)} | {meaning} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(render(), end="")
