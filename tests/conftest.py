"""Shared fixtures: small real datasets written to disk by the tests themselves."""

import shutil
from pathlib import Path

import pytest

from esclab.data.synthetic import write_tree

REPO = Path(__file__).resolve().parents[1]
# Small enough to be quick, shaped like ESC-50: every class in every fold.
TINY = dict(n_classes=5, clips_per_class=5, duration=1.0, sample_rate=16000, seed=0)


@pytest.fixture(scope="session")
def tiny_tree(tmp_path_factory) -> Path:
    """A synthetic ESC-50-master/ folder (audio/ + meta/); copy it before changing it."""
    return write_tree(tmp_path_factory.mktemp("tiny"), **TINY)


@pytest.fixture
def raw(tiny_tree, tmp_path) -> Path:
    """A private copy of the tiny dataset that a test may break."""
    return Path(shutil.copytree(tiny_tree, tmp_path / "raw"))
