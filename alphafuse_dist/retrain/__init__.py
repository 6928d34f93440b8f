"""Periodic batch retraining: the run registry and promotion (``registry``), the per-period job
(``job``: ``alphafuse retrain``); drift of the basis and the refit rule live in ``decompose.drift``.

The names below load their module on first use, so that the ``alphafuse`` command can register
``retrain`` at start-up without importing numpy.
"""
from __future__ import annotations

_REGISTRY = ("Registry", "RunEntry", "decide_promotion", "resolve_previous")
__all__ = sorted(_REGISTRY)


def __getattr__(name: str):
    if name in _REGISTRY:
        from . import registry

        return getattr(registry, name)
    raise AttributeError(name)
