"""Real `dvc repro` and `dvc exp run` in temporary git+DVC repos: data stages over HTTP, then the whole pipeline."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import REPO, TINY, TINY_FEATURES, WEBDAV_USER, printed_warnings
from http_server import ArchiveServer

from esclab.data.synthetic import URBANSOUND_CLASSES, write_archive, write_urbansound_archive
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
    for name in ("dvc.yaml", "conf", "src", "train.py", ".gitignore", "README.md", "reports/results"):
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


def test_data_stages_resume_a_cut_transfer_then_rerun_only_what_changed(served, tmp_path):
    server, archive = served
    repo = git_dvc_repo(tmp_path / "repo")
    write_params(repo, *dataset_overrides(server, archive), *SMALL_FEATURES)
    server.drop_after(archive.stat().st_size // 2)

    first = run(repo, "dvc", "repro", "features")
    assert first.returncode == 0, first.stdout + first.stderr
    ranges = [r for r in server.requests if r[1]]
    assert ranges and ranges[0][1] != "bytes=0-", server.requests  # resumed mid-file, not restarted

    table = pd.read_csv(repo / "data/splits/synthetic.csv")
    assert len(table) == 25 and table["fold"].nunique() == 5
    assert len(list((repo / "data/raw/synthetic/audio").glob("*.wav"))) == 25
    features = np.load(repo / "data/features/synthetic/logmel.npy", mmap_mode="r")
    assert features.shape == (25, 32, 126) and features.dtype == np.float16

    again = run(repo, "dvc", "repro", "features")
    assert again.returncode == 0 and "Running stage" not in again.stdout, again.stdout

    write_params(repo, *dataset_overrides(server, archive), *SMALL_FEATURES, "features.n_mels=16")
    changed = run(repo, "dvc", "repro", "features")
    assert changed.returncode == 0, changed.stdout + changed.stderr
    assert stages_run(changed) == {"features"}, changed.stdout
    assert np.load(repo / "data/features/synthetic/logmel.npy", mmap_mode="r").shape == (25, 16, 126)


def test_repro_refuses_a_checksum_mismatch_and_unpacks_nothing(served, tmp_path):
    server, archive = served
    repo = git_dvc_repo(tmp_path / "repo")
    wrong = "0" * 64
    write_params(repo, *dataset_overrides(server, archive, sha256=wrong), *SMALL_FEATURES)
    result = run(repo, "dvc", "repro", "features")
    actual = hashlib.sha256(archive.read_bytes()).hexdigest()
    assert result.returncode != 0
    assert wrong in result.stderr and actual in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not (repo / "data/raw/synthetic").exists()


# The strong recipe at tiny sizes, inside the repo's conf/, so that `dvc exp run -S experiment=tiny_strong`
# (which recomposes conf/) runs what `-S experiment=cnn4_strong` would, made small.
TINY_STRONG = {
    "defaults": ["cnn4_strong", {"override /dataset": "synthetic"}],
    "dataset": {"synthetic": {k: v for k, v in TINY.items() if k != "seed"}},
    "features": {**TINY_FEATURES, "num_workers": 1},
    "trainer": {"max_epochs": 1, "enable_progress_bar": False},
    "train": {"batch_size": 8},
    "lr": 1e-3,
    "tracking": {"log_model": False},  # model logging has its own test (test_tracking.py); it costs ~10 s a fold
}
# Seed 001's system (frozen real YAMNet, a feed-forward head) at the same tiny sizes.
TINY_YAMNET = {**TINY_STRONG, "defaults": ["yamnet_ffn", {"override /dataset": "synthetic"}],
               "features": {"duration": 1.0}, "lr": 5e-4}


@pytest.mark.slow
def test_demo_reproduces_readme_then_nothing_to_do_a_restored_fold_and_experiments(tmp_path):
    """`make demo`'s pipeline from clean gives README's Results row to the byte; then DVC's caching, and
    `dvc exp run`s of the strong recipe and of frozen YAMNet with a head, at tiny sizes (aiSFX's cache and heads
    run through train.py in test_embeddings.py)."""
    repo = git_dvc_repo(tmp_path / "repo")
    for name, recipe in (("tiny_strong", TINY_STRONG), ("tiny_yamnet", TINY_YAMNET)):
        (repo / f"conf/experiment/{name}.yaml").write_text("# @package _global_\n" + yaml.safe_dump(recipe))
    write_params(repo, "experiment=demo")

    first = run(repo, "dvc", "repro")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert printed_warnings(first.stdout + first.stderr) == []  # a quiet log: every library warning is fixed or understood (esclab/logs.py)
    metrics = json.loads((repo / "reports/metrics.json").read_text())
    assert {"accuracy_mean", "accuracy_std", "fold_accuracy", "macro_f1", "macro_roc_auc", "top5_accuracy"} <= set(metrics)
    assert len(metrics["fold_accuracy"]) == 5
    assert (repo / "reports/per_class.csv").exists() and (repo / "reports/plots/confusion.png").exists()
    for k in range(1, 6):
        assert (repo / f"models/fold_{k}.ckpt").exists() and (repo / f"reports/folds/{k}/predictions.csv").exists()

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("esclab").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and len(runs) == 6
    parent, children = parents[0], [r for r in runs if r is not parents[0]]
    assert parent.data.metrics["accuracy_mean"] == pytest.approx(metrics["accuracy_mean"])
    # Five separate train stages and an evaluate stage: the parent spans them all, and ends with evaluate.
    assert parent.info.status == "FINISHED" and {c.info.status for c in children} == {"FINISHED"}
    assert parent.info.start_time <= min(c.info.start_time for c in children)
    assert parent.info.end_time >= max(c.info.end_time for c in children)
    lock = (repo / "dvc.lock").read_text()
    for child in children:
        for name in ("raw", "split", "features"):
            assert child.data.tags[f"data.{name}.md5"] in lock

    record = json.loads((REPO / "reports/results/01-demo.json").read_text())
    results = run(repo, "esclab", "results", "--config-dir", ".", "--config-name", "params")
    assert results.returncode == 0, results.stdout[-3000:] + results.stderr[-3000:]
    for name in ["README.md", *(p.relative_to(REPO) for p in (REPO / "reports/results").glob("*.json"))]:
        assert (repo / name).read_text() == (REPO / name).read_text(), (
            f"{name}: the demo no longer gives README's Results: run `make demo && make results` and commit both")
    locked = yaml.safe_load(lock)["stages"]
    assert [locked[stage]["outs"][0]["md5"] for stage in ("download", "split")] == [record["data"]["raw"],
                                                                                  record["data"]["split"]]
    if parent.data.tags["esclab.hardware"] != record["machine"]:
        # Another processor: the record is kept (the check above), and this run is compared with it. Its
        # kernels differ in the last bits, so a clip or two of a fold may flip, never more.
        assert "kept reports/results/01-demo.json" in results.stdout, results.stdout
        assert abs(metrics["accuracy_mean"] - record["metrics"]["accuracy_mean"]) <= 0.05, metrics
        for fold, accuracy in record["metrics"]["fold_accuracy"].items():
            assert abs(metrics["fold_accuracy"][fold] - accuracy) <= 0.1, (fold, metrics)

    evaluation = repo / "src/esclab/evaluation/plots.py"  # a changed dependency: reports/ is now stale
    evaluation.write_text(evaluation.read_text() + "\n# changed\n")
    stale = run(repo, "esclab", "results", "--config-dir", ".", "--config-name", "params")
    assert stale.returncode == 1 and "not up to date" in stale.stderr and "Traceback" not in stale.stderr, stale.stderr
    evaluation.write_text(evaluation.read_text().removesuffix("\n# changed\n"))

    again = run(repo, "dvc", "repro")
    assert again.returncode == 0 and "Running stage" not in again.stdout, again.stdout

    # One fold's outputs deleted: DVC restores them from its cache without training...
    before = {name: (repo / name).read_bytes() for name in ("reports/metrics.json", "reports/folds/2/predictions.csv")}
    delete_fold(repo, 2)
    restored = run(repo, "dvc", "repro")
    assert restored.returncode == 0 and "Stage 'train@2' is cached" in restored.stdout, restored.stdout
    assert stages_run(restored) == set() and {name: (repo / name).read_bytes() for name in before} == before
    # ...and retrained on purpose it comes back to the same bytes, so nothing downstream has to rerun.
    delete_fold(repo, 2)
    retrained = run(repo, "dvc", "repro", "--force", "--single-item", "train@2")
    assert retrained.returncode == 0, retrained.stdout[-3000:] + retrained.stderr[-3000:]
    assert stages_run(retrained) == {"train@2"}, retrained.stdout
    assert {name: (repo / name).read_bytes() for name in before} == before
    status = run(repo, "dvc", "status")
    assert "up to date" in status.stdout, status.stdout

    assert run(repo, "git", "add", "-A").returncode == 0
    commit = run(repo, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "baseline")
    assert commit.returncode == 0, commit.stderr
    experiment = run(repo, "dvc", "exp", "run", "-S", "experiment=tiny_strong", "-S", "lr=0.0003")
    assert experiment.returncode == 0, experiment.stdout[-3000:] + experiment.stderr[-3000:]
    assert stages_run(experiment) == {"download", "split", "features", *(f"train@{k}" for k in range(1, 6)),
                                      "evaluate"}, experiment.stdout  # the tiny dataset, then every fold
    diff = json.loads(run(repo, "dvc", "params", "diff", "--json").stdout)["params.yaml"]
    assert (diff["lr"]["old"], diff["lr"]["new"]) == (0.001, 0.0003)
    assert diff["optimizer.weight_decay"]["new"] == 0.05 and diff["augment.mixup.alpha"]["new"] == 0.2  # the recipe's
    shown = run(repo, "dvc", "exp", "list", "--name-only")
    assert shown.returncode == 0 and shown.stdout.strip(), shown.stdout + shown.stderr

    # The pretrained path through the same stages: the real YAMNet's embedding cache, then a head per fold.
    pretrained = run(repo, "dvc", "exp", "run", "-S", "experiment=tiny_yamnet")
    assert pretrained.returncode == 0, pretrained.stdout[-3000:] + pretrained.stderr[-3000:]
    assert stages_run(pretrained) == {"features", *(f"train@{k}" for k in range(1, 6)), "evaluate"}, pretrained.stdout
    assert np.load(repo / "data/features/synthetic/embedding.npy", mmap_mode="r").shape == (25, 2, 1024)
    assert len(json.loads((repo / "reports/metrics.json").read_text())["fold_accuracy"]) == 5


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
    assert (pooled.stdout + pooled.stderr).count("already trained with this config and data") == 10

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("esclab").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and len(runs) == 11, [r.data.tags.get("esclab.fold") for r in runs]
    children = [r for r in runs if r is not parents[0]]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert sorted(int(c.data.tags["esclab.fold"]) for c in children) == list(folds)
    assert parents[0].data.metrics["accuracy_mean"] == pytest.approx(metrics["accuracy_mean"])
