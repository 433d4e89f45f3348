"""Loss curves reach MLflow in a bounded number of calls, whatever the number of steps."""

import json
import math

from mlflow import MlflowClient

from pea.registry.curves import CURVE_POINTS, curve


def test_a_50k_step_history_is_a_few_batches_of_window_means(tmp_path):
    steps = 50_000
    with open(tmp_path / "history.jsonl", "w") as f:
        for i in range(steps):
            f.write(json.dumps({"step": i + 1, "loss": float(i), "token_kd": float("nan") if i % 2 else 1.0,
                                "unused": float("nan"), "lr": 1e-4}) + "\n")
    metrics = curve(tmp_path / "history.jsonl", 0)
    k = steps // CURVE_POINTS  # 100 steps a point
    by_name = {}
    for m in metrics:
        by_name.setdefault(m.key, []).append(m)
    assert set(by_name) == {"train/loss", "train/token_kd", "train/unused", "train/lr"}
    assert all(len(points) == CURVE_POINTS for points in by_name.values())
    first, last = by_name["train/loss"][0], by_name["train/loss"][-1]
    assert (first.step, first.value) == (k, sum(range(k)) / k) and last.step == steps
    assert by_name["train/token_kd"][0].value == 1.0  # the mean of the steps that had the term
    assert math.isnan(by_name["train/unused"][0].value)

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.create_run(client.create_experiment("curves", artifact_location=str(tmp_path / "artifacts")))
    calls = 0
    for start in range(0, len(metrics), 1000):  # what pea.registry does with them: MLflow's cap a batch
        client.log_batch(run.info.run_id, metrics=metrics[start:start + 1000])
        calls += 1
    assert calls == 2  # one call a step used to be 50,000 × 4 metrics / 1,000 = 200 calls
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert len(history) == CURVE_POINTS and max(h.step for h in history) == steps
