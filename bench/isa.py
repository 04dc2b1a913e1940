"""How far a result moves when only the CPU's instruction set changes: the same recipe, data and seed, once with
torch's own choice of kernels and once with them held to an older set, on the same processor.

A result agrees to the last bit only on the same instruction set (and thread count): the feature cache's float16
values, and from them a few answers, move between processors. Each run is the real pipeline (`esclab download`,
`split`, `features`, then `python train.py`) in processes of its own with ATEN_CPU_CAPABILITY and
ONEDNN_MAX_CPU_ISA set, so torch and oneDNN use the named set; one thread each, as the tests and the demo's record.

    python bench/isa.py                          # the demo's recipe (experiment=demo), default vs AVX2
    python bench/isa.py --capabilities default,avx2,default experiment=folder_demo
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from report import parse_args, report

ROOT = Path(__file__).resolve().parents[1]
ONEDNN = {"avx2": "AVX2", "avx512": "AVX512_CORE", "default": None}


def run(recipe: list[str], capability: str, out: Path) -> dict:
    """The recipe's whole cross-validation under `capability`, written under `out`: its pooled metrics, its test
    predictions and its feature cache."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "ATEN_CPU_CAPABILITY",
                                                                "ONEDNN_MAX_CPU_ISA")} | {"OMP_NUM_THREADS": "1"}
    if capability != "default":
        env |= {"ATEN_CPU_CAPABILITY": capability, "ONEDNN_MAX_CPU_ISA": ONEDNN[capability]}
    paths = [f"paths.{name}={out / name}" for name in ("downloads", "raw", "features", "models", "reports")]
    overrides = [*recipe, *paths, f"paths.split={out / 'split.csv'}", f"tracking.uri=sqlite:///{out / 'mlflow.db'}",
                 "tracking.register_as=null", "trainer.enable_progress_bar=false", "features.num_workers=0"]
    for command in ([sys.executable, "-m", "esclab", "download"], [sys.executable, "-m", "esclab", "split"],
                    [sys.executable, "-m", "esclab", "features"], [sys.executable, str(ROOT / "train.py")]):
        subprocess.run([*command, *overrides], cwd=out, env=env, check=True, capture_output=True)
    metrics = json.loads((out / "reports" / "metrics.json").read_text())
    predictions = pd.concat(pd.read_csv(p) for p in sorted((out / "reports" / "folds").glob("*/predictions.csv")))
    array = next(p for p in (out / "features").glob("*.npy"))
    return {"metrics": metrics, "predictions": predictions.set_index("filename")["pred"], "array": np.load(array)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("recipe", nargs="*", default=["experiment=demo"], help="Hydra overrides (default: the demo)")
    parser.add_argument("--capabilities", default="default,avx2",
                        help=f"comma-separated, the first the reference, of: {', '.join(ONEDNN)}")
    args = parse_args(parser, "isa", threads=False)
    names = args.capabilities.split(",")
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(names):
            out = Path(tmp) / f"{i}_{name}"
            out.mkdir()
            runs[f"{i}_{name}"] = run(args.recipe, name, out)
    reference_key, reference = next(iter(runs.items()))
    rows = []
    for key, result in runs.items():
        same_shape = result["array"].shape == reference["array"].shape
        differing = int(np.sum(result["array"] != reference["array"])) if same_shape else None
        rows.append({"capability": key.split("_", 1)[1], "accuracy_mean": result["metrics"]["accuracy_mean"],
                     "fold_accuracy": result["metrics"]["fold_accuracy"],
                     "answers_changed": int((result["predictions"] != reference["predictions"]).sum()),
                     "cache_values_changed": differing, "cache_values": int(reference["array"].size)})
    result = {"recipe": args.recipe, "threads": 1, "reference": reference_key.split("_", 1)[1], "runs": rows}
    report(result, args.out, title=f"the same pipeline ({' '.join(args.recipe)}) under other CPU instruction sets "
           "on one processor, one thread", headline="; ".join(
               f"{r['capability']}: {100 * r['accuracy_mean']:.2f} %, {r['answers_changed']} of "
               f"{len(reference['predictions'])} answers and {r['cache_values_changed']} of {r['cache_values']} "
               f"cache values differ from the first" for r in rows))


if __name__ == "__main__":
    main()
