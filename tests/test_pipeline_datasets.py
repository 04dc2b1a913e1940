"""The real `dvc repro` on the other datasets' layouts: a folder per class (grouped folds, then the holdout split),
pushed to a WebDAV remote and pulled into a fresh clone; and UrbanSound8K served over HTTP with its ten folds.
In a file of their own, so that pytest's workers run them beside the demo's pipeline (test_pipeline.py)."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import WEBDAV_USER
from http_server import ArchiveServer
from repos import SMALL_FEATURES, git_dvc_repo, run, stages_run, write_params

from esclab.data.synthetic import URBANSOUND_CLASSES, write_urbansound_archive

FOLDER_SMALL = [*SMALL_FEATURES, "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "train.batch_size=8",
                "lr=1e-3", "tracking.log_model=false"]


@pytest.fixture(scope="module")
def folder_repro(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """dataset=synthetic_folder's grouped 3 folds through the real `dvc repro` in a temp repo, run once for the two
    tests below, in their order: the first pushes the run to a remote as it is, the second then moves the repo on to
    the holdout split. The repo and the run."""
    repo = git_dvc_repo(tmp_path_factory.mktemp("folder_repro") / "repo")
    write_params(repo, "dataset=synthetic_folder", "dataset.n_folds=3", *FOLDER_SMALL)
    return repo, run(repo, "dvc", "repro")


def output_digests(repo: Path) -> dict[str, str]:
    """The md5 of every file of every output of the stages that dvc.yaml defines now (the metrics too), by path in
    the repo: what `dvc pull` fetches. Not dvc.lock's list, which keeps the foreach items that are gone."""
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc:
        outs = [repo / out.def_path for out in dvc.index.outs]
    files = [file for out in outs for file in ([out] if out.is_file() else sorted(out.rglob("*"))) if file.is_file()]
    return {str(file.relative_to(repo)): hashlib.md5(file.read_bytes()).hexdigest() for file in files}


