"""MLflow tracking against a real `mlflow server` on 127.0.0.1: runs carry config, metrics and data versions."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from conftest import REPO, compose_config, tiny_overrides
from mlflow import MlflowClient

from esclab.errors import EsclabError
from esclab.tracking import Tracker, dvc_md5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'server.db'}", "--artifacts-destination", str(root / "artifacts"),
         "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{uri}/health", timeout=1).ok:
                    break
            except requests.RequestException:  # refused while starting, or a read timeout on a busy machine
                time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not start within 90 s")
        yield uri
    finally:  # the server and the workers it started, whatever happened
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_train_py_logs_one_fold_to_a_real_server(mlflow_server, tiny_data, tmp_path):
    overrides = [o for o in tiny_overrides(tiny_data, tmp_path, "fold=2", "trainer.max_epochs=1")
                 if not o.startswith("tracking.uri")]
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server}
    result = subprocess.run([sys.executable, str(REPO / "train.py"), *overrides], cwd=tmp_path, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]

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
