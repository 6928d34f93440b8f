"""Periodic batch retraining: the run registry (``registry``), the plan of a period (``plan``), the
promotion decision (``decision``) and the per-period job (``job``: ``alphafuse retrain``); drift of
the basis and the refit rule live in ``decompose.drift``.

The names below load their module on first use, so that the ``alphafuse`` command can register
``retrain`` at start-up without importing numpy.
"""
from __future__ import annotations

_MODULES = {
    "registry": ("Registry", "RunEntry", "resolve_previous"),
    "decision": ("decide_promotion",),
    "plan": ("Previous", "RetrainPlan", "load_previous", "period_run_id", "plan_period"),
}
__all__ = sorted(name for names in _MODULES.values() for name in names)


def __getattr__(name: str):
    import importlib

    for module, names in _MODULES.items():
        if name in names:
            return getattr(importlib.import_module(f".{module}", __name__), name)
    raise AttributeError(name)
