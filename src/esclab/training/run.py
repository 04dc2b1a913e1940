"""Cross-validation: train each fold, predict its test clips, record everything.

`train(cfg)` is what `python train.py` and the DVC `train` stages run; tests call
it directly. For each test fold it fits on the other folds, keeps the checkpoint
with the best validation score, predicts the test fold with it and writes
`models/fold_<k>.ckpt`, `reports/folds/<k>/predictions.csv`, `history.csv` and
`fold.json` (the identity, identity.py, of the code, config, data and weights that
made them, and the validation score that chose the model); evaluate pools only
folds of one identity. A whole cross-validation (fold=null)
also pools the folds into `reports/`; with `train.parallel_folds` > 1 its folds
train that many at a time, each in its own process (on a GPU of its own where
there are several). With `trainer=ddp` each fold trains over several processes,
of which rank zero alone writes (training/distributed.py). `train` returns the
validation score, the objective of a hyper-parameter search (conf/hparams_search/).
"""

import json
import logging
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import Manager, get_context
from pathlib import Path
from queue import Queue

import joblib
import lightning as L
import mlflow
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import MLFlowLogger
from omegaconf import DictConfig, OmegaConf
from sklearn.metrics import log_loss

import esclab.resolvers  # noqa: F401  (a fold in a spawned process resolves dataset.folds without Hydra)
from esclab.atomic import atomic_file
from esclab.config import minimised
from esclab.data.representations import cache_settings, check_learner, representation
from esclab.errors import EsclabError
from esclab.evaluation.metrics import balanced_accuracy, write_reports
from esclab.identity import changed
from esclab.logs import silence_known_noise
from esclab.models import model_settings
from esclab.models.heads import HEADS, candidates, class_probabilities
from esclab.serving.preprocessing import preprocessing_of
from esclab.tracking import Tracker
from esclab.training import distributed
from esclab.training.augment import check as check_augment
from esclab.training.data import FoldData, balanced_class_weights, check_cache
from esclab.training.history import EpochHistory
from esclab.training.module import Classifier
from esclab.training.seeding import BatchSeed

log = logging.getLogger(__name__)


class Probabilities(torch.nn.Module):
    """The deployable model: raw log-mel arrays (batch x mels x frames) -> class probabilities.

    It carries the fold's normalisation, so callers feed the feature cache's rows as they are.
    """

    def __init__(self, network: torch.nn.Module, mean: float, std: float):
        super().__init__()
        self.network, self.mean, self.std = network, mean, std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.network(((x - self.mean) / self.std).unsqueeze(1)), dim=1)


def fold_data(cfg: DictConfig, fold: int, normalize: str | None = None) -> FoldData:
    """The fold's rows, normalised as `train.normalize` says unless `normalize` overrides it."""
    t = cfg.train
    data = FoldData(cfg.paths.features, test_fold=fold, batch_size=t.batch_size, num_workers=t.num_workers,
                    val_fraction=t.val_fraction, val_fold=t.val_fold, normalize=normalize or t.normalize,
                    seed=cfg.seed, resident=t.resident, sampler=t.sampler)
    data.setup()
    return data


def speed_up(network: torch.nn.Module, *, channels_last: bool = False, compile: bool = False) -> torch.nn.Module:
    """The fast path's switches on a network, in place; its weights keep their names and values.

    channels_last converts the weights only: the input has one channel, and a
    (batch, 1, mels, frames) tensor already is channels_last in memory, so the
    first convolution's output and every layer after it follow the weights.
    `compile` uses `nn.Module.compile`, which keeps the state dict's keys, so the
    checkpoints load into a network that was not compiled.
    """
    if channels_last:
        network.to(memory_format=torch.channels_last)
    if compile:
        network.compile()
    return network


