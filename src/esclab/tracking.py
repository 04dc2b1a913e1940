"""Everything MLflow and data-version: every run says which code and which data made it.

One cross-validation is one parent run; each fold is a child run under it. The
fold stages run as separate processes, so a fold finds its parent by a key: the
hash of the cross-validation's code, config, data and weights (identity.py).
Rerunning a fold therefore joins the same parent instead of starting a new
experiment, and two runs of different code or data never share a parent.

A FINISHED run is a record and is never written into again: a fold trained
again under the same key (its outputs were deleted) gets a new run, under a new
parent if the old one had finished; pooling the same folds again logs nothing.
So a registered model version, whose files are its parent's fold runs', never changes.

The parent run is RUNNING from the first fold until the evaluate stage has
pooled the folds, and FAILED as soon as a fold fails, also when each fold is a
separate `dvc repro` stage, so its duration in the UI is the cross-validation's.

A hyper-parameter search (conf/hparams_search/) adds a level above: each trial's
cross-validation run is a child of one run for the study (`tracking.study`),
tagged with its trial number (`tracking.trial`). `StudyRun`, a Hydra callback,
makes the study's run in the sweep's own process before any trial starts, so
trials running at once in separate processes all find that one run.

Data hashes are DVC's own md5s (dvc_data computes them exactly as `dvc.lock`
records them), so an MLflow run can be matched to a `dvc.lock` entry.
"""

import json
import logging
import os
import platform
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import mlflow
import pandas as pd
import requests
import torch
from hydra.experimental.callback import Callback
from mlflow import MlflowClient
from omegaconf import DictConfig, OmegaConf

from esclab.config import minimised
from esclab.errors import EsclabError
from esclab.identity import git_state, run_identity

log = logging.getLogger(__name__)

DEFAULT_URI = "sqlite:///mlflow.db"
KEY_TAG = "esclab.run_key"
FOLD_TAG = "esclab.fold"
STUDY_TAG = "esclab.study"
TRIAL_TAG = "esclab.trial"  # a trial's number, or "all" on the study's own run
HARDWARE_TAG = "esclab.hardware"
WEIGHTS_TAG = "model.weights.sha256"
CODE_TAG = "esclab.code.sha256"  # identity.code_sha256: the training code and the lock files
DATA = ("raw", "split", "features")  # the paths.* whose DVC hashes tag every run
UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default
SKOPS_TRUSTED = ["esclab.models.heads.pool", "functools.partial", "sklearn.calibration._CalibratedClassifier",
                 "sklearn.calibration._SigmoidCalibration", "esclab.models.zeroshot.PromptClassifier"]


def resolve_uri(configured: str | None) -> str:
    """tracking.uri if set, else $MLFLOW_TRACKING_URI, else the embedded database."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside an embedded database, so a project's runs and their files
    stay together wherever the command runs (MLflow's default, ./mlruns, follows the working directory); a server
    decides for itself (None)."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlruns").as_uri()


def ui_url(base: str, experiment_id: str) -> str:
    """The experiment's runs table in the MLflow UI's model-training view.

    MLflow 3's UI starts in its GenAI view, where an experiment opens on a trace
    overview; the view is the browser's choice (the sidebar's GenAI / Model training
    switch, or `workflowType` in the address), not the experiment's: 3.17.2 does not
    read the `mlflow.experimentKind` tag for it.
    """
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def browse_url(uri: str, experiment_id: str) -> str:
    """Where to see an experiment's runs: on the tracking server, or on `mlflow ui` for a database."""
    return ui_url(uri if uri.startswith(("http://", "https://")) else UI, experiment_id)


def check_reachable(uri: str) -> None:
    """Fail before training, not an hour later, when a tracking server is down or refuses the address it is
    reached by: MLflow answers requests for a Host name other than localhost, a private IP address or its
    --allowed-hosts with 403, except /health."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        requests.get(uri.rstrip("/") + "/health", timeout=10).raise_for_status()
        api = requests.get(uri.rstrip("/") + "/api/2.0/mlflow/experiments/search", params={"max_results": 1},
                           timeout=10)
    except requests.RequestException as err:
        raise EsclabError(f"MLflow tracking server {uri} is not reachable ({type(err).__name__}): start it, "
                          "or unset MLFLOW_TRACKING_URI (and tracking.uri) to log to sqlite:///mlflow.db") from None
    if api.status_code == 403 and "Invalid Host header" in api.text:
        host = urlsplit(uri).netloc
        raise EsclabError(f"MLflow tracking server {uri} refuses requests addressed to {host}: start it with "
                          f"--allowed-hosts {host} (make mlflow-server MLFLOW_ALLOWED_HOSTS={host}), "
                          "or reach it by an address it allows")


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


def data_md5s(paths: DictConfig) -> dict[str, str]:
    """The DVC md5 of each data path (raw, split, features)."""
    return {name: dvc_md5(Path(paths[name])) for name in DATA}


def data_tags(paths: DictConfig, md5s: dict[str, str]) -> dict[str, str]:
    """Each data path and its DVC md5."""
    return {f"data.{name}.md5": md5s[name] for name in DATA} | {f"data.{name}.path": str(paths[name]) for name in DATA}


def backbone_tags(features_dir: Path) -> dict[str, str]:
    """Pretrained backbones' names and weights sha256, from the embedding cache they made (none for log-mel)."""
    meta = features_dir / "features.json"
    settings = json.loads(meta.read_text())["settings"] if meta.is_file() else {}
    if "weights_sha256" not in settings:
        return {}
    hashes = {f"backbone.{name}.weights.sha256": sha256 for name, sha256 in settings["weights_sha256"].items()}
    return {"backbone": "+".join(settings["backbones"])} | hashes


