"""The embedding stage's throughput per pretrained backbone: clips/s, peak memory and cache size.

Synthetic ESC-50-shaped clips (5 s at 44.1 kHz, so decoding and resampling are
timed too) go through the features stage as `features=<backbone>` runs it, after
a warm-up on a few clips (model load, first inference). Each backbone runs in a
process of its own, so that its peak memory is its own. Prints a table and writes JSON.

    python bench/embed.py [--clips-per-class 8] [--backbones yamnet,aisfx,yamnet+aisfx] [--out reports/bench/embed.json]
"""

import argparse
import platform
import resource
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from omegaconf import OmegaConf

from report import parse_args, report, synthetic_split

from esclab.data.embeddings import write_embeddings
from esclab.models.backbones import BACKBONES
from esclab.models.backbones.weights import PinnedWeights

# The backbones whose weights install with esclab; a hub backbone (wav2vec2, clap, ...) is timed where its default
# checkpoint can be downloaded or is in the hub's cache: name it in --backbones.
INSTALLED = [name for name, backbone in BACKBONES.items() if isinstance(backbone.pinned, PinnedWeights)]


def measure(backbones: list[str], split: Path, warm: Path, clips: int, tmp: Path) -> dict:
    """One features stage over `split` with these backbones, in a fresh process: its speed, cache and peak RSS."""
    features = OmegaConf.create({"representation": "embedding", "backbones": backbones,
                                 "weights": dict.fromkeys(backbones), "duration": 5.0, "clips": "pad",
                                 "hop": None})
    name = "+".join(backbones)
    write_embeddings(warm, tmp / f"warm-{name}", features)
    start = time.perf_counter()
    out = write_embeddings(split, tmp / name, features)
    seconds = time.perf_counter() - start
    cache_bytes = sum(f.stat().st_size for f in out.iterdir())
    return {"backbone": name, "clips_per_s": round(clips / seconds, 1), "ms_per_clip": round(1000 * seconds / clips, 1),
            "cache_mb_per_1000_clips": round(cache_bytes / 2**20 / clips * 1000, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clips-per-class", type=int, default=8,
                        help="x 50 classes (at least 5, one per fold); 40 is ESC-50's size")
    parser.add_argument("--backbones", default=",".join(INSTALLED),
                        help=f"comma-separated keys of BACKBONES ({', '.join(BACKBONES)}); join keys with + to time a "
                             "combination; default: those whose weights install with esclab")
    args = parse_args(parser, "embed", threads=False)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        split, warm, table = synthetic_split(tmp, args.clips_per_class, warm_clips=5)
        for name in args.backbones.split(","):
            with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as process:
                rows.append(process.submit(measure, name.split("+"), split, warm, len(table), tmp).result())
    result = {
        "clips": len(table),
        "clip_seconds": 5.0,
        "source_sample_rate": 44100,
        "device": "cpu (YAMNet: onnxruntime, one thread; aiSFX: torch, all cores)",
        "machine": platform.processor() or platform.machine(),
        "backbones": rows,
    }
    report(result, args.out, title=f"embedding stage per backbone, {len(table)} clips of 5 s at 44.1 kHz (decode and "
           "resample included), each in its own process",
           headline="; ".join(f"{r['backbone']} {r['clips_per_s']} clips/s ({r['ms_per_clip']} ms), peak RSS "
                              f"{r['peak_rss_mb']} MB, cache {r['cache_mb_per_1000_clips']} MB per 1000 clips"
                              for r in rows))


if __name__ == "__main__":
    main()