def build_classifier(cfg: DictConfig, data: FoldData, identity: dict | None = None) -> Classifier:
    """The fold's module: network, optimizer, schedule, augmentation, loss and fast-path switches as `cfg` says;
    `identity` (the run's, `stamp`) goes into its checkpoints."""
    container = OmegaConf.to_container(cfg, resolve=True)
    module = Classifier(model=container["model"], n_classes=data.n_classes, input_shape=data.input_shape,
                        optimizer=container["optimizer"], scheduler=container["scheduler"] or None,
                        augment=container["augment"], label_smoothing=cfg.train.label_smoothing, feature_std=data.std,
                        preprocessing=preprocessing_of(data), class_weights=class_weights(cfg, data),
                        identity=identity)
    speed_up(module.model, channels_last=cfg.train.channels_last, compile=cfg.train.compile)
    return module


CLASS_WEIGHTS = ("none", "balanced")
MONITORED = ("val/acc", "val/balanced_acc", "val/loss")  # what fit_head can choose C by


def class_weights(cfg: DictConfig, data: FoldData) -> list[float] | None:
    """`train.class_weights`: none, or balanced (each class's loss weighed by how rare it is in the training rows)."""
    setting = cfg.train.class_weights
    if setting not in CLASS_WEIGHTS:
        raise EsclabError(f"train.class_weights must be one of {', '.join(CLASS_WEIGHTS)}; got {setting!r}")
    if setting == "none":
        return None
    return balanced_class_weights(data.train_labels, data.n_classes)


def train_fold(cfg: DictConfig, fold: int, tracker: Tracker) -> pd.DataFrame:
    """Fit on every fold but `fold`, predict `fold` with the model validation chose; returns the predictions.

    A fold already finished with this run key (code, config, data, weights) is not trained again; an
    unfinished network (killed, or failed) resumes from its last epoch's checkpoint under the same key.
    Networks train with Lightning (`fit_network`), scikit-learn heads with their own
    fit (`fit_head`); both leave the same outputs. A DDP process other than rank
    zero (an inactive tracker) trains its share of a network and returns None.
    """
    reports = Path(cfg.paths.reports) / "folds" / str(fold)
    target = Path(cfg.paths.models) / f"fold_{fold}.ckpt"
    record = reports / "fold.json"
    if finished(fold, target, record, tracker.identity):
        return pd.read_csv(reports / "predictions.csv")

    fit = fit_head if cfg.model.name in HEADS else fit_network
    if not tracker.active:
        if fit is fit_network:  # a head is one process's fit: rank zero's
            fit_network(cfg, fold, tracker, None, target)
        return None
    with tracker.fold_run(fold) as run_id:
        predictions, history = fit(cfg, fold, tracker, run_id, target)
        accuracy = float((predictions["pred"] == predictions["label"]).mean())
        monitor = cfg.train.monitor
        best_val = best_value(history, monitor)
        tracker.client.log_metric(run_id, "test/acc", accuracy)
        tracker.client.log_metric(run_id, f"{monitor}_best", best_val)
        write_csv(predictions, reports / "predictions.csv")
        write_csv(history, reports / "history.csv")
        tracker.client.log_artifact(run_id, str(target), artifact_path="checkpoint")
        with atomic_file(record) as tmp:  # written last: the fold counts as finished only once it exists
            tmp.write_text(json.dumps({"run_key": tracker.key, "fold": fold, "test_acc": accuracy,
                                       "best_val": {monitor: best_val}, "identity": tracker.identity,
                                       "git": {k: v for k, v in tracker.tags.items() if k.startswith("git.")}},
                                      indent=2) + "\n")
    shutil.rmtree(Path(cfg.paths.models) / f".fold_{fold}", ignore_errors=True)
    log.info("fold %d: test accuracy %.4f (%d files)", fold, accuracy, len(predictions))
    return predictions


def unfinished(target: Path, record: Path, identity: dict) -> str:
    """Why the fold whose model is `target` and record `record` (fold.json) has not finished under this `identity`
    ("" when it has: both are there, and the record names this run key)."""
    if not (target.is_file() and record.is_file()):
        return "not trained yet"
    return changed(json.loads(record.read_text()).get("identity"), identity)


def finished(fold: int, target: Path, record: Path, identity: dict) -> bool:
    """Whether `fold` has finished under this `identity`; otherwise it trains (again), and the log says why."""
    why = unfinished(target, record, identity)
    if not why:
        log.info("fold %d: already trained by this code, config, data and weights (%s); skipping", fold, record)
    elif target.is_file():
        log.info("fold %d: %s was trained with %s; training it again", fold, target, why)
    return not why


