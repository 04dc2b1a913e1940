"""Features-stage throughput against a naive per-file librosa loop, on the same clips.

Both paths are warmed up first (imports, FFT plans, on a small subset), then timed
on the whole set in --repeats rounds, the two in turn (stage first in odd rounds,
naive loop first in even ones), so that a slow spell on a shared machine lands on
both alike. Reported: each path's median clips/s and the speedup, the median and
interquartile range of the per-round ratios with report.paired_ratio's verdict.
Prints a table and writes JSON.

    python bench/features.py [--clips-per-class 10] [--repeats 3] [--out reports/bench/features.json]
"""

import argparse
import platform
import resource
import tempfile
import time
from pathlib import Path

import librosa
import torch
from report import iqr, paired_ratio, parse_args, report, spread, synthetic_split

from esclab.data.features import LogMelSettings, write_features


def naive_loop(paths, s: LogMelSettings) -> None:
    """What the seed project does: librosa.load + melspectrogram + power_to_db, one file at a time."""
    for path in paths:
        y, sr = librosa.load(path, sr=s.sample_rate, duration=s.duration)
        mel = librosa.feature.melspectrogram(y=y, sr=sr, n_fft=s.n_fft, hop_length=s.hop_length, n_mels=s.n_mels)
        librosa.power_to_db(mel, top_db=s.top_db)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clips-per-class", type=int, default=10, help="x 50 classes; 40 is ESC-50's size")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds, both paths in each")
    args = parse_args(parser, "features", threads=False)
    settings = LogMelSettings()  # the ESC-50 defaults: 44.1 kHz, 5 s, 128 mels

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        split, warm, table = synthetic_split(tmp, args.clips_per_class, warm_clips=20)
        paths = table["path"].tolist()

        write_features(warm, tmp / "warm", settings)
        naive_loop(paths[:20], settings)
        contenders = {"stage": lambda: write_features(split, tmp / "features", settings),
                       "naive": lambda: naive_loop(paths, settings)}
        seconds = {name: [] for name in contenders}
        for round_ in range(args.repeats):
            for name in list(contenders)[:: -1 if round_ % 2 else 1]:
                seconds[name].append(timed(contenders[name]))
        # ru_maxrss is a high-water mark: the stage's, unless the naive loop or making the clips went higher; the
        # stage's forked workers (Linux) count apart, the largest of them (their pages shared with this one count too).
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        worker_peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        cache_bytes = sum(f.stat().st_size for f in (tmp / "features").iterdir())

    n = len(paths)
    speedup = paired_ratio(seconds["naive"], seconds["stage"])
    result = {
        "clips": n,
        "clip_seconds": settings.duration,
        "sample_rate": settings.sample_rate,
        "rounds": args.repeats,
        "stage_clips_per_s": round(n / spread(seconds["stage"])["median"], 1),
        "naive_librosa_clips_per_s": round(n / spread(seconds["naive"])["median"], 1),
        "speedup": speedup["median"],
        "speedup_iqr": speedup["iqr"],
        "speedup_verdict": speedup["verdict"],
        "peak_rss_mb": round(peak_kb / 1024, 1),
        "peak_worker_rss_mb": round(worker_peak_kb / 1024, 1),
        "cache_mb": round(cache_bytes / 2**20, 1),
        "cache_mb_per_1000_clips": round(cache_bytes / 2**20 / n * 1000, 1),
        "cores": torch.get_num_threads(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "machine": platform.processor() or platform.machine(),
    }
    report(result, args.out, title=f"features stage vs a naive per-file librosa loop, {n} clips of "
           f"{settings.duration:g} s at {settings.sample_rate} Hz, {args.repeats} interleaved rounds",
           headline=f"{result['stage_clips_per_s']} vs {result['naive_librosa_clips_per_s']} clips/s, speedup "
           f"{iqr(speedup)}; peak RSS {result['peak_rss_mb']} MB (largest worker {result['peak_worker_rss_mb']} MB); "
           f"cache {result['cache_mb_per_1000_clips']} MB per 1000 clips")


if __name__ == "__main__":
    main()
