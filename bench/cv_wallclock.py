"""Wall-clock of a whole 5-fold cross-validation at ESC-50's size, and the achieved TFLOP/s of its training.

The data is a synthetic ESC-50 of the real one's exact shape (50 classes x 40
clips, 5 s at 44.1 kHz, 128 x 431 log-mels; src/esclab/data/synthetic.py),
built in a temporary folder first by the download, split and features stages
(data_prep_s, not part of the timed run). The
timed run is `train(cfg)`, what `python train.py` runs, with the recipe's
overrides and any further ones:

    python bench/cv_wallclock.py trainer=gpu_fast train.channels_last=true      # plain recipe, GPU fast path
    python bench/cv_wallclock.py --recipe experiment=cnn4_strong trainer=gpu_fast train.channels_last=true

On a CPU the full run takes days, so --folds, --epochs and --clips-per-class
shrink it; the steady epoch time (the spacing of the fold runs' per-epoch
MLflow records, first epoch left out) is then scaled to the full data and
epochs. The JSON says which numbers were measured and which extrapolated.

Achieved TFLOP/s: FlopCounterMode counts one training step (forward, loss,
backward) and one evaluation forward; an epoch's training and validation clips
at those counts, over the steady epoch time, against the device's dense bf16 peak.
"""

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from mlflow import MlflowClient
from report import parse_args, report
from torch.utils.flop_counter import FlopCounterMode

from esclab import cli
from esclab.data.features import LogMelSettings
from esclab.models import build_model, model_settings
from esclab.training.run import fold_data, train

CONF = Path(__file__).resolve().parents[1] / "conf"
ESC50_CLIPS_PER_CLASS = 40
# Dense bf16 tensor-core peaks from the vendor's data sheets, in TFLOP/s; the first name found in the device's wins.
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0}


def config(overrides: list[str]):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("config", overrides=overrides)


def steady_epoch_seconds(tracking_uri: str, experiment: str) -> float | None:
    """Median spacing of consecutive epochs' train/loss records over every fold run; None with one epoch."""
    client = MlflowClient(tracking_uri)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    gaps = []
    for run in client.search_runs([experiment_id], "tags.`esclab.fold` != 'all'"):
        stamps = sorted(m.timestamp for m in client.get_metric_history(run.info.run_id, "train/loss"))
        gaps += list(np.diff(stamps) / 1000)
    return float(np.median(gaps)) if gaps else None