def stamp(tracker: Tracker, cfg: DictConfig, fold: int) -> dict:
    """What a fold's model file carries of its run: the identity, the fold and the folds of its cross-validation,
    so that serving averages only the folds of one run (serving/models.py)."""
    return {"run_key": tracker.key, "fold": fold, "folds": list(cfg.dataset.folds), **tracker.identity}


def fit_network(cfg: DictConfig, fold: int, tracker: Tracker, run_id: str | None, target: Path
                ) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """Lightning: keep the best-validation checkpoint as `target`; its test predictions and the epoch history.

    Under DDP every process runs this; the others (no `run_id`) return None before anything is written.
    """
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    data = fold_data(cfg, fold)
    module = build_classifier(cfg, data, stamp(tracker, cfg, fold))
    work = Path(cfg.paths.models) / f".fold_{fold}"  # Lightning's own checkpoints while the fold trains
    resume = resume_point(work, tracker.key, owner=tracker.active)
    monitor = cfg.train.monitor
    mode = "min" if minimised(monitor) else "max"
    checkpoint = ModelCheckpoint(dirpath=work / "checkpoints", filename="best", monitor=monitor, mode=mode)
    # Every epoch's end, what a killed fold resumes from (save_last=True only saves when `best` improves).
    latest = ModelCheckpoint(dirpath=work / "checkpoints", filename="last", enable_version_counter=False)
    history = EpochHistory()
    callbacks = [checkpoint, latest, history, BatchSeed(cfg.seed), LearningRateMonitor("epoch")]
    if cfg.train.early_stopping_patience:
        callbacks.append(EarlyStopping(monitor, patience=cfg.train.early_stopping_patience, mode=mode))

    # Lightning's logger writes from rank zero only; the other processes' has no run to write to.
    logger = MLFlowLogger(tracking_uri=tracker.uri, run_id=run_id, log_model=False)
    trainer = L.Trainer(**OmegaConf.to_container(cfg.trainer, resolve=True), logger=logger, callbacks=callbacks,
                        default_root_dir=work, enable_model_summary=False)
    distributed.check_launch(trainer)
    clips_per_step = distributed.effective_batch_size(trainer, cfg.train.batch_size)
    logger.log_hyperparams({"train.effective_batch_size": clips_per_step})
    trainer.fit(module, datamodule=data, ckpt_path=resume)
    best = Classifier.load_from_checkpoint(checkpoint.best_model_path, map_location="cpu")
    # Not compiled: compiling pays off over many training steps, not over one pass of the test fold.
    speed_up(best.model, channels_last=cfg.train.channels_last)
    batches = trainer.predict(best, datamodule=data)
    predicted = distributed.every_row_once(trainer, torch.cat([r for r, _ in batches]).cpu().numpy(),
                                           torch.cat([p for _, p in batches]).cpu().numpy())
    if predicted is None:
        return None
    rows, probs = predicted
    with atomic_file(target) as tmp:
        shutil.copyfile(checkpoint.best_model_path, tmp)
    # MLflow's pytorch flavour saves a graph that torch.export traces; a network whose forward leaves torch (a Hugging
    # Face feature extractor's numpy) has none, and its checkpoint (the run's checkpoint/ artifact) is the model.
    if cfg.tracking.log_model and getattr(best.model, "traceable", True):
        example = torch.from_numpy(np.asarray(data.array[data.test_rows[:2]], dtype=np.float32))
        tracker.log_model(run_id, Probabilities(best.model, data.mean, data.std).eval(), example)
    return prediction_table(data.index, rows, probs), history.table()


