"""Everything MLflow and data-version: every run says which code and which data made it.

One cross-validation is one parent run; each fold is a child run under it. The
fold stages run as separate processes, so a fold finds its parent by a key: a
hash of the resolved config without `fold` and `train.parallel_folds` (which
say which folds run and how many at once, not what a fold computes) plus the
data hashes. Rerunning a fold therefore joins the same parent (and the same
child) instead of starting a new experiment, and two runs on different data
never share a parent.

Data hashes are DVC's own md5s (dvc_data computes them exactly as `dvc.lock`
records them), so an MLflow run can be matched to a `dvc.lock` entry.
"""

import hashlib
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import pandas as pd
import requests
import torch
from mlflow import MlflowClient
from omegaconf import DictConfig, OmegaConf

from esclab.errors import EsclabError

DEFAULT_URI = "sqlite:///mlflow.db"
KEY_TAG = "esclab.run_key"
FOLD_TAG = "esclab.fold"
DATA = ("raw", "split", "features")  # the paths.* whose DVC hashes tag every run


def resolve_uri(configured: str | None) -> str:
    """tracking.uri if set, else $MLFLOW_TRACKING_URI, else the embedded database."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def check_reachable(uri: str) -> None:
    """Fail before training, not an hour later, when a tracking server is down."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        requests.get(uri.rstrip("/") + "/health", timeout=10).raise_for_status()
    except requests.RequestException as err:
        raise EsclabError(f"MLflow tracking server {uri} is not reachable ({type(err).__name__}): start it, "
                          "or unset MLFLOW_TRACKING_URI (and tracking.uri) to log to sqlite:///mlflow.db") from None


def dvc_md5(path: Path) -> str:
    """The md5 DVC records for `path` in dvc.lock (a folder's ends in .dir)."""
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs.local import LocalFileSystem

    if not path.exists():
        raise EsclabError(f"{path} does not exist: build it with `dvc repro`")
    fs = LocalFileSystem()
    with tempfile.TemporaryDirectory() as tmp:
        _, _, obj = build(HashFileDB(fs, tmp), str(path), fs, "md5")
    return obj.hash_info.value


def data_tags(paths: DictConfig) -> dict[str, str]:
    return {f"data.{name}.md5": dvc_md5(Path(paths[name])) for name in DATA} | {
        f"data.{name}.path": str(paths[name]) for name in DATA}


def git_tags() -> dict[str, str]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()

    try:
        return {"git.commit": git("rev-parse", "HEAD"),
                "git.dirty": str(bool(git("status", "--porcelain", "--untracked-files=no"))).lower()}
    except (subprocess.CalledProcessError, FileNotFoundError):
        return {"git.commit": "none", "git.dirty": "unknown"}


def flat_params(cfg: DictConfig) -> dict[str, str]:
    """The resolved config as dotted keys, which the MLflow UI can sort and compare."""
    flat = pd.json_normalize(OmegaConf.to_container(cfg, resolve=True), sep=".").iloc[0].to_dict()
    return {key: json.dumps(value) if isinstance(value, list | dict) else str(value) for key, value in flat.items()}


class Tracker:
    """The MLflow side of one cross-validation (or of one of its folds)."""

    def __init__(self, cfg: DictConfig):
        self.uri = resolve_uri(cfg.tracking.uri)
        check_reachable(self.uri)
        mlflow.set_tracking_uri(self.uri)
        self.client = MlflowClient(self.uri)
        self.cfg = cfg
        self.tags = data_tags(cfg.paths) | git_tags()
        without_fold = OmegaConf.to_container(cfg, resolve=True)
        without_fold.pop("fold")
        without_fold["train"].pop("parallel_folds")
        identity = json.dumps([without_fold, {k: v for k, v in self.tags.items() if k.startswith("data.")}],
                              sort_keys=True)
        self.key = hashlib.sha256(identity.encode()).hexdigest()[:16]
        experiment = self.client.get_experiment_by_name(cfg.tracking.experiment)
        self.experiment_id = (experiment.experiment_id if experiment
                              else self.client.create_experiment(cfg.tracking.experiment))
        self.parent_id = self._find_or_create(parent=None)

    def _find_or_create(self, parent: str | None, fold: int | None = None) -> str:
        filters = [f"tags.`{KEY_TAG}` = '{self.key}'"]
        filters.append(f"tags.`{FOLD_TAG}` = '{fold}'" if fold else f"tags.`{FOLD_TAG}` = 'all'")
        found = self.client.search_runs([self.experiment_id], " and ".join(filters), max_results=1)
        if found:
            return found[0].info.run_id
        name = f"{self.cfg.model.name}-{self.cfg.dataset.name}" + (f"-fold{fold}" if fold else "")
        tags = self.tags | {KEY_TAG: self.key, FOLD_TAG: str(fold or "all"), "mlflow.runName": name}
        if parent:
            tags["mlflow.parentRunId"] = parent
        run_id = self.client.create_run(self.experiment_id, tags=tags, run_name=name).info.run_id
        params = flat_params(self.cfg) | {"fold": str(fold or "all")}
        self.client.log_batch(run_id, params=[mlflow.entities.Param(k, v) for k, v in params.items()])
        self._log_split(run_id)  # leaves the run FINISHED; fold_run reopens a child while it trains
        return run_id

    def _log_split(self, run_id: str) -> None:
        """The split table as an MLflow dataset: its digest differs whenever the data does."""
        split = Path(self.cfg.paths.split)
        dataset = mlflow.data.from_pandas(pd.read_csv(split), source=str(split), targets="label",
                                          name=f"{self.cfg.dataset.name}-split")
        with mlflow.start_run(run_id=run_id):
            mlflow.log_input(dataset, context="cross-validation")

    @contextmanager
    def fold_run(self, fold: int) -> Iterator[str]:
        """The child run of `fold`, marked FINISHED only if the block completes."""
        run_id = self._find_or_create(self.parent_id, fold)
        self.client.update_run(run_id, status="RUNNING")
        try:
            yield run_id
        except BaseException:
            self.client.set_terminated(run_id, "FAILED")
            raise
        self.client.set_terminated(run_id, "FINISHED")

    def log_model(self, run_id: str, model, example) -> None:
        """Log a model that maps a batch of raw log-mel arrays to class probabilities."""
        with mlflow.start_run(run_id=run_id), torch.no_grad():
            signature = mlflow.models.infer_signature(example.numpy(), model(example).numpy())
            mlflow.pytorch.log_model(model, name="model", signature=signature, input_example=example.numpy())

    def log_pooled(self, metrics: dict, reports: Path) -> None:
        """The cross-validation's pooled metrics and reports on the parent run."""
        scalars = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
        scalars |= {f"fold_accuracy.{k}": v for k, v in metrics.get("fold_accuracy", {}).items()}
        now = int(time.time() * 1000)
        self.client.log_batch(self.parent_id, metrics=[
            mlflow.entities.Metric(k, float(v), timestamp=now, step=0) for k, v in scalars.items()])
        self.client.log_artifacts(self.parent_id, str(reports), artifact_path="reports")
