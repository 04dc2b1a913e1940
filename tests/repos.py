"""Temporary git+DVC repos holding esclab's pipeline, and running commands in them as a user would."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO

from esclab.params import compose

BIN = Path(sys.executable).parent
SMALL_FEATURES = ["features.sample_rate=16000", "features.duration=1.0", "features.n_fft=512",
                  "features.hop_length=128", "features.n_mels=32", "features.num_workers=1"]


def run(repo: Path, *cmd: str) -> subprocess.CompletedProcess:
    # The stages log to the repo's own sqlite:///mlflow.db, whatever an earlier in-process run exported.
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PATH"] = f"{BIN}{os.pathsep}{os.environ['PATH']}"
    return subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)


def git_dvc_repo(path: Path) -> Path:
    """A fresh git+DVC repo holding esclab's pipeline definition and the code its stages depend on."""
    path.mkdir()
    for name in ("dvc.yaml", "conf", "src", "train.py", ".gitignore", "README.md", "reports/results", "reports/bench",
                 "requirements.lock", "requirements-nodeps.lock"):
        source = REPO / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, path / name)
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "config", "core.analytics", "false"],
                ["dvc", "config", "hydra.enabled", "true"]):
        assert run(path, *cmd).returncode == 0
    return path


def stages_run(result: subprocess.CompletedProcess) -> set[str]:
    return {line.split("'")[1] for line in result.stdout.splitlines() if line.startswith("Running stage")}


def delete_fold(repo: Path, fold: int) -> None:
    (repo / f"models/fold_{fold}.ckpt").unlink()
    shutil.rmtree(repo / f"reports/folds/{fold}")


def write_params(repo: Path, *overrides: str) -> None:
    (repo / "params.yaml").write_text(compose(repo / "conf", list(overrides)))
