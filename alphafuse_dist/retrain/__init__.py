"""Periodic batch retraining: drift of the basis and the refit rule, the run registry and promotion."""
from .drift import (DriftReport, basis_drift, carry_id_vectors, id_carry_matrix, id_vectors_after_refit,
                    principal_cosines, should_refit, spectrum_change_plot)
from .registry import Registry, RunEntry, decide_promotion, resolve_previous

__all__ = ["DriftReport", "Registry", "RunEntry", "basis_drift", "carry_id_vectors", "decide_promotion",
           "id_carry_matrix", "id_vectors_after_refit", "principal_cosines", "resolve_previous", "should_refit",
           "spectrum_change_plot"]
