"""Write params.yaml: conf/ composed, as `dvc repro` reads it.

It uses DVC's own Hydra composition (the one `dvc exp run` uses), so the file is
byte-for-byte what DVC would write. Overrides, as `make demo` passes, are
recorded in the first line, so the equality test can recompose the same file.

    python -m esclab.params [override ...]      # e.g. dataset=synthetic
"""

import sys
import tempfile
from pathlib import Path

from dvc.utils.hydra import compose_and_dump

HEADER = "# composed from conf/ by `python -m esclab.params`; overrides:"


def compose(conf_dir: Path, overrides: list[str]) -> str:
    """Return params.yaml's text for conf_dir composed with `overrides`."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "params.yaml"
        compose_and_dump(out, str(conf_dir.resolve()), None, "config", tmp, overrides)
        return f"{HEADER} {' '.join(overrides)}".rstrip() + "\n" + out.read_text()


def recorded_overrides(params_text: str) -> list[str]:
    """The overrides params.yaml was composed with (none if DVC wrote it)."""
    first = params_text.split("\n", 1)[0]
    return first[len(HEADER):].split() if first.startswith(HEADER) else []


def main() -> None:
    Path("params.yaml").write_text(compose(Path("conf"), sys.argv[1:]))


if __name__ == "__main__":
    main()
