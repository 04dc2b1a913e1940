"""What every benchmark ends with: the result as a table on stdout and as JSON on disk."""

import json
from pathlib import Path

import pandas as pd


def report(result: dict, out: Path) -> None:
    print(pd.Series(result).to_string())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
