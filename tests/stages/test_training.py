"""What the shared stage skeleton leaves on the stage's MLflow run (real sqlite store)."""

import json
import math

from mlflow.tracking import MlflowClient

from pipeline.stages.training import finish_stage
from pipeline.tracking import PARENT_RUN_ENV, stage_run


def test_final_metrics_end_their_series_and_are_not_copied_as_final(
    tmp_path, default_config, monkeypatch
):
    monkeypatch.delenv(PARENT_RUN_ENV, raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = {**default_config, "tracking": {"uri": uri, "experiment": "t", "log_model": False}}
    metrics = {
        "val_loss": 0.5,  # its series already ends with it
        "tokens_per_second": 100.0,  # the run's mean: differs from the last step's rate
        "test_accuracy": 0.9,  # only known at the end
        "test_roc_auc": math.nan,
        "method": "lora",
    }
    with stage_run(config, "finetune-instruct") as tracker:
        tracker.log_metrics({"val_loss": 0.7, "tokens_per_second": 80.0}, step=1)
        tracker.log_metrics({"val_loss": 0.5, "tokens_per_second": 90.0}, step=2)
        finish_stage(tracker, config, tmp_path, metrics, 2, [])

    client = MlflowClient(uri)
    run = client.get_run(tracker.run_id)
    assert not [k for k in run.data.metrics if k.startswith("final_")]
    assert run.data.metrics["val_loss"] == 0.5 and run.data.metrics["test_accuracy"] == 0.9
    assert run.data.metrics["tokens_per_second"] == 100.0

    def history(key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in client.get_metric_history(tracker.run_id, key)]

    assert history("val_loss") == [(1, 0.7), (2, 0.5)]  # not a second point at step 2
    assert history("tokens_per_second") == [(1, 80.0), (2, 90.0), (2, 100.0)]
    assert history("test_accuracy") == [(2, 0.9)]
    assert math.isnan(run.data.metrics["test_roc_auc"])
    assert json.loads((tmp_path / "metrics.json").read_text())["test_roc_auc"] is None