def fit_head(cfg: DictConfig, fold: int, tracker: Tracker, run_id: str, target: Path
             ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """scikit-learn: one fit per value of model.C on the training rows (classes weighed as `train.class_weights`
    says), the best by `train.monitor` on the validation rows kept
    (saved with joblib as `target`); its test predictions, and one history row per C tried.
    The pipeline standardises the raw rows itself (models/heads.py), so the fold's data is not normalised.
    A head without C (zeroshot) is one candidate whose fit only embeds its prompts."""
    data = fold_data(cfg, fold, normalize="none")
    labels, n_classes = data.index["label"].to_numpy(), data.n_classes
    options = model_settings(OmegaConf.to_container(cfg.model))
    balanced = class_weights(cfg, data) is not None
    preprocessing = preprocessing_of(data)

    def rows(which: np.ndarray) -> np.ndarray:
        return np.asarray(data.array[which], dtype=np.float32)

    def probabilities(pipeline, which: np.ndarray) -> np.ndarray:
        return class_probabilities(pipeline, rows(which), n_classes)

    monitor = cfg.train.monitor
    if monitor not in MONITORED:
        raise EsclabError(f"train.monitor={monitor} is not a score a scikit-learn head reports: use one of "
                          f"{', '.join(MONITORED)}")
    sign = -1 if minimised(monitor) else 1
    history, best = [], None
    heads = candidates(cfg.model.name, seed=cfg.seed, balanced=balanced, classes=preprocessing["classes"],
                       features=OmegaConf.to_container(cfg.features, resolve=True), **options)
    for step, (choice, pipeline) in enumerate(heads):
        pipeline.fit(rows(data.train_rows), labels[data.train_rows])
        train, val = probabilities(pipeline, data.train_rows), probabilities(pipeline, data.val_rows)
        entry = {"epoch": step, **choice,
                 "train/loss": log_loss(labels[data.train_rows], train, labels=range(n_classes)),
                 "train/acc": float((train.argmax(1) == labels[data.train_rows]).mean()),
                 "val/loss": log_loss(labels[data.val_rows], val, labels=range(n_classes)),
                 "val/acc": float((val.argmax(1) == labels[data.val_rows]).mean()),
                 "val/balanced_acc": balanced_accuracy(labels[data.val_rows], val.argmax(1))}
        tracker.client.log_batch(run_id, metrics=[mlflow.entities.Metric(k, v, int(time.time() * 1000), step)
                                                  for k, v in entry.items() if "/" in k])
        history.append(entry)
        score = sign * entry[monitor]
        if best is None or score > best[0]:
            best = score, pipeline
    pipeline = best[1]
    with atomic_file(target) as tmp:
        joblib.dump({"pipeline": pipeline, "preprocessing": preprocessing, "identity": stamp(tracker, cfg, fold)},
                    tmp)
    if cfg.tracking.log_model:
        tracker.log_head(run_id, pipeline, rows(data.test_rows[:2]))
    predictions = prediction_table(data.index, data.test_rows, probabilities(pipeline, data.test_rows))
    return predictions, pd.DataFrame(history)


def best_value(history: pd.DataFrame, monitor: str) -> float:
    """The best `monitor` value in a fold's history: the validation score of the model the fold kept."""
    values = history[monitor]
    return float(values.min() if minimised(monitor) else values.max())


def validation_score(cfg: DictConfig, folds: list[int]) -> float:
    """The mean over `folds` of each fold's best `train.monitor` value on its own validation rows.

    This is what a hyper-parameter search optimises (train.py returns it to the
    sweeper), and no test fold steers it: a fold's validation rows come from its
    training folds (train.val_fraction, or train.val_fold, never the test fold),
    its model is the epoch (or C) that scored best on them, and this averages those
    scores. The test folds only score the chosen models; their pooled metrics go
    to reports/ and MLflow, never to the search.
    """
    reports = Path(cfg.paths.reports) / "folds"
    scores = [json.loads((reports / str(fold) / "fold.json").read_text())["best_val"][cfg.train.monitor]
              for fold in folds]
    return float(np.mean(scores))


def resume_point(work: Path, key: str, owner: bool = True) -> Path | None:
    """The last checkpoint of an unfinished run of this fold with the same run key (code, config, data, weights).

    Its `owner` clears anything else in the work folder (another config's checkpoints);
    the other DDP processes only look, and whenever they look they see the owner's answer.
    """
    key_file, last = work / "run_key", work / "checkpoints" / "last.ckpt"
    if key_file.is_file() and last.is_file():
        if key_file.read_text() == key:
            log.info("resuming from %s", last)
            return last
        log.info("not resuming from %s: another code, config, data or weights wrote it; starting afresh", last)
    if not owner:
        return None
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    key_file.write_text(key)
    return None


def prediction_table(index: pd.DataFrame, rows: np.ndarray, probs: np.ndarray) -> pd.DataFrame:
    """predictions.csv: one row per file of the cache's `rows` (filename, fold, label, pred, prob_<class>...).

    A file cut into windows (features.clips=windows) has a row per window; its probabilities are the mean of its
    windows' probabilities, the rule `esclab predict` applies to a long recording, so a fold's predictions are
    those of the files a practitioner has, as evaluate pools them. A padded file's one row is its own mean.
    """
    clips = index.loc[rows, ["filename", "fold", "label"]].reset_index(drop=True)
    table = clips.drop_duplicates("filename").reset_index(drop=True)
    columns = [f"prob_{i}" for i in range(probs.shape[1])]
    mean = pd.DataFrame(probs, columns=columns).groupby(clips["filename"], sort=False).mean()
    probs = mean.loc[table["filename"]].to_numpy()
    table["pred"] = probs.argmax(axis=1)
    return pd.concat([table, pd.DataFrame(probs, columns=columns)], axis=1)


def write_csv(table: pd.DataFrame, path: Path) -> None:
    with atomic_file(path) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")


def train(cfg: DictConfig) -> float | None:
    """Train `cfg.fold`, or every fold and then pool them; returns the validation score of the folds it trained
    (None in a DDP process other than rank zero, which writes nothing to score)."""
    folds = list(cfg.dataset.folds)
    if cfg.fold is not None and cfg.fold not in folds:
        raise EsclabError(f"fold={cfg.fold} is not a test fold of dataset={cfg.dataset.name}: use one of "
                          f"{', '.join(map(str, folds))}, or fold=null for all of them")
    check_learner(cfg.model, cfg.features)
    check_augment(OmegaConf.to_container(cfg.augment), representation(cfg.features))
    if cfg.model.name in HEADS and cfg.train.sampler != "shuffle":
        raise EsclabError(f"train.sampler={cfg.train.sampler} draws training batches, but model={cfg.model.name} fits "
                          "every training row at once: set train.sampler=shuffle (train.class_weights=balanced weighs "
                          "the classes for a head too)")
    check_cache(Path(cfg.paths.features), representation(cfg.features), cache_settings(cfg.features))
    distributed.check_parallel_folds(cfg.train.parallel_folds, cfg.trainer.devices, cfg.trainer.get("num_nodes", 1))
    # Finds or creates the parent run before any fold process looks for it; under DDP only rank zero's does.
    tracker = Tracker(cfg, active=distributed.is_rank_zero())
    reports, models = Path(cfg.paths.reports) / "folds", Path(cfg.paths.models)
    if tracker.active and any(unfinished(models / f"fold_{fold}.ckpt", reports / str(fold) / "fold.json",
                                         tracker.identity) for fold in ([cfg.fold] if cfg.fold else folds)):
        tracker.open()  # a new parent run if the cross-validation's last one has FINISHED
    if cfg.fold is not None:
        train_fold(cfg, cfg.fold, tracker)
        if not tracker.active:
            return None
        log.info("MLflow: %s", tracker.ui_url())
        return validation_score(cfg, [cfg.fold])
    try:
        if cfg.train.parallel_folds == 1:  # a positive integer: esclab.config checks it
            for fold in folds:
                train_fold(cfg, fold, tracker)
        else:
            train_folds_in_processes(cfg, folds, cfg.train.parallel_folds)
    except BaseException:
        tracker.fail()  # also when a fold in another process failed, after the others were done
        raise
    if not tracker.active:
        return None
    return evaluate(cfg, tracker)[f"{cfg.train.monitor}_best_mean"]


def train_folds_in_processes(cfg: DictConfig, folds: list[int], processes: int) -> None:
    """Train `processes` folds at a time, each in a fresh process; a fold's outputs are those of the plain loop.

    `train_fold` seeds everything itself, so where a fold runs does not change
    its numbers. The processes are spawned, not forked: a forked child cannot use
    CUDA once the parent has. A process ends with its fold, which hands its GPU
    memory back. Each opens its own Tracker, which finds the parent run by its
    key. A failed fold fails the run after the others have finished (rerunning
    then trains only the folds that did not finish). On a machine with GPUs each
    process holds one of them while its fold trains (`device_slots`).
    """
    spawn = get_context("spawn")
    processes = min(processes, len(folds))
    with Manager() as manager, ProcessPoolExecutor(processes, mp_context=spawn, max_tasks_per_child=1) as pool:
        free_gpus = manager.Queue()
        gpus = distributed.device_slots(cfg.trainer.accelerator, processes, distributed.visible_gpus())
        for gpu in gpus or [None] * processes:
            free_gpus.put(gpu)
        for future in [pool.submit(train_fold_alone, cfg, fold, free_gpus) for fold in folds]:
            future.result()


def train_fold_alone(cfg: DictConfig, fold: int, free_gpus: Queue) -> None:
    """One fold in a process of its own (the parent's logging setup does not reach a spawned process), on a GPU
    taken from `free_gpus` (None on a CPU) and handed back when the fold ends; its trainer sees that GPU alone."""
    logging.basicConfig(level=logging.INFO, format=f"[fold {fold}] %(name)s: %(message)s")
    silence_known_noise()
    gpu = free_gpus.get()
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu  # before anything in this process starts CUDA
        log.info("on GPU %s", gpu)
    try:
        train_fold(cfg, fold, Tracker(cfg))
    finally:
        free_gpus.put(gpu)


def evaluate(cfg: DictConfig, tracker: Tracker | None = None) -> dict:
    """Pool the folds' predictions into reports/ and onto the cross-validation's parent run (with the folds'
    validation score as `<train.monitor>_best_mean`), and end that run; returns the metrics it logged there."""
    reports = Path(cfg.paths.reports)
    tracker = tracker or Tracker(cfg)
    try:
        check_folds(reports / "folds", list(cfg.dataset.folds), tracker.key)
        metrics = write_reports(reports / "folds", Path(cfg.paths.features) / "index.csv", reports,
                                folds=list(cfg.dataset.folds), top_k=cfg.evaluate.top_k)
    except BaseException:
        tracker.fail()
        raise
    pooled = metrics | {f"{cfg.train.monitor}_best_mean": validation_score(cfg, list(cfg.dataset.folds))}
    tracker.log_pooled(pooled, reports)
    log.info("cross-validation: accuracy %.4f +- %.4f", metrics["accuracy_mean"], metrics["accuracy_std"])
    if cfg.tracking.register_as:
        version = tracker.register(cfg.tracking.register_as)
        log.info("registered: esclab predict --models models:/%s/%s", cfg.tracking.register_as, version)
    log.info("MLflow: %s", tracker.ui_url())
    return pooled


def check_folds(folds_dir: Path, folds: list[int], key: str) -> None:
    """Refuse to pool folds that are not this cross-validation's: each of `folds` must have finished (fold.json)
    with run key `key`, i.e. with the code, config, data and weights the pipeline has now."""
    missing, odd = [], []
    for fold in folds:
        record = folds_dir / str(fold) / "fold.json"
        if not record.is_file():
            missing.append(fold)
        elif json.loads(record.read_text()).get("run_key") != key:
            odd.append(fold)
    if missing:
        raise EsclabError(f"folds {', '.join(map(str, missing))} have no finished run in {folds_dir} (fold.json): "
                          "train them (dvc repro, or python train.py with the same settings)")
    if odd:
        raise EsclabError(f"folds {', '.join(map(str, odd))} in {folds_dir} were trained with other code, config, "
                          "data or weights than the settings now (a hand-run `python train.py fold=k ...`, or an older "
                          "run): retrain them with `dvc repro`, or `python train.py` with these settings")
