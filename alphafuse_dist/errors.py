"""User-facing errors: one line, naming the file / column / row / config key at fault.

The CLI prints ``str(error)`` alone (no traceback) and exits with code 2 for these.
"""
from __future__ import annotations


class AlphaFuseError(Exception):
    """Base class of errors caused by user input (config, data), not by a bug."""


class ConfigError(AlphaFuseError):
    """A config key is unknown, has the wrong type, or an invalid value."""


class DataError(AlphaFuseError):
    """Input data is missing, malformed or inconsistent.

    Args:
        message: what is wrong and what is expected instead.
        file: the file at fault, when known.
        column: the column at fault, when known.
        row: the 0-based data row at fault (header not counted), when known.
    """

    def __init__(self, message: str, *, file=None, column: str | None = None, row: int | None = None):
        where = []
        if file is not None:
            where.append(f"file {file}")
        if column is not None:
            where.append(f"column '{column}'")
        if row is not None:
            where.append(f"row {row}")
        self.file, self.column, self.row = file, column, row
        text = f"{', '.join(where)}: {message}" if where else message
        super().__init__(" ".join(text.split()))  # always one line
