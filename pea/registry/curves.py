"""The training curves as MLflow metrics, in a number of calls that does not grow with the steps.

    metrics = curve(history_path, timestamp)     # pea.registry logs these, and history.jsonl as an artifact
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from mlflow.entities import Metric

CURVE_POINTS = 500  # points of each training curve sent to MLflow; the whole history goes as an artifact


def curve(history_path: Path, timestamp: int) -> list[Metric]:
    """The loss curves as MLflow metrics in bounded number, whatever the steps: each term's mean over windows of k
    consecutive steps (k = ⌈steps / CURVE_POINTS⌉), at the window's last step; NaN (a term no row of a step used)
    is left out of a mean. At most CURVE_POINTS × terms metrics, i.e. a few log_batch calls, where one per step
    made ~500 calls for a 50k-step run; history.jsonl (every step) is logged as an artifact beside them."""
    history = [json.loads(line) for line in Path(history_path).read_text().splitlines()]
    k = max(1, -(-len(history) // CURVE_POINTS))
    metrics = []
    for start in range(0, len(history), k):
        window = history[start:start + k]
        for name in (n for n in window[-1] if n != "step"):
            values = np.array([h[name] for h in window if name in h], dtype=np.float64)
            finite = values[~np.isnan(values)]
            metrics.append(Metric(f"train/{name}", float(finite.mean()) if finite.size else float("nan"), timestamp,
                                  window[-1]["step"]))
    return metrics
