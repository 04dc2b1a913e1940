"""MLflow tracking against a real `mlflow server` on 127.0.0.1: runs carry config, metrics and data versions."""

import os
import subprocess
import sys

import pytest
from conftest import REPO, compose_config, free_port, printed_warnings, tiny_overrides
from mlflow import MlflowClient

from esclab.errors import EsclabError
from esclab.tracking import Tracker, dvc_md5


def test_train_py_logs_one_fold_to_a_real_server(mlflow_server, tiny_data, tmp_path):
    overrides = [o for o in tiny_overrides(tiny_data, tmp_path, "fold=2", "trainer.max_epochs=1")
                 if not o.startswith("tracking.uri")]
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server}
    result = subprocess.run([sys.executable, str(REPO / "train.py"), *overrides], cwd=tmp_path, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert printed_warnings(result.stdout + result.stderr) == []  # a quiet log (esclab/logs.py)

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("esclab")
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if r.data.tags["esclab.fold"] == "all")
    child = next(r for r in runs if r.data.tags["esclab.fold"] == "2")
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert child.info.status == "FINISHED"
    assert child.data.params["lr"] == "0.001" and child.data.params["model.name"] == "cnn4"
    assert child.data.params["features.n_mels"] == "32" and child.data.params["fold"] == "2"
    assert not [name for name in child.data.params if "/" in name]  # each setting once, not again as model/channels
    assert {"train/loss", "val/acc", "test/acc"} <= set(child.data.metrics)
    for name in ("raw", "split", "features"):
        assert child.data.tags[f"data.{name}.md5"] == dvc_md5(tiny_data[name])
    assert tiny_data["features"].name and child.data.tags["data.features.md5"].endswith(".dir")
    assert child.data.tags["git.commit"] and child.data.tags["git.dirty"] in ("true", "false", "unknown")
    inputs = client.get_run(child.info.run_id).inputs.dataset_inputs
    assert inputs and inputs[0].dataset.name == "synthetic-split" and inputs[0].dataset.digest
    artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
    assert "checkpoint" in artifacts


def test_a_model_logged_for_a_fold_predicts_from_a_feature_array(mlflow_server, tiny_data, tmp_path):
    import mlflow
    import numpy as np

    from esclab.training.run import train

    cfg = compose_config(*tiny_overrides(tiny_data, tmp_path, "fold=3", "trainer.max_epochs=1",
                                         f"tracking.uri={mlflow_server}"))
    train(cfg)
    client = MlflowClient(mlflow_server)
    run = client.search_runs([client.get_experiment_by_name("esclab").experiment_id],
                             "tags.`esclab.fold` = '3'")[0]
    models = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
    model_uri = next(m.model_uri for m in models if m.source_run_id == run.info.run_id)
    mlflow.set_tracking_uri(mlflow_server)
    model = mlflow.pyfunc.load_model(model_uri)
    features = np.load(tiny_data["features"] / "logmel.npy")[:4].astype(np.float32)
    probs = np.asarray(model.predict(features))
    assert probs.shape == (4, 5) and np.allclose(probs.sum(axis=1), 1, atol=1e-5)


def test_unreachable_server_fails_before_training(tiny_data, tmp_path):
    cfg = compose_config(*tiny_overrides(tiny_data, tmp_path, "fold=1",
                                         f"tracking.uri=http://127.0.0.1:{free_port()}"))
    with pytest.raises(EsclabError, match="is not reachable"):
        Tracker(cfg)
    assert not (tmp_path / "models").exists()


def test_parent_run_is_running_until_evaluate_failed_with_a_fold_and_spans_its_folds(tiny_data, tmp_path, monkeypatch):
    """The parent's status and duration tell the truth: RUNNING from the first fold to the end of evaluate,
    FAILED when a fold fails, and its start and end enclose every fold's."""
    from esclab.training.module import Classifier
    from esclab.training.run import train

    def parent_and_children():
        client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
        runs = client.search_runs([client.get_experiment_by_name("esclab").experiment_id])
        parent = next(r for r in runs if r.data.tags["esclab.fold"] == "all")
        return parent, {r.data.tags["esclab.fold"]: r for r in runs if r is not parent}

    # Run from elsewhere: MLflow's default artifact root, ./mlruns, follows the working directory, so an embedded
    # database would scatter its runs' files over every folder a command ran in (the suite's over the checkout).
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    overrides = tiny_overrides(tiny_data, tmp_path, "trainer.max_epochs=1", "tracking.log_model=false")
    train(compose_config(*overrides, "fold=1"))
    parent, children = parent_and_children()
    assert (parent.info.status, children["1"].info.status) == ("RUNNING", "FINISHED")
    assert parent.data.tags["esclab.hardware"].endswith(("no GPU", "CPU cores"))

    def diverged(self, batch, batch_idx):
        raise FloatingPointError("loss is NaN")
    with monkeypatch.context() as patch:
        patch.setattr(Classifier, "training_step", diverged)
        with pytest.raises(FloatingPointError):
            train(compose_config(*overrides, "fold=2"))
    parent, children = parent_and_children()
    assert (parent.info.status, children["2"].info.status) == ("FAILED", "FAILED")

    train(compose_config(*overrides))  # the whole cross-validation: fold 1 is kept, 2 retried, 3-5 trained
    parent, children = parent_and_children()
    assert parent.info.status == "FINISHED" and {c.info.status for c in children.values()} == {"FINISHED"}
    assert parent.info.start_time <= min(c.info.start_time for c in children.values())
    assert parent.info.end_time >= max(c.info.end_time for c in children.values())
    assert "accuracy_mean" in parent.data.metrics
    assert parent.info.artifact_uri.startswith((tmp_path / "mlruns").as_uri())  # beside mlflow.db
    assert list((tmp_path / "mlruns").rglob("metrics.json")) and not (tmp_path / "elsewhere/mlruns").exists()
