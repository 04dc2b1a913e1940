"""DDP (issue 16): two gloo processes on the CPU train a fold as one process does, rank zero alone writes, and a
fold killed mid-way resumes to the same bytes.

The real launch is `python train.py ... trainer=ddp_cpu`, whose second process Lightning starts from the same
command line. Folds spread over GPUs cannot run here; their GPU assignment is checked as a function.
"""

import json
import os
import shutil
import subprocess
import sys

import lightning as L
import pandas as pd
import pytest
from conftest import REPO, compose_config, kill_when, tiny_overrides
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
from mlflow import MlflowClient
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from esclab.errors import EsclabError
from esclab.training.data import FoldData
from esclab.training.distributed import device_slots
from esclab.training.run import resume_point, train


@pytest.fixture(scope="module")
def ddp_run(tiny_data, tmp_path_factory):
    """Fold 2 of the tiny dataset trained by `python train.py trainer=ddp_cpu`: two processes, one thread each."""
    out = tmp_path_factory.mktemp("ddp")
    overrides = tiny_overrides(tiny_data, out, "fold=2", "trainer=ddp_cpu", "tracking.log_model=false")
    result = subprocess.run([sys.executable, str(REPO / "train.py"), *overrides], cwd=out, capture_output=True,
                            text=True, timeout=600, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Starting with 2 processes" in result.stdout + result.stderr
    return out


def test_two_ddp_processes_train_a_fold_and_write_its_outputs_once(tiny_data, ddp_run):
    reports = ddp_run / "reports/folds/2"
    predictions = pd.read_csv(reports / "predictions.csv")
    index = pd.read_csv(tiny_data["features"] / "index.csv")
    assert list(predictions["filename"]) == list(index.loc[index["fold"] == 2, "filename"])  # each clip once, in order
    assert list(pd.read_csv(reports / "history.csv")["epoch"]) == [0, 1]
    assert (ddp_run / "models/fold_2.ckpt").stat().st_size > 0 and not (ddp_run / "models/.fold_2").exists()

    client = MlflowClient(f"sqlite:///{ddp_run / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("esclab").experiment_id])
    assert sorted(r.data.tags["esclab.fold"] for r in runs) == ["2", "all"]  # no run of the second process
    parent, child = sorted(runs, key=lambda r: r.data.tags["esclab.fold"] == "2")
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id and child.info.status == "FINISHED"
    assert json.loads((reports / "fold.json").read_text())["run_key"] == child.data.tags["esclab.run_key"]
    for metric in ("train/loss", "val/loss", "val/acc"):
        assert len(client.get_metric_history(child.info.run_id, metric)) == 2, metric  # once per epoch, not per process
    assert len(client.get_metric_history(child.info.run_id, "test/acc")) == 1
    assert child.data.params["train.effective_batch_size"] == "16"  # 8 clips x 2 processes


def test_a_killed_ddp_fold_resumes_and_writes_what_the_uninterrupted_run_wrote(tiny_data, ddp_run, tmp_path):
    """kill -9 of both processes once epoch 0's checkpoint is in place; the same command resumes from it."""
    command = [sys.executable, str(REPO / "train.py"),
               *tiny_overrides(tiny_data, tmp_path, "fold=2", "trainer=ddp_cpu", "tracking.log_model=false")]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    kill_when(command, tmp_path, (tmp_path / "models/.fold_2/checkpoints/last.ckpt").exists, env=env)
    assert not (tmp_path / "reports/folds/2").exists()

    resumed = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout + resumed.stderr
    for name in ("predictions.csv", "history.csv"):
        assert (tmp_path / "reports/folds/2" / name).read_bytes() == (ddp_run / "reports/folds/2" / name).read_bytes()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (child,) = client.search_runs([client.get_experiment_by_name("esclab").experiment_id], "tags.`esclab.fold` = '2'")
    assert [m.step for m in client.get_metric_history(child.info.run_id, "val/acc")] == [0, 1]  # epoch 0 once


def test_launches_the_fold_loop_cannot_follow_are_refused(tiny_data, ddp_run, tmp_path):
    shutil.copy(ddp_run / "mlflow.db", tmp_path)  # an MLflow store already made: creating one takes seconds
    refused = [  # trainer=ddp_cpu and ...
        ([], r"starts this command again once per device: run it as `python train.py"),  # train(cfg) from Python
        (["trainer.strategy=ddp_spawn"], r"starts its processes inside fit.*trainer.strategy=ddp"),
        (["train.parallel_folds=2"], r"train.parallel_folds=2 trains each fold in its own process on one device"),
    ]
    for extra, message in refused:
        cfg = compose_config(*tiny_overrides(tiny_data, tmp_path, "fold=null", "trainer=ddp_cpu", *extra))
        with pytest.raises(EsclabError, match=message):
            train(cfg)


@pytest.mark.parametrize("name", ["ddp", "ddp_multinode", "ddp_cpu"])
def test_ddp_trainer_configs_are_lightning_trainer_arguments(name):
    settings = OmegaConf.to_container(compose_config(f"trainer={name}", "trainer.accelerator=cpu").trainer)
    trainer = L.Trainer(**settings, logger=False)  # built, not launched: no process starts
    assert trainer.world_size == settings["devices"] * settings.get("num_nodes", 1) > 1
    assert isinstance(trainer.strategy, DDPStrategy)
    assert isinstance(trainer.strategy.launcher, _SubprocessScriptLauncher)  # `ddp`: the command starts again


def test_under_ddp_batches_come_from_dataloaders_that_lightning_shares_out(tiny_data):
    data = FoldData(tiny_data["features"], test_fold=1, resident=True)
    data.setup()
    data.trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)  # built, not launched
    with pytest.raises(EsclabError, match="train.resident=true keeps every row on each of 2 processes"):
        data.train_dataloader()
    data.resident = "auto"
    assert isinstance(data.train_dataloader(), DataLoader)


def test_folds_take_the_visible_gpus_in_turn():
    assert device_slots("auto", 5, ["0", "1"]) == ["0", "1", "0", "1", "0"]
    assert device_slots("gpu", 2, ["3", "5", "6"]) == ["3", "5"]  # CUDA_VISIBLE_DEVICES's names, not 0..n-1
    assert device_slots("cpu", 2, ["0", "1"]) == [] and device_slots("auto", 2, []) == []


def test_only_the_owner_of_a_fold_clears_its_work_folder(tmp_path):
    work = tmp_path / ".fold_1"
    (work / "checkpoints").mkdir(parents=True)
    (work / "run_key").write_text("old")
    (work / "checkpoints/last.ckpt").write_bytes(b"another config's")
    assert resume_point(work, "new", owner=False) is None and (work / "checkpoints/last.ckpt").exists()
    assert resume_point(work, "new") is None and not (work / "checkpoints").exists()
    (work / "checkpoints").mkdir()
    (work / "checkpoints/last.ckpt").write_bytes(b"this config's")
    assert resume_point(work, "new", owner=False) == resume_point(work, "new") == work / "checkpoints/last.ckpt"