def weights_sha256(model: DictConfig) -> str | None:
    """The sha256 of the pretrained weights file a network starts from (model.weights; None from random weights).

    Like the data's hashes it is part of the run key: other bytes under the same
    path are another run, and a fold trained from the old ones is not reused.
    """
    from esclab.models import pretrained_sha256

    return pretrained_sha256(OmegaConf.to_container(model, resolve=True))


def identity_of(cfg: DictConfig, md5s: dict[str, str] | None = None) -> dict:
    """The cross-validation's identity (identity.run_identity); `md5s` where dvc.lock already says them."""
    return run_identity(OmegaConf.to_container(cfg, resolve=True), md5s or data_md5s(cfg.paths),
                        weights_sha256(cfg.model))


def hardware() -> str:
    """The machine a run trains on, as precisely as its numbers depend on it.

    On a CPU, results agree to the last bit only with the same processor, the same
    instruction set in torch's kernels and the same thread count, so all three are named.
    """
    cores = f"{os.cpu_count()} CPU cores"
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}, {cores}"
    capability, threads = torch.backends.cpu.get_cpu_capability(), torch.get_num_threads()
    return f"{cores} ({cpu_model()}, {capability}, {threads} threads), no GPU"


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in (cpuinfo.read_text().splitlines() if cpuinfo.exists() else [])
             if line.startswith("model name")]
    return names[0] if names else platform.machine()


def flat_params(cfg: DictConfig) -> dict[str, str]:
    """The resolved config as dotted keys, which the MLflow UI can sort and compare."""
    flat = pd.json_normalize(OmegaConf.to_container(cfg, resolve=True), sep=".").iloc[0].to_dict()
    return {key: json.dumps(value) if isinstance(value, list | dict) else str(value) for key, value in flat.items()}


def experiment_id(client: MlflowClient, name: str, uri: str) -> str:
    """The MLflow experiment `name`, made if new."""
    experiment = client.get_experiment_by_name(name)
    return experiment.experiment_id if experiment else client.create_experiment(
        name, artifact_location=artifact_location(uri))


def study_run(client: MlflowClient, experiment: str, study: str, params: dict[str, str] | None = None) -> str:
    """The run of hyper-parameter search `study` that its trials' runs nest under, found by name or made with
    `params` (a resumed study keeps its run, and the search space it started with)."""
    filters = f"tags.`{STUDY_TAG}` = '{study}' and tags.`{TRIAL_TAG}` = 'all'"
    found = client.search_runs([experiment], filters, max_results=1)
    if found:
        return found[0].info.run_id
    run_id = client.create_run(experiment, run_name=study, tags={STUDY_TAG: study, TRIAL_TAG: "all"}).info.run_id
    client.log_batch(run_id, params=[mlflow.entities.Param(k, v) for k, v in (params or {}).items()])
    return run_id


