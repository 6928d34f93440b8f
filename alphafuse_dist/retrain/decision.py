"""The promotion decision: promote the retrained model, or keep the previous one, given both models'
metrics on the same newest period and a tolerance.

Rule: promote iff the candidate's metric is not worse than the incumbent's by more than
``tolerance``, an ABSOLUTE difference in the metric's units (``candidate >= incumbent - tolerance``
for a higher-is-better metric such as NDCG@10). With no incumbent (a first period) the candidate is
promoted.

Example::

    promote, reason = decide_promotion({"overall": {"NDCG@10": 0.101}}, {"overall": {"NDCG@10": 0.100}},
                                       metric="overall/NDCG@10", tolerance=0.002)
"""
from __future__ import annotations

import math
from typing import Any, Mapping

from ..errors import ConfigError

DEFAULT_METRIC = "overall/NDCG@10"


def _metric_value(metrics: Mapping, metric: str, whose: str) -> float:
    """``metrics[a][b]...`` for ``metric = "a/b/..."``, as a float."""
    value: Any = metrics
    for part in metric.split("/"):
        if not isinstance(value, Mapping) or part not in value:
            keys = sorted(value) if isinstance(value, Mapping) else []
            raise ConfigError(f"promotion metric {metric!r} is not in the {whose}'s metrics (no {part!r}; keys there: "
                              f"{', '.join(map(str, keys[:12])) or 'none'}); name a metric both runs report, '/' "
                              "between nested keys (e.g. metrics/overall/NDCG@10 for a metrics.json)")
        value = value[part]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"promotion metric {metric!r} of the {whose} is {value!r}, not a number")
    return float(value)


def decide_promotion(candidate_metrics: Mapping, incumbent_metrics: Mapping | None, *, metric: str = "NDCG@10",
                     tolerance: float = 0.0, higher_is_better: bool = True) -> tuple[bool, str]:
    """The promotion rule: promote unless the candidate is worse than the incumbent by more than
    ``tolerance``.

    Args:
        candidate_metrics: the new run's metrics on the newest period.
        incumbent_metrics: the promoted run's metrics on the SAME period, or None (no incumbent:
            promote).
        metric: a key of the metrics, or a '/'-separated path into nested ones.
        tolerance: the largest ABSOLUTE drop allowed, in the metric's units (0.002 lets NDCG@10
            go from 0.100 to 0.098); >= 0.
        higher_is_better: False for losses and the like (then a rise is the drop).

    Returns:
        ``(promote, reason)``, the reason one line with both values. A non-finite candidate value
        is never promoted; a non-finite incumbent value always loses.

    Raises:
        ConfigError: a negative or non-finite tolerance, or the metric missing from either side
            (the message lists the keys that are there).
    """
    if not (tolerance >= 0 and math.isfinite(tolerance)):
        raise ConfigError(f"promotion tolerance {tolerance!r}: must be a finite absolute drop >= 0")
    new = _metric_value(candidate_metrics, metric, "candidate")
    if incumbent_metrics is None:
        return True, f"promote: no incumbent; candidate {metric} {new:.6g}"
    old = _metric_value(incumbent_metrics, metric, "incumbent")
    if not math.isfinite(new):
        return False, f"keep the incumbent: candidate {metric} is {new}"
    if not math.isfinite(old):
        return True, f"promote: incumbent {metric} is {old}, candidate {new:.6g}"
    drop = (old - new) if higher_is_better else (new - old)
    facts = f"candidate {metric} {new:.6g} vs incumbent {old:.6g}"
    if drop <= tolerance:
        return True, f"promote: {facts} (worse by {max(drop, 0.0):.6g} <= tolerance {tolerance:g})"
    return False, f"keep the incumbent: {facts} (worse by {drop:.6g} > tolerance {tolerance:g})"
