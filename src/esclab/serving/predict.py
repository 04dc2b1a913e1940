"""`esclab predict`: the top classes of audio files, folders or globs, from the workspace's cross-validation.

Each input is decoded as it is (any rate, channels mixed to mono, any format
soundfile reads), cut into windows of the model's training length every `--hop`
seconds (a recording shorter than one window is one zero-padded window; the last
window is padded), and each window goes through the model's own preprocessing.
A file's result is the mean of its windows' probabilities; the fold models'
probabilities are averaged first. Files that cannot be read are reported and
skipped; the exit status is 1 if any was.
"""

import argparse
import csv
import glob
import json
import math
import sys
from pathlib import Path

import numpy as np
import soundfile as sf

from esclab.data.audio import decode
from esclab.errors import EsclabError
from esclab.serving.sources import load_model

AUDIO = tuple(f".{name.lower()}" for name in sf.available_formats()) + (".oga", ".opus", ".aif")
FIX = "replace it or leave it out"


def audio_inputs(inputs: list[str]) -> list[Path]:
    """Files as given, the audio files under folders (sorted), and the matches of globs."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO)
            if not files:
                raise EsclabError(f"no audio files ({', '.join(sorted(set(AUDIO)))}) in folder {path}")
            found += files
        elif glob.has_magic(item):
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True) if Path(m).is_file())
            if not matches:
                raise EsclabError(f"no file matches {item}")
            found += matches
        else:
            found.append(path)
    return found


def windows(mono: np.ndarray, rate: int, duration: float, hop: float) -> list[tuple[float, np.ndarray]]:
    """(start in seconds, samples) of each window of `duration` every `hop` seconds, covering the whole recording."""
    length, size, step = len(mono), round(duration * rate), max(1, round(hop * rate))
    count = 1 + max(0, math.ceil((length - size) / step))
    return [(i * step / rate, mono[i * step:i * step + size]) for i in range(count)]


def predict_file(path: Path, model, hop: float) -> dict:
    return predict_audio(*decode(path, FIX), model, hop, name=str(path))


def predict_audio(mono: np.ndarray, rate: int, model, hop: float, name: str) -> dict:
    """A decoded recording's windows through the model: its mean probabilities and each window's."""
    starts, cuts = zip(*windows(mono, rate, model.duration, hop))
    probabilities = model.predict_windows(list(cuts), rate)
    return {"file": name, "seconds": round(len(mono) / rate, 3),
            "probabilities": probabilities.mean(axis=0),
            "windows": [{"start": round(s, 3), "end": round(s + model.duration, 3), "probabilities": p}
                        for s, p in zip(starts, probabilities)]}


def top(probabilities: np.ndarray, classes: list[str], k: int) -> list[dict]:
    order = np.argsort(-probabilities, kind="stable")[:k]
    return [{"class": classes[i], "probability": round(float(probabilities[i]), 4)} for i in order]


def as_records(results: list[dict], classes: list[str], k: int) -> list[dict]:
    return [{"file": r["file"], "seconds": r["seconds"], "top": top(r["probabilities"], classes, k),
             "windows": [{"start": w["start"], "end": w["end"], "top": top(w["probabilities"], classes, k)}
                         for w in r["windows"]]} for r in results]


def write_table(records: list[dict], out) -> None:
    def cell(entries: list[dict]) -> str:
        return "   ".join(f"{e['class']} {100 * e['probability']:.1f}%" for e in entries)

    width = max(len(r["file"]) for r in records)
    for r in records:
        print(f"{r['file']:<{width}}  {cell(r['top'])}", file=out)
        if len(r["windows"]) > 1:
            for w in r["windows"]:
                print(f"{'':<{width}}    {w['start']:7.2f}-{w['end']:.2f} s  {cell(w['top'])}", file=out)


def write_csv(records: list[dict], out) -> None:
    writer = csv.writer(out)
    writer.writerow(["file", "window", "start_s", "end_s", "rank", "class", "probability"])
    for r in records:
        rows = [("all", 0.0, r["seconds"], r["top"])]
        if len(r["windows"]) > 1:
            rows += [(i, w["start"], w["end"], w["top"]) for i, w in enumerate(r["windows"])]
        for window, start, end, entries in rows:
            for rank, e in enumerate(entries, 1):
                writer.writerow([r["file"], window, start, end, rank, e["class"], e["probability"]])


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--models, --fold and --tracking-uri: which model (serving/sources.py), for predict and serve alike."""
    parser.add_argument("--models", default="models",
                        help="the cross-validation's folder of fold_<k>.ckpt (default: the workspace's models/), an "
                             "exported file (esclab export), an MLflow run (runs:/<id>) or a registered model "
                             "(models:/<name>/<version>, /latest or @<alias>)")
    parser.add_argument("--fold", type=int, help="use this fold's model only (default: all folds, averaged)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI for runs:/ and models:/ (default: "
                                               "$MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="esclab predict", description=__doc__.split("\n")[0])
    parser.add_argument("inputs", nargs="+", help="audio files, folders (searched recursively) or globs")
    add_model_arguments(parser)
    parser.add_argument("-k", "--top-k", type=int, default=2, help="classes shown per file and window (default 2)")
    parser.add_argument("--hop", type=float, help="seconds between windows of a long recording (default: half the "
                                                  "model's clip length)")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print JSON instead of a table")
    output.add_argument("--csv", action="store_true", help="print CSV instead of a table")
    args = parser.parse_args(argv)
    if args.top_k < 1:
        parser.error("--top-k must be at least 1")
    if args.hop is not None and args.hop <= 0:
        parser.error("--hop must be a positive number of seconds")

    model = load_model(args.models, args.fold, args.tracking_uri)
    hop = args.hop or model.duration / 2
    results, failed = [], 0
    for path in audio_inputs(args.inputs):
        try:
            results.append(predict_file(path, model, hop))
        except EsclabError as err:
            print(f"esclab: skipped: {err}", file=sys.stderr)
            failed += 1
    if results:
        records = as_records(results, model.classes, min(args.top_k, len(model.classes)))
        if args.json:
            json.dump(records, sys.stdout, indent=2)
            print()
        elif args.csv:
            write_csv(records, sys.stdout)
        else:
            write_table(records, sys.stdout)
    return 1 if failed else 0