@pytest.mark.slow
def test_a_fresh_clone_pulls_every_output_from_a_webdav_remote_and_recomputes_nothing(folder_repro, webdav_server,
                                                                                       tmp_path):
    """`dvc push` of a pipeline's outputs to a real WebDAV server, its credentials kept out of git (`--local`); then
    a `git clone`: `dvc pull` refused without the credentials, and with them every stage output arrives byte for byte
    (raw data, split, features, checkpoints, reports) and `dvc repro` finds nothing to run."""
    repo, first = folder_repro
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert yaml.safe_load((repo / "params.yaml").read_text())["dataset"]["folds"] == [1, 2, 3], (
        "this test pushes the 3-fold run, so it runs before the next test moves the repo on to the holdout split")
    user, password = WEBDAV_USER
    credentials = [("dvc", "remote", "modify", "--local", "storage", "user", user),
                   ("dvc", "remote", "modify", "--local", "storage", "password", password)]
    for cmd in [("dvc", "remote", "add", "-d", "storage", webdav_server), *credentials, ("git", "add", "-A"),
                ("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "pipeline"), ("dvc", "push")]:
        done = run(repo, *cmd)
        assert done.returncode == 0, (cmd, done.stdout[-3000:] + done.stderr[-3000:])

    clone = tmp_path / "clone"
    assert run(tmp_path, "git", "clone", "-q", str(repo), str(clone)).returncode == 0
    refused = run(clone, "dvc", "pull")  # the server answers 401, which DVC may report as files missing on the remote
    assert refused.returncode != 0 and not (clone / "models/fold_1.ckpt").exists(), refused.stdout + refused.stderr
    for cmd in credentials:
        assert run(clone, *cmd).returncode == 0
    pulled = run(clone, "dvc", "pull")
    assert pulled.returncode == 0, pulled.stdout[-3000:] + pulled.stderr[-3000:]
    outputs = output_digests(repo)
    assert {"data/features/synthetic_folder/logmel.npy", *(f"models/fold_{k}.ckpt" for k in (1, 2, 3)),
            "reports/metrics.json"} <= set(outputs)
    assert output_digests(clone) == outputs
    again = run(clone, "dvc", "repro")
    assert again.returncode == 0 and stages_run(again) == set(), again.stdout + again.stderr


@pytest.mark.slow
def test_repro_on_a_folder_per_class_with_grouped_folds_then_train_py(folder_repro, tmp_path):
    """dataset=synthetic_folder through the real `dvc repro`: the tree generated and copied, grouped 3-fold split (a
    fold count other than ESC-50's five, so three train stages), features of files of every length, rate and format,
    pooled metrics; then the holdout split through `dvc repro` and `python train.py`."""
    repo, first = folder_repro
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert stages_run(first) == {"download", "split", "features", "train@1", "train@2", "train@3", "evaluate"}
    table = pd.read_csv(repo / "data/splits/synthetic_folder.csv")
    assert len(table) == 78 and sorted(table["fold"].unique()) == [1, 2, 3]
    assert table.groupby("src_file")["fold"].nunique().max() == 1, "a source recording spans two folds"
    metrics = json.loads((repo / "reports/metrics.json").read_text())
    assert sorted(metrics["fold_accuracy"]) == ["1", "2", "3"] and 0 <= metrics["accuracy_mean"] <= 1
    per_class = pd.read_csv(repo / "reports/per_class.csv")
    assert list(per_class["class"]) == ["crying", "normal", "screaming"]  # class names from the folder names
    predictions = pd.concat(pd.read_csv(repo / f"reports/folds/{k}/predictions.csv") for k in (1, 2, 3))
    assert sorted(predictions["filename"]) == sorted(table["filename"])  # every file tested once, in its own fold

    again = run(repo, "dvc", "repro")
    assert again.returncode == 0 and "Running stage" not in again.stdout, again.stdout

    # The seeds' 70/15/15 holdout: one test part, so one train stage, validated on the validation part.
    holdout = ["dataset=synthetic_folder", "dataset.folder.split=holdout", *FOLDER_SMALL]
    write_params(repo, *holdout)
    split = run(repo, "dvc", "repro")
    assert split.returncode == 0, split.stdout[-3000:] + split.stderr[-3000:]
    assert stages_run(split) == {"split", "features", "train@1", "evaluate"}
    parts = pd.read_csv(repo / "data/splits/synthetic_folder.csv")
    assert sorted(parts["fold"].unique()) == [1, 2, 3] and parts.groupby("src_file")["fold"].nunique().max() == 1
    metrics = json.loads((repo / "reports/metrics.json").read_text())
    assert list(metrics["fold_accuracy"]) == ["1"] and metrics["n_clips"] == (parts["fold"] == 1).sum()
    assert 0 <= metrics["balanced_accuracy"] <= 1
    out = tmp_path / "holdout"
    adhoc = run(repo, sys.executable, "train.py", *holdout, f"paths.models={out / 'models'}",
                f"paths.reports={out / 'reports'}")
    assert adhoc.returncode == 0, adhoc.stdout[-3000:] + adhoc.stderr[-3000:]
    assert json.loads((out / "reports/metrics.json").read_text())["n_clips"] == metrics["n_clips"]
    assert not (out / "reports/folds/2").exists()  # the validation part is never a test fold


@pytest.mark.slow
def test_repro_on_urbansound8k_over_http_with_its_ten_folds_then_train_py_pools_them(tmp_path):
    """dataset=synthetic_urbansound8k's tar.gz served over HTTP, pinned, through the real `dvc repro`: unpacked,
    split by its own 10 folds (10 train stages), every slice predicted once in its fold; then `python train.py`
    over all folds finds each finished by its run key and pools them onto one MLflow parent of 10 fold runs."""
    settings = {"slices_per_fold": 1, "duration": [0.5, 1.0], "seed": 0}  # 100 slices
    archive = write_urbansound_archive(tmp_path / "www" / "UrbanSound8K.tar.gz", **settings)
    repo = git_dvc_repo(tmp_path / "repo")
    small = [*SMALL_FEATURES, "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "train.batch_size=16",
             "lr=1e-3", "tracking.log_model=false", "model.channels=[8,8,8,8]", "model.fc_dim=16"]
    with ArchiveServer(archive.parent) as server:
        overrides = ["dataset=synthetic_urbansound8k", f"dataset.url={server.url(archive.name)}",
                     f"dataset.sha256={hashlib.sha256(archive.read_bytes()).hexdigest()}",
                     f"dataset.size={archive.stat().st_size}", "dataset.synthetic.slices_per_fold=1",
                     "dataset.synthetic.duration=[0.5,1.0]", *small]
        write_params(repo, *overrides)
        first = run(repo, "dvc", "repro")
        assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
        assert server.requests == [(f"/{archive.name}", None)]
    folds = range(1, 11)
    assert stages_run(first) == {"download", "split", "features", *(f"train@{k}" for k in folds), "evaluate"}
    table = pd.read_csv(repo / "data/splits/synthetic_urbansound8k.csv")
    assert len(table) == 100 and sorted(table["fold"].unique()) == list(folds)
    assert (table.groupby("src_file")["fold"].nunique() == 1).all()
    metrics = json.loads((repo / "reports/metrics.json").read_text())
    assert sorted(metrics["fold_accuracy"], key=int) == [str(k) for k in folds]
    per_class = pd.read_csv(repo / "reports/per_class.csv")
    assert list(per_class["class"]) == list(URBANSOUND_CLASSES)
    predictions = pd.concat(pd.read_csv(repo / f"reports/folds/{k}/predictions.csv") for k in folds)
    assert sorted(predictions["filename"]) == sorted(table["filename"])  # every slice tested once, in its own fold

    pooled = run(repo, sys.executable, "train.py", *overrides, "fold=null")
    assert pooled.returncode == 0, pooled.stdout[-3000:] + pooled.stderr[-3000:]
    assert (pooled.stdout + pooled.stderr).count("already trained by this code, config, data and weights") == 10

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("esclab").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and len(runs) == 11, [r.data.tags.get("esclab.fold") for r in runs]
    children = [r for r in runs if r is not parents[0]]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert sorted(int(c.data.tags["esclab.fold"]) for c in children) == list(folds)
    assert parents[0].data.metrics["accuracy_mean"] == pytest.approx(metrics["accuracy_mean"])
