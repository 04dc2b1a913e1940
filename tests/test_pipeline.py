"""`dvc repro` of download -> split -> features in a temporary git+DVC repo, the archive served over HTTP."""

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import REPO, TINY
from http_server import ArchiveServer

from esclab.data.synthetic import write_archive
from esclab.params import compose

BIN = Path(sys.executable).parent
SMALL_FEATURES = ["features.sample_rate=16000", "features.duration=1.0", "features.n_fft=512",
                  "features.hop_length=128", "features.n_mels=32", "features.num_workers=1"]


def run(repo: Path, *cmd: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)


def git_dvc_repo(path: Path) -> Path:
    """A fresh git+DVC repo holding esclab's pipeline definition and the code its stages depend on."""
    path.mkdir()
    for name in ("dvc.yaml", "conf", "src"):
        source = REPO / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, path / name)
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "config", "core.analytics", "false"],
                ["dvc", "config", "hydra.enabled", "true"]):
        assert run(path, *cmd).returncode == 0
    return path


def write_params(repo: Path, *overrides: str) -> None:
    (repo / "params.yaml").write_text(compose(REPO / "conf", list(overrides)))


@pytest.fixture
def served(tmp_path):
    archive = write_archive(tmp_path / "www" / "synthetic.zip", **TINY)
    with ArchiveServer(archive.parent) as server:
        yield server, archive


def dataset_overrides(server, archive, sha256=None):
    sha256 = sha256 or hashlib.sha256(archive.read_bytes()).hexdigest()
    synthetic = [f"dataset.synthetic.{k}={v}" for k, v in TINY.items()]
    return ["dataset=synthetic", f"dataset.url={server.url('synthetic.zip')}", f"dataset.sha256={sha256}",
            f"dataset.size={archive.stat().st_size}", *synthetic]


def test_repro_resumes_a_cut_transfer_then_reruns_only_what_changed(served, tmp_path):
    server, archive = served
    repo = git_dvc_repo(tmp_path / "repo")
    write_params(repo, *dataset_overrides(server, archive), *SMALL_FEATURES)
    server.drop_after(archive.stat().st_size // 2)

    first = run(repo, "dvc", "repro")
    assert first.returncode == 0, first.stdout + first.stderr
    ranges = [r for r in server.requests if r[1]]
    assert ranges and ranges[0][1] != "bytes=0-", server.requests  # resumed mid-file, not restarted

    table = pd.read_csv(repo / "data/splits/synthetic.csv")
    assert len(table) == 25 and table["fold"].nunique() == 5
    assert len(list((repo / "data/raw/synthetic/audio").glob("*.wav"))) == 25
    features = np.load(repo / "data/features/synthetic/logmel.npy", mmap_mode="r")
    assert features.shape == (25, 32, 126) and features.dtype == np.float16

    again = run(repo, "dvc", "repro")
    assert again.returncode == 0 and "Running stage" not in again.stdout, again.stdout

    write_params(repo, *dataset_overrides(server, archive), *SMALL_FEATURES, "features.n_mels=16")
    changed = run(repo, "dvc", "repro")
    assert changed.returncode == 0, changed.stdout + changed.stderr
    assert "Running stage 'features'" in changed.stdout
    assert "Running stage 'download'" not in changed.stdout and "Running stage 'split'" not in changed.stdout
    assert np.load(repo / "data/features/synthetic/logmel.npy", mmap_mode="r").shape == (25, 16, 126)


def test_repro_refuses_a_checksum_mismatch_and_unpacks_nothing(served, tmp_path):
    server, archive = served
    repo = git_dvc_repo(tmp_path / "repo")
    wrong = "0" * 64
    write_params(repo, *dataset_overrides(server, archive, sha256=wrong), *SMALL_FEATURES)
    result = run(repo, "dvc", "repro")
    actual = hashlib.sha256(archive.read_bytes()).hexdigest()
    assert result.returncode != 0
    assert wrong in result.stderr and actual in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not (repo / "data/raw/synthetic").exists()
