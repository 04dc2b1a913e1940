"""What every benchmark ends with: the result as a table on stdout and as JSON on disk."""

import json
from pathlib import Path

import pandas as pd


def report(result: dict, out: Path) -> None:
    """Print the scalars as one column and each list of rows (dicts) as a table of its own; write it all as JSON."""
    tables = {key: value for key, value in result.items() if isinstance(value, list) and value
              and all(isinstance(row, dict) for row in value)}
    print(pd.Series({key: value for key, value in result.items() if key not in tables}).to_string())
    for key, rows in tables.items():
        print(f"\n{key}:\n{pd.DataFrame(rows).to_string(index=False)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
