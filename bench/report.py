"""What every benchmark shares: its --out (and --threads) options, an ESC-50-shaped synthetic dataset for
the stage benchmarks, how repeated measurements are summed up, and its ending, the result as a table on stdout
and as JSON on disk."""

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

# A paired ratio whose interquartile range is wider than this fraction of its median says nothing either way.
SPREAD_LIMIT = 0.2
MIN_ROUNDS = 3  # fewer paired rounds give no spread to judge


def parse_args(parser: argparse.ArgumentParser, name: str, *, threads: bool = True) -> argparse.Namespace:
    """Add --out (reports/bench/<name>.json) and, for benchmarks that train, --threads; parse; apply --threads."""
    if threads:
        parser.add_argument("--threads", type=int, default=None,
                            help="CPU threads for torch; default: torch's. 1 steadies the numbers on a shared machine")
    parser.add_argument("--out", type=Path, default=Path(f"reports/bench/{name}.json"))
    args = parser.parse_args()
    if threads and args.threads:
        import torch

        torch.set_num_threads(args.threads)
    return args


def synthetic_split(folder: Path, clips_per_class: int, warm_clips: int) -> tuple[Path, Path, pd.DataFrame]:
    """50 classes of synthetic 5-s clips at 44.1 kHz in `folder`, split as the pipeline splits them: the split
    table's path, the path of a table of its first `warm_clips` clips (for warming up), and the table."""
    from esclab.data.split import write_split
    from esclab.data.synthetic import write_tree

    raw = write_tree(folder, n_classes=50, clips_per_class=clips_per_class)
    split, warm = folder / "split.csv", folder / "warm.csv"
    table = write_split(raw, split, n_classes=50, n_folds=5, esc10_only=False)
    table.head(warm_clips).to_csv(warm, index=False)
    return split, warm, table


def spread(values) -> dict:
    """The median of repeated measurements and their interquartile range, [25th, 75th percentile]."""
    p25, median, p75 = np.percentile(np.asarray(values, dtype=float), [25, 50, 75])
    return {"median": round(float(median), 3), "iqr": [round(float(p25), 3), round(float(p75), 3)]}


def paired_ratio(numerators, denominators, limit: float = SPREAD_LIMIT) -> dict:
    """Ratios of measurements taken in the same rounds (a_i / b_i), summed up as `spread` does, with a verdict.

    The verdict is "inconclusive" when there are fewer than MIN_ROUNDS pairs, when
    the ratios' interquartile range contains 1.0 (some rounds say A is faster,
    some B) or when it is wider than `limit` times the median; otherwise ">1" or
    "<1", the side of 1.0 the whole range lies on.
    """
    ratios = np.asarray(numerators, dtype=float) / np.asarray(denominators, dtype=float)
    summary = spread(ratios)
    (low, high), median = summary["iqr"], summary["median"]
    conclusive = len(ratios) >= MIN_ROUNDS and not low <= 1.0 <= high and high - low <= limit * median
    return summary | {"verdict": (">1" if low > 1.0 else "<1") if conclusive else "inconclusive"}


def provenance() -> dict:
    """What made a result: the command as typed, the machine, the commit and whether the code differed from it,
    the code identity (esclab/identity.py) and the day. README's Benchmarks table shows these beside each figure."""
    from esclab.identity import code_sha256, git_state
    from esclab.tracking import hardware

    state = git_state()
    return {"command": shlex.join(["python", *sys.argv]), "machine": hardware(), "commit": state["git.commit"],
            "dirty": state["git.dirty"], "code_sha256": code_sha256(), "date": time.strftime("%Y-%m-%d")}


def iqr(summary: dict) -> str:
    """`spread`'s or `paired_ratio`'s summary as `median [p25–p75]`, with the verdict where there is one."""
    low, high = summary["iqr"]
    return f"{summary['median']:g} [{low:g}–{high:g}]" + (f" `{summary['verdict']}`" if "verdict" in summary else "")


def report(result: dict, out: Path, *, title: str, headline: str) -> None:
    """Print the scalars as one column and each list of rows (dicts) as a table of its own; write it all as JSON,
    with its `title` and `headline` (the row README's Benchmarks table shows, `make results`) and its provenance."""
    result = {"title": title, "headline": headline} | result | {"provenance": provenance()}
    tables = {key: value for key, value in result.items() if isinstance(value, list) and value
              and all(isinstance(row, dict) for row in value)}
    print(pd.Series({key: value for key, value in result.items() if key not in tables}).to_string())
    for key, rows in tables.items():
        print(f"\n{key}:\n{pd.DataFrame(rows).to_string(index=False)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
