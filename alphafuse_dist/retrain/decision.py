"""The promotion decision: promote the retrained model, or keep the previous one, given both models'
metrics on the same newest period and a tolerance.

Rule: promote iff the candidate's metric is not worse than the incumbent's by more than
``tolerance``, an ABSOLUTE difference in the metric's units (``candidate >= incumbent - tolerance``
for a higher-is-better metric such as NDCG@10). With no incumbent (a first period) the candidate is
promoted.

Evidence beside the rule (:func:`evidence`): the difference candidate - incumbent of the metric's
per-user values with a bootstrap confidence interval over the test users (paired: both models are
scored on the same users, so each resample draws users and takes both models' values for them;
seeded numpy), and a flag when the validation or test part has fewer users than
``retrain.min_eval_users``: such a candidate is not promoted unless ``retrain.promote_few_users``.

Example::

    promote, reason = decide_promotion({"overall": {"NDCG@10": 0.101}}, {"overall": {"NDCG@10": 0.100}},
                                       metric="overall/NDCG@10", tolerance=0.002)
    facts = evidence(candidate_ranks, incumbent_ranks, "overall/NDCG@10", users={"valid": 80, "test": 75},
                     settings=cfg.retrain)   # {"difference", "low", "high", ..., "flag"}
"""
from __future__ import annotations

import math
import re
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


def per_user_values(ranks, metric: str):
    """Each user's value of ``metric`` (``<group>/<HR|NDCG|MRR>@<k>``) from an evaluate stage's
    ``ranks.parquet`` table (pyarrow), numpy float64 [users in the group]; None for another metric."""
    import numpy as np  # here: planning a period imports no numpy

    group, _, name = metric.rpartition("/")
    found = re.fullmatch(r"(HR|NDCG|MRR)@(\d+)", name)
    if found is None or (group != "overall" and group not in ranks.column_names):
        return None
    r = ranks.column("rank").to_numpy().astype(np.float64)
    if group != "overall":
        r = r[ranks.column(group).to_numpy(zero_copy_only=False)]
    hit = r < int(found.group(2))
    value = {"HR": np.ones_like(r), "NDCG": 1.0 / np.log2(r + 2.0), "MRR": 1.0 / (r + 1.0)}[found.group(1)]
    return np.where(hit, value, 0.0)


def bootstrap_difference(candidate, incumbent, metric: str, *, samples: int = 1000, seed: int = 0,
                         confidence: float = 0.95) -> dict | None:
    """Mean difference candidate - incumbent of ``metric`` over the test users with a percentile
    bootstrap interval (``samples`` resamples of the users, ``numpy.random.default_rng(seed)``).

    Args:
        candidate, incumbent: the two models' ``ranks.parquet`` tables. Paired when they hold the
            same users in the same order (each resample takes both models' values of the drawn
            users), else each side is resampled on its own.

    Returns:
        ``{"difference", "low", "high", "confidence", "samples", "seed", "users", "paired"}``, or
        None when ``metric`` is not a per-user metric (e.g. ``overall/users``) or a side has no users.
    """
    import numpy as np

    a, b = per_user_values(candidate, metric), per_user_values(incumbent, metric)
    if a is None or b is None or not len(a) or not len(b):
        return None
    rng = np.random.default_rng(seed)
    paired = len(a) == len(b) and candidate.column("user_idx").equals(incumbent.column("user_idx"))
    if paired:
        diff = a - b
        draws = np.stack([diff[rng.integers(0, len(diff), len(diff))].mean() for _ in range(samples)])
    else:
        draws = np.stack([a[rng.integers(0, len(a), len(a))].mean() - b[rng.integers(0, len(b), len(b))].mean()
                          for _ in range(samples)])
    tail = (1.0 - confidence) / 2
    low, high = np.quantile(draws, [tail, 1.0 - tail])
    return {"difference": float(a.mean() - b.mean()), "low": float(low), "high": float(high),
            "confidence": confidence, "samples": samples, "seed": seed, "users": int(len(a)), "paired": bool(paired)}


def few_users_flag(users: Mapping[str, int], min_users: int) -> str | None:
    """One line when a part (``{"valid": n, "test": m}``) has fewer than ``min_users`` users, else None."""
    few = [f"{part} {n}" for part, n in users.items() if n < min_users]
    if not few:
        return None
    return (f"too few users to compare on ({', '.join(few)} < retrain.min_eval_users={min_users}): the metrics "
            "are mostly noise")


def describe(ci: dict | None, metric: str) -> str:
    """``candidate - incumbent = d [95% CI lo, hi] over U test users (paired bootstrap, n resamples)``."""
    if ci is None:
        return f"no per-user values of {metric} to bootstrap"
    inside = "includes 0: no clear difference" if ci["low"] <= 0 <= ci["high"] else "excludes 0"
    return (f"candidate - incumbent {metric} = {ci['difference']:+.4g} [{ci['confidence']:.0%} CI "
            f"{ci['low']:+.4g}, {ci['high']:+.4g}; {inside}] over {ci['users']} test users "
            f"({'paired' if ci['paired'] else 'unpaired'} bootstrap, {ci['samples']} resamples)")
