"""The one summary every latency or rounds figure is reported with, so ``p95`` means the same everywhere.

Imports only numpy: the Controller, the evaluator and the benchmarks (also on a bare GPU
machine) all use it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

#: the percentiles :func:`percentile_summary` reports by default (``p50``, ``p95``, ``p99``)
PERCENTILES = (50, 95, 99)


def percentile_summary(values: Iterable[float], percentiles: Sequence[int] = PERCENTILES
                       ) -> dict[str, float | int | None]:
    """``{'n', 'mean', 'std', 'min', 'max', 'p50', 'p95', 'p99'}`` of ``values`` (ms, rounds, ...).

    Percentiles by linear interpolation between order statistics (``numpy.percentile``);
    ``percentiles`` chooses the ``p<q>`` keys. Empty ``values`` give ``n=0`` and None everywhere else.
    """
    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None,
                **{f"p{p}": None for p in percentiles}}
    out: dict[str, float | int | None] = {"n": int(v.size), "mean": float(v.mean()), "std": float(v.std()),
                                          "min": float(v.min()), "max": float(v.max())}
    for p in percentiles:
        out[f"p{p}"] = float(np.percentile(v, p))
    return out


def percentile(values: Iterable[float], q: float) -> float:
    """The ``q``-th percentile (0–100) of ``values``, as :func:`percentile_summary` computes it."""
    return float(np.percentile(np.asarray(list(values), dtype=np.float64), q))
