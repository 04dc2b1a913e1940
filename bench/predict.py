"""A trained model on a small device: peak memory, latency per 5-s clip on one core, and size, per format.

Each cross-validation folder given (--models, repeatable; its fold models averaged, or
--fold's) is exported as `esclab export` does, then each format predicts one clip in a
process of its own pinned to one core with one thread, so that its peak RSS and its
latency are its own: `torch` (the fold checkpoints, as `esclab predict` runs them),
`onnx` and `onnx-int8` (onnxruntime and numpy only; the process reports whether
torch was imported). Latency is the median of --repeats predictions after two warm-ups.

With --split (a split table of the data the models were trained on), each fold's
model is also exported on its own and the torch, ONNX and int8 versions predict
that fold's held-back clips: the accuracy each format gives on the folds.

    python bench/predict.py --models models [--models other/models] [--split data/split.csv] [--clip clip.wav]
"""

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf
from report import parse_args, report

from esclab.logs import silence_known_noise
from esclab.serving.export import export

# Runs in a fresh process: load one format, predict the clip --repeats times, print what it measured.
MEASURE = """
import json, os, re, sys, time
from pathlib import Path
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
fmt, model, clip, repeats = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
from esclab.data.audio import decode
if fmt == "torch":
    import torch
    torch.set_num_threads(1)
    from esclab.serving.models import load_cross_validation
    fold = int(sys.argv[5]) if len(sys.argv) > 5 else None
    loaded = load_cross_validation(model, fold)
else:
    from esclab.serving.runtime import ExportedModel
    loaded = ExportedModel(model, threads=1)
mono, rate = decode(clip)
seconds = []
for _ in range(repeats + 2):
    start = time.perf_counter()
    loaded.predict_windows([mono], rate)
    seconds.append(time.perf_counter() - start)
# VmHWM, not getrusage's ru_maxrss: the latter keeps the parent's high-water mark across fork and exec.
peak_kb = int(re.search(r"VmHWM:\\s+(\\d+)", Path("/proc/self/status").read_text())[1])
print(json.dumps({"peak_rss_mb": peak_kb / 1024,
                  "ms_per_clip": 1000 * sorted(seconds[2:])[len(seconds[2:]) // 2],
                  "torch_imported": "torch" in sys.modules}))
"""


def measure(fmt: str, model: Path, clip: Path, repeats: int, fold: int | None) -> dict:
    args = [sys.executable, "-c", MEASURE, fmt, str(model), str(clip), str(repeats)]
    done = subprocess.run(args + ([str(fold)] if fold is not None and fmt == "torch" else []),
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def sizes(models: Path, fold: int | None, exported: Path) -> dict[str, int]:
    checkpoints = [models / f"fold_{fold}.ckpt"] if fold is not None else sorted(models.glob("fold_*.ckpt"))
    return {"torch": sum(p.stat().st_size for p in checkpoints), "onnx": (exported / "model.onnx").stat().st_size,
            "onnx-int8": (exported / "model.int8.onnx").stat().st_size}


FORMATS = ("torch", "onnx", "onnx-int8")


def fold_accuracy(models: Path, split: Path, tmp: Path) -> list[dict]:
    """Each fold's own model, torch and exported, on that fold's held-back clips."""
    from esclab.data.audio import decode
    from esclab.serving.models import load_cross_validation
    from esclab.serving.runtime import ExportedModel

    table, rows = pd.read_csv(split), []
    for fold in sorted(int(p.stem.split("_")[1]) for p in models.glob("fold_*.ckpt")):
        out = tmp / f"fold_{fold}"
        export(models, out, fold)
        formats = {"torch": load_cross_validation(models, fold), "onnx": ExportedModel(out / "model.onnx"),
                   "onnx-int8": ExportedModel(out / "model.int8.onnx")}
        clips = table[table["fold"] == fold]
        names = formats["torch"].classes
        truth = np.array([names.index(c) for c in clips["category"]])
        predicted = {name: [] for name in formats}
        for path in clips["path"]:
            mono, rate = decode(path)
            for name, model in formats.items():
                predicted[name].append(int(model.predict_windows([mono], rate)[0].argmax()))
        rows.append({"fold": fold, "clips": len(clips),
                     **{f"{name}_accuracy": float(np.mean(np.array(p) == truth)) for name, p in predicted.items()},
                     "int8_changed_predictions": int(np.sum(np.array(predicted["onnx"])
                                                            != np.array(predicted["onnx-int8"])))})
        print(rows[-1], flush=True)
    return rows


def accuracy_summary(folds: list[dict]) -> str:
    """`fold_accuracy`'s rows as each format's mean accuracy and how many answers int8 changed."""
    means = (f"{fmt} {100 * np.mean([row[f'{fmt}_accuracy'] for row in folds]):.2f} %" for fmt in FORMATS)
    return f"{', '.join(means)} ({sum(row['int8_changed_predictions'] for row in folds)} int8 answers changed)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=Path, action="append", required=True,
                        help="a cross-validation's models folder (fold_<k>.ckpt); repeat for several")
    parser.add_argument("--fold", type=int, help="one fold's model instead of all folds averaged")
    parser.add_argument("--clip", type=Path, help="the clip to predict (default: 5 s of synthetic 44.1 kHz audio)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--split", type=Path, help="split table of the models' data: also measure each format's "
                                                   "accuracy on the held-back folds")
    args = parse_args(parser, "predict", threads=False)
    silence_known_noise()

    rows, accuracy = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        clip = args.clip
        if clip is None:
            rng = np.random.default_rng(0)
            t = np.arange(5 * 44100) / 44100
            clip = tmp / "clip.wav"
            sf.write(clip, (0.3 * np.sin(2 * np.pi * 440 * t) + rng.normal(0, 0.05, len(t))).astype(np.float32), 44100)
        for models in args.models:
            name = f"{models}" + (f" fold {args.fold}" if args.fold is not None else "")
            exported = tmp / "exported" / str(len(rows))
            record = export(models, exported, args.fold)
            size = sizes(models, args.fold, exported)
            for fmt, path in zip(FORMATS, (models, exported / "model.onnx", exported / "model.int8.onnx")):
                rows.append({"model": name, "format": fmt, "size_mb": round(size[fmt] / 1e6, 1),
                             **{k: round(v, 1) if isinstance(v, float) else v
                                for k, v in measure(fmt, path, clip, args.repeats, args.fold).items()}})
                print(rows[-1], flush=True)
            if args.split:
                accuracy[name] = fold_accuracy(models, args.split, tmp / "folds")
            rows[-1]["int8_max_abs_difference"] = round(record["int8_max_abs_difference"], 4)
    result = {"clip": str(args.clip or "5 s synthetic, 44.1 kHz"), "threads": 1, "cores": 1,
              "machine": platform.processor() or platform.machine(), "formats": rows}
    for name, folds in accuracy.items():
        result[f"accuracy {name}"] = folds
    report(result, args.out, title="a trained model per format (torch, ONNX, ONNX int8) on one core: file size, peak "
           "RSS, latency per clip; each fold's held-back clips", headline="; ".join(
               f"{r['model']} {r['format']}: {r['size_mb']} MB, peak RSS {r['peak_rss_mb']} MB, {r['ms_per_clip']} ms"
               for r in rows) + "".join(f"; {name} accuracy: {accuracy_summary(folds)}" for name, folds in accuracy.items()))


if __name__ == "__main__":
    main()