def flops_per_clip(cfg, settings: LogMelSettings) -> tuple[float, float]:
    """FLOPs of one clip in a training step (forward, loss, backward) and in an evaluation forward."""
    layers = model_settings(cfg.model)
    network = build_model(cfg.model.name, n_classes=cfg.dataset.n_classes,
                          input_shape=(settings.n_mels, settings.n_frames), **layers)
    x = torch.randn(2, 1, settings.n_mels, settings.n_frames)  # FLOPs grow linearly with the batch
    y = torch.zeros(2, dtype=torch.int64)
    with FlopCounterMode(display=False) as step:
        F.cross_entropy(network.train()(x), y).backward()
    with FlopCounterMode(display=False) as forward, torch.no_grad():
        network.eval()(x)
    return step.get_total_flops() / 2, forward.get_total_flops() / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("overrides", nargs="*", help="further Hydra overrides, e.g. trainer=gpu_fast")
    parser.add_argument("--recipe", default="", help="the recipe's Hydra overrides, e.g. experiment=cnn4_strong; "
                                                     "default: the plain recipe (conf/ as it is)")
    parser.add_argument("--folds", type=int, default=5, help="train the first k folds (all: the pooled run)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per fold; default: the recipe's")
    parser.add_argument("--clips-per-class", type=int, default=ESC50_CLIPS_PER_CLASS, help="40 is ESC-50's size")
    args = parse_args(parser, "cv_wallclock")
    recipe = args.recipe.split() + args.overrides
    full = config(recipe)
    n_folds, full_epochs = full.dataset.n_folds, full.trainer.max_epochs
    epochs = args.epochs or full_epochs
    if not 1 <= args.folds <= n_folds:
        parser.error(f"--folds must be between 1 and {n_folds}")
    reduced = args.folds < n_folds or epochs < full_epochs or args.clips_per_class < ESC50_CLIPS_PER_CLASS
    if reduced and epochs < 2:
        parser.error("a reduced run needs --epochs 2 or more: the first epoch (warm-up) is not timed as steady")
    if reduced and full.train.parallel_folds > 1:
        parser.error("train.parallel_folds > 1 is measured only by a whole run: "
                     "drop --folds, --epochs and --clips-per-class")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # Synthetic data shaped like ESC-50, written into tmp; the run's outputs go there too.
        base = ["dataset=synthetic", f"dataset.synthetic.clips_per_class={args.clips_per_class}", *recipe,
                f"trainer.max_epochs={epochs}", "trainer.enable_progress_bar=false",
                *(f"paths.{name}={tmp / name}" for name in ("downloads", "raw", "features", "models", "reports")),
                f"paths.split={tmp / 'split.csv'}", f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}"]
        cfg = config(base)
        start = time.perf_counter()
        for stage in (cli.download, cli.split, cli.features):  # what `dvc repro` runs before training
            stage(cfg)
        prep_s = time.perf_counter() - start

        fold_s, metrics = [], None
        if args.folds == n_folds:
            start = time.perf_counter()
            train(cfg)
            wall_s = time.perf_counter() - start
            metrics = json.loads((Path(cfg.paths.reports) / "metrics.json").read_text())  # what evaluate pooled
        else:
            for fold in range(1, args.folds + 1):
                start = time.perf_counter()
                train(config([*base, f"fold={fold}"]))
                fold_s.append(round(time.perf_counter() - start, 1))
            wall_s = sum(fold_s)
        epoch_s = steady_epoch_seconds(cfg.tracking.uri, cfg.tracking.experiment)
        one_fold = fold_data(cfg, 1)
        n_train, n_val = len(one_fold.train_rows), len(one_fold.val_rows)

    settings = LogMelSettings.from_config(cfg.features)
    train_flops, eval_flops = flops_per_clip(cfg, settings)
    achieved = (n_train * train_flops + n_val * eval_flops) / epoch_s / 1e12 if epoch_s else None
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and cfg.trainer.accelerator != "cpu" else None
    peak = next((tflops for name, tflops in PEAK_BF16_TFLOPS.items() if device and name in device), None)

    if reduced:
        # Per fold: what did not scale (set-up, the warm-up epoch, prediction, MLflow) plus the steady epochs,
        # scaled to ESC-50's clip count; the un-scaled part is taken as measured.
        overhead_s = wall_s / args.folds - epochs * epoch_s
        full_run_s = n_folds * (overhead_s + full_epochs * epoch_s * ESC50_CLIPS_PER_CLASS / args.clips_per_class)
    else:
        overhead_s, full_run_s = None, wall_s
    result = {
        "device": device or f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "overrides": recipe,
        "input": [1, settings.n_mels, settings.n_frames],
        "batch_size": cfg.train.batch_size,
        "data_prep_s": round(prep_s, 1),  # download (synthesised), split and features: not timed
        "measured_folds": args.folds,
        "measured_epochs": epochs,
        "measured_clips": args.clips_per_class * cfg.dataset.n_classes,
        "measured_train_val_clips_per_fold": [n_train, n_val],
        "measured_wall_s": round(wall_s, 1),
        "measured_fold_s": fold_s or None,
        "measured_steady_epoch_s": round(epoch_s, 2) if epoch_s else None,
        "measured_overhead_per_fold_s": round(overhead_s, 1) if reduced else None,
        "measured_pooled_accuracy": round(metrics["accuracy_mean"], 4) if metrics else None,
        "full_run_s": round(full_run_s, 1),
        "full_run_h": round(full_run_s / 3600, 2),
        "full_run_extrapolated": reduced,
        "full_run_formula": (f"{n_folds} x (overhead_per_fold + {full_epochs} epochs x steady_epoch_s x "
                             f"{ESC50_CLIPS_PER_CLASS}/{args.clips_per_class})") if reduced else "measured",
        "train_gflop_per_clip": round(train_flops / 1e9, 2),
        "eval_gflop_per_clip": round(eval_flops / 1e9, 2),
        "achieved_tflops": round(achieved, 4) if achieved else None,
        "peak_bf16_tflops": peak,
        "share_of_peak": round(achieved / peak, 4) if achieved and peak else None,
    }
    scale = "extrapolated" if reduced else "measured"
    report(result, args.out, title=f"a whole {n_folds}-fold cross-validation at ESC-50's size, "
           f"{' '.join(recipe) or 'the plain recipe'}",
           headline=f"steady epoch {result['measured_steady_epoch_s']} s; full run {result['full_run_h']} h {scale}; "
           f"{result['train_gflop_per_clip']} GFLOP per clip per training step, "
           f"{result['achieved_tflops']} TFLOP/s achieved")


if __name__ == "__main__":
    main()