class StudyRun(Callback):
    """Hydra callback of a search (conf/hparams_search/): the study's MLflow run, RUNNING while the sweep runs.

    on_multirun_start runs in the sweep's own process before the sweeper starts any
    trial, so the run exists before parallel trials look for it (each making it
    would race); it also refuses a direction that would seek the worst
    train.monitor. At the end it carries the sweeper's optimization_results.yaml
    (best parameters and value) and the best value as a metric.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        sweeper, monitor = config.hydra.sweeper, config.train.monitor
        direction = "minimize" if minimised(monitor) else "maximize"  # as the folds choose their models
        if str(sweeper.direction) != direction:
            raise EsclabError(f"hydra.sweeper.direction={sweeper.direction}, but the trials return the best "
                              f"train.monitor={monitor}: set hydra.sweeper.direction={direction}")
        client, experiment, uri = self._experiment(config)
        params = {f"search.{k}": str(v) for k, v in (sweeper.params or {}).items()}
        params |= {"direction": str(sweeper.direction), "sampler": sweeper.sampler._target_,
                   "sampler.seed": str(sweeper.sampler.get("seed")), "storage": str(sweeper.storage)}
        run_id = study_run(client, experiment, config.tracking.study, params)
        client.update_run(run_id, status="RUNNING")
        log.info("MLflow: study %s is run %s (%s)", config.tracking.study, run_id, browse_url(uri, experiment))

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        client, experiment, _ = self._experiment(config)
        run_id = study_run(client, experiment, config.tracking.study)
        results = Path(config.hydra.sweep.dir) / "optimization_results.yaml"
        if results.is_file():
            client.log_artifact(run_id, str(results))
            client.log_metric(run_id, "best_value", float(OmegaConf.load(results).best_value))
        client.set_terminated(run_id, "FINISHED")

    @staticmethod
    def _experiment(config: DictConfig) -> tuple[MlflowClient, str, str]:
        if not config.tracking.study:
            raise EsclabError("hydra.callbacks has StudyRun but tracking.study is null: name the study "
                              "(conf/hparams_search/ sets it)")
        uri = resolve_uri(config.tracking.uri)
        check_reachable(uri)
        client = MlflowClient(uri)
        return client, experiment_id(client, config.tracking.experiment, uri), uri


class Tracker:
    """The MLflow side of one cross-validation (or of one of its folds).

    An inactive tracker (a DDP process other than rank zero) knows the run key, which says whether a fold is already
    trained or can resume, but creates, finds and ends no run: one process's record is the run's.
    """

    def __init__(self, cfg: DictConfig, active: bool = True):
        self.uri = resolve_uri(cfg.tracking.uri)
        self.cfg, self.active = cfg, active
        if active:
            check_reachable(self.uri)  # before hashing the data, which can take a while
        md5s = data_md5s(cfg.paths)
        self.identity = identity_of(cfg, md5s)
        self.key = self.identity["run_key"]
        weights = {WEIGHTS_TAG: self.identity["weights"]} if self.identity["weights"] else {}
        self.tags = (data_tags(cfg.paths, md5s) | backbone_tags(Path(cfg.paths.features)) | weights
                     | {CODE_TAG: self.identity["code"]} | git_state() | {HARDWARE_TAG: hardware()})
        if not active:
            return
        mlflow.set_tracking_uri(self.uri)
        self.client = MlflowClient(self.uri)
        self.experiment_id = experiment_id(self.client, cfg.tracking.experiment, self.uri)
        study = cfg.tracking.study
        if study:
            self.tags |= {STUDY_TAG: study, TRIAL_TAG: str(cfg.tracking.trial)}
        # The cross-validation's open run (RUNNING or FAILED), if any, and its newest FINISHED one.
        self.parent_id = self._find(open_runs=True)
        self.recorded_id = None if self.parent_id else self._find(open_runs=False)
        if not self.parent_id and not self.recorded_id:
            self.open()  # before any fold process looks for it

    def ui_url(self) -> str:
        return browse_url(self.uri, self.experiment_id)

    def open(self) -> str:
        """The cross-validation's open parent run, made if there is none (a FINISHED one is not written into)."""
        if not self.parent_id:
            study = self.cfg.tracking.study
            self.parent_id = self._create(study_run(self.client, self.experiment_id, study) if study else None)
        return self.parent_id

    def _find(self, open_runs: bool, fold: int | None = None) -> str | None:
        """The newest run with this key (of `fold`, or the parent), open or FINISHED as `open_runs` says."""
        filters = [f"tags.`{KEY_TAG}` = '{self.key}'", f"tags.`{FOLD_TAG}` = '{fold or 'all'}'",
                   "attributes.status != 'FINISHED'" if open_runs else "attributes.status = 'FINISHED'"]
        if TRIAL_TAG in self.tags:  # a search's trials are runs of their own, even where two drew the same values
            filters.append(f"tags.`{TRIAL_TAG}` = '{self.tags[TRIAL_TAG]}'")
        found = self.client.search_runs([self.experiment_id], " and ".join(filters), max_results=1,
                                        order_by=["attributes.start_time DESC"])
        return found[0].info.run_id if found else None

    def _create(self, parent: str | None, fold: int | None = None) -> str:
        name = self.cfg.tracking.name + (f"-fold{fold}" if fold else "")
        tags = self.tags | {KEY_TAG: self.key, FOLD_TAG: str(fold or "all"), "mlflow.runName": name}
        if parent:
            tags["mlflow.parentRunId"] = parent
        run_id = self.client.create_run(self.experiment_id, tags=tags, run_name=name).info.run_id
        params = flat_params(self.cfg) | {"fold": str(fold or "all")}
        self.client.log_batch(run_id, params=[mlflow.entities.Param(k, v) for k, v in params.items()])
        self.client.log_inputs(run_id, datasets=[self._split_input()])
        return run_id

    def _split_input(self) -> mlflow.entities.DatasetInput:
        """The split table as an MLflow dataset input: its digest differs whenever the data does."""
        split = Path(self.cfg.paths.split)
        with warnings.catch_warnings():
            # MLflow registers its local-file dataset source twice (for the "" and the "file" URI
            # schemes), so every local path is "ambiguous" between two identical classes.
            warnings.filterwarnings("ignore", "The specified dataset source can be interpreted in multiple ways")
            # The schema's hint that integer columns cannot hold missing values is about a model's
            # serving inputs; the split table is a record of the data, whose labels and folds are integers.
            warnings.filterwarnings("ignore", "Hint: Inferred schema contains integer column")
            dataset = mlflow.data.from_pandas(pd.read_csv(split), source=str(split), targets="label",
                                              name=f"{self.cfg.dataset.name}-split")
            entity = dataset._to_mlflow_entity()
        context = mlflow.entities.InputTag(mlflow.utils.mlflow_tags.MLFLOW_DATASET_CONTEXT, "cross-validation")
        return mlflow.entities.DatasetInput(entity, tags=[context])

    @contextmanager
    def fold_run(self, fold: int) -> Iterator[str]:
        """The child run of `fold`, marked FINISHED only if the block completes.

        The parent is RUNNING while any fold trains (again, when a fold is rerun) and
        FAILED with a failed fold; only `log_pooled` (after evaluate) marks it FINISHED.
        """
        parent = self.open()
        run_id = self._find(open_runs=True, fold=fold) or self._create(parent, fold)
        self.client.update_run(parent, status="RUNNING")
        self.client.update_run(run_id, status="RUNNING")
        try:
            yield run_id
        except BaseException:
            self.client.set_terminated(run_id, "FAILED")
            self.fail()
            raise
        self.client.set_terminated(run_id, "FINISHED")

    def fail(self) -> None:
        """Mark the cross-validation FAILED (a fold, or pooling them, failed)."""
        if self.active and self.parent_id:
            self.client.set_terminated(self.parent_id, "FAILED")

    def log_model(self, run_id: str, model, example) -> None:
        """Log a model that maps a batch of raw log-mel arrays to class probabilities."""
        with mlflow.start_run(run_id=run_id), torch.no_grad():
            signature = mlflow.models.infer_signature(example.numpy(), model(example).numpy())
            mlflow.pytorch.log_model(model, name="model", signature=signature, input_example=example.numpy())

    def log_head(self, run_id: str, pipeline, example) -> None:
        """Log a scikit-learn head that maps a batch of raw embedding rows to class probabilities."""
        with mlflow.start_run(run_id=run_id):
            signature = mlflow.models.infer_signature(example, pipeline.predict_proba(example))
            # MLflow saves it with skops, which loads only the types it is told to trust: those skops does not
            # know by itself (esclab's window pooling, the SVM's calibration).
            mlflow.sklearn.log_model(pipeline, name="model", signature=signature, input_example=example,
                                     pyfunc_predict_fn="predict_proba", skops_trusted_types=SKOPS_TRUSTED)

    def log_pooled(self, metrics: dict, reports: Path) -> None:
        """The cross-validation's pooled metrics and reports on the parent run, which this ends; nothing if its
        run has already FINISHED (these folds were pooled before, and that record stays as it was)."""
        if not self.parent_id and self.recorded_id:
            log.info("MLflow: this cross-validation is already recorded as run %s, left as it was", self.recorded_id)
            return
        self.open()
        scalars = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
        scalars |= {f"fold_accuracy.{k}": v for k, v in metrics.get("fold_accuracy", {}).items()}
        now = int(time.time() * 1000)
        self.client.log_batch(self.parent_id, metrics=[
            mlflow.entities.Metric(k, float(v), timestamp=now, step=0) for k, v in scalars.items()])
        self.client.log_artifacts(self.parent_id, str(reports), artifact_path="reports")
        self.client.set_terminated(self.parent_id, "FINISHED")

    def register(self, name: str) -> str:
        """The finished cross-validation as a version of registered model `name` (made if new), once per parent run:
        its fold models are the `checkpoint/` artifacts of its fold runs. The version number."""
        run_id = self.parent_id or self.recorded_id
        existing = self.client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
        if existing:
            return str(existing[0].version)
        if not self.client.search_registered_models(f"name = '{name}'"):
            self.client.create_registered_model(name, description="esclab cross-validations: each version is one "
                                                "run's fold models, averaged by esclab predict --models models:/...")
        version = self.client.create_model_version(name, source=f"runs:/{run_id}", run_id=run_id,
                                                   tags={KEY_TAG: self.key})
        return str(version.version)
