"""User-facing errors: one line, naming the file / column / row / config key at fault.

The CLI prints ``str(error)`` alone (no traceback) and exits with code 2 for these, also when a
Ray task or Ray Train worker raised them (:func:`user_error` finds them inside Ray's exceptions).
"""
from __future__ import annotations

import errno


def one_line(text: str) -> str:
    """``text`` on one line and printable: whitespace runs become one space, other control or
    non-printable characters (bytes of a binary file read as text) are shown escaped (``\\x00``)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in " ".join(text.split()))


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
        super().__init__(one_line(text))


class FileSystemError(AlphaFuseError):
    """A path cannot be created, read or written: no space left, no permission, a read-only file
    system, a file where a folder is expected."""


# the errors of OSError that are the file system's state, not a bug: reported as FileSystemError
_FILESYSTEM_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR,
                                errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG, errno.EFBIG})


def filesystem_error(exc: BaseException, path=None) -> FileSystemError | None:
    """The :class:`FileSystemError` of an ``OSError`` (also one a Ray task raised) whose errno is
    the file system's state (no space, no permission, ...), naming its file or else ``path``; None
    for any other exception, or when neither names a path."""
    for e in wrapped_errors(exc, through_ray_only=True):
        if isinstance(e, OSError) and not _is_ray_wrapper(e) and e.errno in _FILESYSTEM_ERRNOS and (e.filename or path):
            return FileSystemError(one_line(f"{e.filename or path}: {e.strerror or errno.errorcode[e.errno]}"))
    return None


# where Ray keeps the exception a task, an actor or a Train worker raised: RayTaskError.cause,
# Ray Train's WorkerGroupError.worker_failures (rank -> exception) and
# ControllerError.controller_failure, a Train worker's wrapped user exception (_base_exc)
_WRAPPED = ("cause", "worker_failures", "controller_failure", "_base_exc", "__cause__", "__context__")


def wrapped_errors(exc: BaseException, *, through_ray_only: bool = False):
    """``exc`` and the exceptions behind it, each once, breadth first: those a Ray task or Ray Train
    worker raised, unwrapped from Ray's exceptions, and Python's ``__cause__`` / ``__context__``
    chain (with ``through_ray_only``, only Ray's wrappers are looked into)."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        if through_ray_only and not _is_ray_wrapper(e):
            continue
        for name in _WRAPPED:
            value = getattr(e, name, None)
            values = value.values() if isinstance(value, dict) else [value]
            todo += [v for v in values if isinstance(v, BaseException)]


def user_error(exc: BaseException) -> AlphaFuseError | None:
    """The :class:`AlphaFuseError` behind ``exc``: ``exc`` itself, or the one a Ray task or Ray
    Train worker raised, unwrapped from Ray's exceptions (which carry the remote traceback in their
    text), or the :func:`filesystem_error` of an ``OSError`` naming its file; None when ``exc`` is
    not caused by input or the file system.

    A Ray task's error re-raised on the driver is an instance of both ``RayTaskError`` and the
    original class, with the remote traceback as its text: the original exception
    (``RayTaskError.cause``) is returned instead, whose text is the one-line message. Another
    error, even one raised while handling an AlphaFuseError, is a bug: only Ray's wrappers are
    looked into.
    """
    found = next((e for e in wrapped_errors(exc, through_ray_only=True)
                  if isinstance(e, AlphaFuseError) and not _is_ray_wrapper(e)), None)
    return found if found is not None else filesystem_error(exc)


def _is_ray_wrapper(exc: BaseException) -> bool:
    return any(c.__module__.startswith("ray.") for c in type(exc).__mro__)


def choose(registry: dict, name: str, key: str):
    """``registry[name]``; for an unknown name a one-line ConfigError naming the config ``key`` and
    the choices.

    A registry is a plain dict ``name -> builder``. Example::

        encoder = choose(ENCODERS, "gru4rec", "model.backbone")(cfg.model)
    """
    if name not in registry:
        raise ConfigError(f"{key}={name!r}: expected one of {', '.join(registry)}")
    return registry[name]
