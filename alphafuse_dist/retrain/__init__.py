"""Periodic batch retraining: drift of the basis and the refit rule (``drift``), the run registry
and promotion (``registry``), the per-period job (``job``: ``alphafuse retrain``).

The names below load their module on first use, so that the ``alphafuse`` command can register
``retrain`` at start-up without importing numpy.
"""
from __future__ import annotations

_DRIFT = ("DriftReport", "basis_drift", "carry_id_vectors", "id_carry_matrix", "id_vectors_after_refit",
          "principal_cosines", "should_refit", "spectrum_change_plot")
_REGISTRY = ("Registry", "RunEntry", "decide_promotion", "resolve_previous")
__all__ = sorted(_DRIFT + _REGISTRY)


def __getattr__(name: str):
    if name in _DRIFT:
        from . import drift

        return getattr(drift, name)
    if name in _REGISTRY:
        from . import registry

        return getattr(registry, name)
    raise AttributeError(name)
