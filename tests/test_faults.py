"""Faults (issue 5): `kill -9` at any moment leaves the old complete output or none; training resumes.

Each stage runs as a real subprocess in its own process group and is killed with
SIGKILL, workers included, as soon as its hidden temporary output exists, i.e.
mid-write. The rerun must then finish with complete, correct outputs.
"""

import filecmp
import logging
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from conftest import REPO, TINY_FEATURES, compose_config, kill_when, tiny_overrides

from esclab.data.synthetic import write_archive
from esclab.training.run import train

ESCLAB = str(Path(sys.executable).parent / "esclab")


def kill_mid_write(args: list[str], cwd: Path, temporaries: str) -> None:
    """Kill `args` while a path matching the glob `temporaries` (its hidden output in progress) exists."""
    kill_when(args, cwd, lambda: bool(list(cwd.glob(temporaries))))


def replaced(path: Path) -> Callable[[], bool]:
    """True once `path` has been written a second time (its first version seen, then another)."""
    seen: set[int] = set()

    def check() -> bool:
        try:
            seen.add(path.stat().st_mtime_ns)
        except FileNotFoundError:
            return False
        return len(seen) > 1

    return check


def same_tree(a: Path, b: Path) -> bool:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    return files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file()) and all(
        filecmp.cmp(a / f, b / f, shallow=False) for f in files)


def test_kill9_during_unpack_leaves_no_dataset_and_the_rerun_completes(tmp_path):
    archive = write_archive(tmp_path / "synthetic.zip", n_classes=10, clips_per_class=20, duration=5.0,
                            sample_rate=44100)
    stage = [ESCLAB, "download", "dataset=synthetic", f"dataset.archive={archive}", f"paths.raw={tmp_path / 'raw'}",
             f"paths.downloads={tmp_path / 'downloads'}"]
    kill_mid_write(stage, tmp_path, ".raw.*")
    assert not (tmp_path / "raw").exists()

    assert subprocess.run(stage, cwd=tmp_path, capture_output=True).returncode == 0
    assert len(list((tmp_path / "raw/audio").glob("*.wav"))) == 200
    assert (tmp_path / "raw/meta/esc50.csv").is_file()
    assert not list(tmp_path.glob(".raw.*"))  # the killed run's temporary is gone


def test_kill9_during_features_keeps_the_old_cache_and_the_rerun_rebuilds_it(tiny_data, tmp_path):
    cache = Path(shutil.copytree(tiny_data["features"], tmp_path / "features"))
    settings = [f"features.{k}={v}" for k, v in TINY_FEATURES.items() if k != "n_mels"]
    stage = [ESCLAB, "features", "dataset=synthetic", *settings, "features.num_workers=2",
             f"paths.split={tiny_data['split']}", f"paths.features={cache}"]
    kill_mid_write([*stage, "features.n_mels=16"], tmp_path, ".features.*")
    assert same_tree(cache, tiny_data["features"])  # the old complete cache, untouched

    rebuilt = subprocess.run([*stage, f"features.n_mels={TINY_FEATURES['n_mels']}"], cwd=tmp_path,
                             capture_output=True, text=True)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert same_tree(cache, tiny_data["features"])  # same settings, same bytes
    assert not list(tmp_path.glob(".features.*"))


def test_kill9_during_training_resumes_the_fold_and_matches_an_uninterrupted_run(tiny_data, tmp_path, caplog):
    extra = ["fold=1", "trainer.max_epochs=6", "tracking.log_model=false"]
    train(compose_config(*tiny_overrides(tiny_data, tmp_path / "whole", *extra)))

    killed = tmp_path / "killed"
    overrides = tiny_overrides(tiny_data, killed, *extra)
    last = killed / "models/.fold_1/checkpoints/last.ckpt"
    kill_when([sys.executable, str(REPO / "train.py"), *overrides], tmp_path, replaced(last))
    assert not (killed / "models/fold_1.ckpt").exists()

    with caplog.at_level(logging.INFO, logger="esclab.training.run"):
        train(compose_config(*overrides))
    assert "resuming from" in caplog.text
    for name in ("predictions.csv", "history.csv"):
        whole, resumed = (tmp_path / run / "reports/folds/1" / name for run in ("whole", "killed"))
        assert resumed.read_bytes() == whole.read_bytes(), name
    assert not (killed / "models/.fold_1").exists()


def test_finished_fold_is_not_retrained_and_a_changed_config_is(tiny_data, tmp_path, caplog):
    overrides = tiny_overrides(tiny_data, tmp_path, "fold=1", "trainer.max_epochs=1", "tracking.log_model=false")
    train(compose_config(*overrides))
    checkpoint = tmp_path / "models/fold_1.ckpt"
    written = checkpoint.stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="esclab.training.run"):
        train(compose_config(*overrides))
    assert "already trained" in caplog.text and checkpoint.stat().st_mtime_ns == written

    train(compose_config(*overrides, "lr=3e-4"))
    assert checkpoint.stat().st_mtime_ns != written
