"""The embedding stage's throughput per pretrained backbone: clips/s, peak memory and cache size.

Synthetic ESC-50-shaped clips (5 s at 44.1 kHz, so decoding and resampling are
timed too) go through the features stage as `features=<backbone>` runs it, after
a warm-up on a few clips (model load, first inference). Prints a table and writes JSON.

    python bench/embed.py [--clips-per-class 8] [--backbones yamnet] [--out reports/bench/embed.json]
"""

import argparse
import platform
import resource
import tempfile
import time
from pathlib import Path

from omegaconf import OmegaConf

from report import parse_args, report, synthetic_split

from esclab.data.embeddings import write_embeddings
from esclab.models.backbones import BACKBONES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clips-per-class", type=int, default=8,
                        help="x 50 classes (at least 5, one per fold); 40 is ESC-50's size")
    parser.add_argument("--backbones", default=",".join(BACKBONES), help="comma-separated keys of BACKBONES")
    args = parse_args(parser, "embed", threads=False)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        split, warm, table = synthetic_split(tmp, args.clips_per_class, warm_clips=5)
        for name in args.backbones.split(","):
            features = OmegaConf.create({"representation": "embedding", "backbone": name, "weights": None,
                                         "sample_rate": BACKBONES[name].sample_rate, "duration": 5.0})
            write_embeddings(warm, tmp / f"warm-{name}", features)
            start = time.perf_counter()
            out = write_embeddings(split, tmp / name, features)
            seconds = time.perf_counter() - start
            cache_bytes = sum(f.stat().st_size for f in out.iterdir())
            rows.append({"backbone": name, "clips_per_s": round(len(table) / seconds, 1),
                         "ms_per_clip": round(1000 * seconds / len(table), 1),
                         "cache_mb_per_1000_clips": round(cache_bytes / 2**20 / len(table) * 1000, 1)})
    result = {
        "clips": len(table),
        "clip_seconds": 5.0,
        "source_sample_rate": 44100,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "device": "cpu (onnxruntime, one thread)",
        "machine": platform.processor() or platform.machine(),
        "backbones": rows,
    }
    report(result, args.out)


if __name__ == "__main__":
    main()
