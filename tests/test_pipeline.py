"""Real `dvc repro` and `dvc exp run` in temporary git+DVC repos: the data stages over HTTP, then the whole demo
pipeline (the other datasets' pipelines are in test_pipeline_datasets.py)."""

import hashlib
import json

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import REPO, TINY, TINY_FEATURES, printed_warnings
from http_server import ArchiveServer
from repos import SMALL_FEATURES, delete_fold, git_dvc_repo, run, stages_run, write_params

from esclab.data.synthetic import write_archive


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
    # A quiet log: every library warning is fixed or understood (esclab/logs.py).
    assert printed_warnings(first.stdout + first.stderr) == []
    metrics = json.loads((repo / "reports/metrics.json").read_text())
    assert {"accuracy_mean", "accuracy_std", "fold_accuracy", "macro_f1", "macro_roc_auc",
            "top5_accuracy"} <= set(metrics)
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

    # An edit to code a stage runs (even a comment) or to the lock files makes DVC list exactly the stages that run it.
    folds = {f"train@{k}" for k in range(1, 6)}
    for edited, stages in (("src/esclab/config.py", {"download", "split", "features", *folds, "evaluate"}),
                           ("src/esclab/evaluation/metrics.py", {*folds, "evaluate"}),
                           ("requirements.lock", {"download", "split", "features", *folds, "evaluate"})):
        path = repo / edited
        text = path.read_text()
        path.write_text(text + "\n# edited\n")
        status = run(repo, "dvc", "status", "--json")
        assert status.returncode == 0 and set(json.loads(status.stdout)) == stages, (edited, status.stdout)
        path.write_text(text)

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
