"""Shared fixtures: small real datasets written to disk by the tests themselves."""

import os
import shutil
from pathlib import Path

import pytest

from esclab.data.synthetic import write_tree

REPO = Path(__file__).resolve().parents[1]


ORIGINAL_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI")


@pytest.fixture(autouse=True)
def tracking_uri_stays_in_its_test():
    """mlflow.set_tracking_uri also exports $MLFLOW_TRACKING_URI, which a later test's subprocesses
    (`dvc repro` in test_pipeline.py) would inherit and log into another test's store. Restored to
    what pytest started with, since module fixtures that train set it before a test begins."""
    yield
    if ORIGINAL_TRACKING_URI is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = ORIGINAL_TRACKING_URI


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

# The tiny dataset's features: 32 mel bands x 126 frames keep cnn4 quick on a CPU.
TINY_FEATURES = dict(sample_rate=16000, duration=1.0, n_fft=512, hop_length=128, n_mels=32)


def split_and_features(tree: Path, root: Path, n_folds: int = 5) -> dict[str, Path]:
    """A tiny dataset's tree taken through split and features into `root`: the paths.* a training run reads."""
    from esclab.data.features import LogMelSettings, write_features
    from esclab.data.split import write_split

    split = root / "split.csv"
    write_split(tree, split, n_classes=TINY["n_classes"], n_folds=n_folds, esc10_only=False)
    features = write_features(split, root / "features", LogMelSettings(**TINY_FEATURES), device="cpu", num_workers=0)
    return {"raw": tree, "split": split, "features": features}


@pytest.fixture(scope="session")
def tiny_data(tiny_tree, tmp_path_factory) -> dict[str, Path]:
    """The tiny dataset taken through split and features."""
    return split_and_features(tiny_tree, tmp_path_factory.mktemp("tiny_data"))


def compose_config(*overrides: str):
    """conf/ composed as `python train.py` would, with overrides."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def tiny_overrides(data: dict[str, Path], out: Path, *extra: str) -> list[str]:
    """Overrides that point a run at the tiny data, write under `out` and train briefly."""
    features = [f"features.{k}={v}" for k, v in TINY_FEATURES.items()]
    paths = [f"paths.{k}={v}" for k, v in data.items()] + [f"paths.models={out / 'models'}",
                                                           f"paths.reports={out / 'reports'}"]
    return ["dataset=synthetic", f"dataset.synthetic.n_classes={TINY['n_classes']}", *features, *paths,
            "trainer.max_epochs=2", "trainer.enable_progress_bar=false", "train.batch_size=8", "lr=1e-3",
            f"tracking.uri=sqlite:///{out / 'mlflow.db'}", *extra]
