"""One fold trained by one process and by DDP processes on the CPU (gloo): training clips per second.

Each run is a real `python train.py fold=1 ...` (DDP starts its further processes
from that command line, so it cannot run inside this one), on a synthetic dataset
of ESC-50's shape built first by the download, split and features stages. The
speed is the fold's training clips over its steady epoch time (the spacing of
its per-epoch MLflow records, the first epoch left out, validation included);
the rounds alternate the two set-ups, and their paired ratio says whether DDP
is faster. Both use the same cores: each DDP process gets --threads torch threads,
the one process --devices x --threads (default: torch's and Lightning's choice,
cores / processes each).

    python bench/ddp.py --threads 1              # 1 process, 2 threads vs trainer=ddp_cpu: 2 processes, 1 thread
    python bench/ddp.py --devices 4 --threads 4  # on a machine with 16 cores
    python bench/ddp.py --threads 1 --clips-per-class 10 dataset.synthetic.duration=1.0 \
        dataset.synthetic.sample_rate=16000 features.sample_rate=16000 features.duration=1.0 \
        features.n_fft=512 features.hop_length=128 features.n_mels=32   # 1-s clips, 32 x 126 log-mels: quick

On one machine's cores DDP shares the same cores out among processes and adds a
gradient all-reduce per step; whether that beats one process's threads depends
on how well the network's operations spread over threads (small ones do badly).
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cv_wallclock import config, steady_epoch_seconds
from report import iqr, paired_ratio, parse_args, report, spread

from esclab import cli
from esclab.training.run import fold_data

TRAIN = Path(__file__).resolve().parents[1] / "train.py"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("overrides", nargs="*", help="further Hydra overrides for both set-ups")
    parser.add_argument("--devices", type=int, default=2, help="DDP processes")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run (the first is not timed)")
    parser.add_argument("--clips-per-class", type=int, default=8, help="at least 5 (a clip per fold); ESC-50 has 40")
    parser.add_argument("--repeats", type=int, default=3, help="rounds, each one run of either set-up")
    args = parse_args(parser, "ddp")
    if args.epochs < 2:
        parser.error("--epochs must be 2 or more: the first epoch (warm-up) is not timed")
    setups = {"one_process": [], "ddp": ["trainer=ddp_cpu", f"trainer.devices={args.devices}"]}
    threads = {"one_process": args.threads and args.threads * args.devices, "ddp": args.threads}

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = ["dataset=synthetic", f"dataset.synthetic.clips_per_class={args.clips_per_class}", *args.overrides,
                *(f"paths.{name}={tmp / name}" for name in ("downloads", "raw", "features")),
                f"paths.split={tmp / 'split.csv'}"]
        cfg = config(data)
        for stage in (cli.download, cli.split, cli.features):
            stage(cfg)
        n_train = len(fold_data(cfg, 1).train_rows)
        speeds = {name: [] for name in setups}
        for round_ in range(args.repeats):
            for name, setup in setups.items():
                out = tmp / f"{name}_{round_}"
                uri = f"sqlite:///{out / 'mlflow.db'}"
                command = [sys.executable, str(TRAIN), *data, *setup, "fold=1", f"trainer.max_epochs={args.epochs}",
                           "trainer.enable_progress_bar=false", "tracking.log_model=false", "tracking.register_as=null",
                           f"paths.models={out / 'models'}", f"paths.reports={out / 'reports'}", f"tracking.uri={uri}"]
                start = time.perf_counter()
                omp = {"OMP_NUM_THREADS": str(threads[name])} if threads[name] else {}
                subprocess.run(command, cwd=tmp, check=True, capture_output=True, env=os.environ | omp)
                epoch_s = steady_epoch_seconds(uri, cfg.tracking.experiment)
                speeds[name].append(n_train / epoch_s)
                print(f"round {round_} {name}: {n_train / epoch_s:.1f} clips/s, {time.perf_counter() - start:.0f} s")

    result = {
        "devices": args.devices,
        "threads": {name: n or "default" for name, n in threads.items()},  # per process
        "cpu_cores": os.cpu_count(),
        "overrides": args.overrides,
        "train_clips": n_train,
        "epochs": args.epochs,
        "batch_size_per_process": cfg.train.batch_size,
        "one_process_clips_per_s": spread(speeds["one_process"]),
        "ddp_clips_per_s": spread(speeds["ddp"]),
        "ddp_over_one_process": paired_ratio(speeds["ddp"], speeds["one_process"]),
    }
    report(result, args.out, title=f"one fold in one process vs {args.devices} DDP processes (trainer=ddp_cpu) on the "
           f"same cores, {args.repeats} interleaved rounds of {args.epochs} epochs",
           headline=f"training clips/s: one process {iqr(result['one_process_clips_per_s'])}, DDP "
           f"{iqr(result['ddp_clips_per_s'])}; DDP over one process {iqr(result['ddp_over_one_process'])}")


if __name__ == "__main__":
    main()
