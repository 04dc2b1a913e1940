"""A result's identity is its code, config, data and weights (esclab/identity.py): other code retrains and never
resumes, a FINISHED MLflow run is never written into again, folds of different runs are never combined, and each
system has a name of its own."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO, compose_config, esclab, kill_when, tiny_overrides
from repos import git_dvc_repo, run, stages_run, write_params

from esclab.errors import EsclabError


def copy_of_the_code(dest: Path) -> Path:
    """The repository's code (src/, conf/, train.py, the lock files) in `dest`, to edit without touching the one
    the other tests run."""
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("src", "conf"):
        shutil.copytree(REPO / name, dest / name, ignore=ignore)
    for name in ("train.py", "requirements.lock", "requirements-nodeps.lock"):
        shutil.copy(REPO / name, dest / name)
    return dest


def running(code: Path) -> dict[str, str]:
    """The environment that runs the copy in `code`: its package first on the path, errors as a user sees them,
    runs logged where the overrides say."""
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "MLFLOW_TRACKING_URI")}
    return env | {"PYTHONPATH": str(code / "src")}


def train_with(code: Path, *overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    """`python train.py` of the copy in `code`."""
    return subprocess.run([sys.executable, str(code / "train.py"), *overrides], cwd=cwd, env=running(code),
                          capture_output=True, text=True)


def mlflow_snapshot(out: Path) -> dict[str, tuple]:
    """Every run in `out`'s MLflow store: status, times, tags, params, each metric's history and its artifact files'
    bytes."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    snapshot = {}
    for r in client.search_runs([e.experiment_id for e in client.search_experiments()]):
        history = {key: [(m.value, m.step, m.timestamp) for m in client.get_metric_history(r.info.run_id, key)]
                   for key in r.data.metrics}
        artifacts = Path(r.info.artifact_uri.removeprefix("file://"))
        files = {str(p.relative_to(artifacts)): p.read_bytes() for p in sorted(artifacts.rglob("*")) if p.is_file()}
        snapshot[r.info.run_id] = (r.info.status, r.info.start_time, r.info.end_time, r.data.tags, r.data.params,
                                   history, files)
    return snapshot


@pytest.mark.slow
def test_other_code_retrains_never_resumes_and_leaves_the_old_runs_as_they_were(tiny_data, tmp_path):
    """A fold trained by code v1 is skipped by v1; after an edit to a training module (v2) it trains again, and a v2
    run killed after its first epoch does not resume under v3. Every v1 MLflow run stays byte for byte."""
    code, out = copy_of_the_code(tmp_path / "code"), tmp_path / "out"
    overrides = [*tiny_overrides(tiny_data, out, "tracking.log_model=false"), "fold=2"]
    record = out / "reports/folds/2/fold.json"

    first = train_with(code, *overrides, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    v1 = json.loads(record.read_text())
    assert set(v1["identity"]) == {"code", "config", "data", "weights", "run_key"}
    assert set(v1["git"]) == {"git.commit", "git.dirty"}
    before = mlflow_snapshot(out)
    assert len(before) == 2  # the cross-validation's run and fold 2's

    again = train_with(code, *overrides, cwd=tmp_path)
    assert again.returncode == 0 and "already trained by this code" in again.stdout + again.stderr
    assert mlflow_snapshot(out) == before

    module = code / "src/esclab/training/data.py"
    module.write_text(module.read_text() + "\n# v2\n")
    checkpoint = out / "models/.fold_2/checkpoints/last.ckpt"
    kill_when([sys.executable, str(code / "train.py"), *overrides], cwd=tmp_path, ready=checkpoint.is_file,
              env=running(code))
    assert json.loads(record.read_text()) == v1  # the killed run finished nothing

    module.write_text(module.read_text() + "# v3\n")
    third = train_with(code, *overrides, cwd=tmp_path)
    log = third.stdout + third.stderr
    assert third.returncode == 0, log[-3000:]
    assert "trained with other code; training it again" in log and f"not resuming from {checkpoint}" in log, log
    v3 = json.loads(record.read_text())
    assert v3["identity"]["code"] != v1["identity"]["code"] and v3["run_key"] != v1["run_key"]
    assert {k: v3["identity"][k] for k in ("config", "data", "weights")} == {
        k: v1["identity"][k] for k in ("config", "data", "weights")}
    after = mlflow_snapshot(out)
    assert {run_id: after[run_id] for run_id in before} == before
    new = [after[run_id][3] for run_id in set(after) - set(before)]
    assert {tags["esclab.run_key"] for tags in new} >= {v3["run_key"]}


@pytest.fixture
def mixed_run(cnn4_run, tiny_data, tmp_path) -> tuple[Path, list[str]]:
    """A copy of a whole tiny cross-validation whose fold 3 was then trained by hand with another lr (README's
    `python train.py fold=3 lr=3e-4`, into the same models/ and reports/). The copy and its overrides."""
    from esclab.training.run import train

    out = Path(shutil.copytree(cnn4_run, tmp_path / "run"))
    overrides = tiny_overrides(tiny_data, out, "tracking.log_model=false")
    train(compose_config(*overrides, "fold=3", "lr=3e-4", "tracking.experiment=by-hand"))  # its runs beside the copy
    return out, overrides


@pytest.mark.slow
def test_a_fold_trained_with_other_settings_is_refused_by_evaluate_predict_and_export(mixed_run, tiny_data):
    out, overrides = mixed_run
    from esclab.training.run import evaluate

    with pytest.raises(EsclabError, match=r"folds 3 in .* were trained with other code, config, data or weights"):
        evaluate(compose_config(*overrides))
    clip = pd.read_csv(tiny_data["split"])["path"][0]
    for command in (["evaluate", *overrides], ["predict", clip, "--models", str(out / "models")],
                    ["export", "--models", str(out / "models"), "--out", str(out / "exported")]):
        refused = esclab(*command, cwd=out)
        assert refused.returncode == 1 and refused.stdout == "", (command, refused.stdout[-2000:])
        lines = refused.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("esclab: error: "), (command, refused.stderr[-3000:])
        assert "fold_3.ckpt" in lines[0] or "folds 3 " in lines[0], lines
    assert not (out / "exported").exists()
    # One fold alone is still that fold's model.
    assert esclab("predict", clip, "--models", str(out / "models"), "--fold", "3", cwd=out).returncode == 0


def test_an_unfinished_cross_validation_is_not_averaged(cnn4_run, tiny_data, tmp_path):
    """Fold models of one run but not all its folds (a failed run, or a fold deleted): refused, naming the missing."""
    models = Path(shutil.copytree(cnn4_run / "models", tmp_path / "models"))
    (models / "fold_5.ckpt").unlink()
    clip = pd.read_csv(tiny_data["split"])["path"][0]
    refused = esclab("predict", clip, "--models", str(models), cwd=tmp_path)
    assert refused.returncode == 1 and "fold 5 missing" in refused.stderr, refused.stderr[-2000:]


@pytest.mark.parametrize(("experiment", "name"), [
    ("yamnet_ffn", "yamnet_ffn-esc50"), ("aisfx_ffn", "aisfx_ffn-esc50"), ("yamnet_aisfx_ffn", "yamnet_aisfx_ffn-esc50"),
    ("wav2vec2_ffn", "wav2vec2_ffn-esc50"), ("yamnet_svm", "yamnet_svm-esc50"), ("clap_zeroshot", "clap_zeroshot-esc50"),
    ("wav2vec2_finetune", "wav2vec2_finetune-esc50"), ("resnet50", "resnet-esc50"), ("demo", "cnn4-synthetic"),
])
def test_each_system_has_its_own_run_and_registry_name(experiment, name):
    tracking = compose_config(f"experiment={experiment}").tracking
    assert (tracking.name, tracking.register_as) == (name, name)


def test_runs_are_named_for_their_system(cnn4_run):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{cnn4_run / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("esclab").experiment_id])
    assert {r.info.run_name for r in runs} >= {"cnn4-synthetic", *(f"cnn4-synthetic-fold{k}" for k in range(1, 6))}
    assert "cnn4-synthetic" in [m.name for m in client.search_registered_models()]


@pytest.mark.slow
def test_a_file_added_to_a_local_folder_dataset_reruns_download_and_what_follows(folder_tree, tmp_path):
    """dataset.source_dir is a dependency DVC hashes by content (paths.source), not a string: a recording added to
    the tree reruns download, split and features; nothing changed, nothing runs."""
    tree = Path(shutil.copytree(folder_tree, tmp_path / "tree"))
    repo = git_dvc_repo(tmp_path / "repo")
    write_params(repo, "dataset=folder", f"dataset.source_dir={tree}", "dataset.n_folds=3",
                 "features.sample_rate=16000", "features.duration=1.0", "features.n_fft=512", "features.hop_length=128",
                 "features.n_mels=32", "features.num_workers=1")
    first = run(repo, "dvc", "repro", "features")
    assert first.returncode == 0 and stages_run(first) == {"download", "split", "features"}, first.stderr[-3000:]
    again = run(repo, "dvc", "repro", "features")
    assert again.returncode == 0 and stages_run(again) == set(), again.stdout

    source = sorted((tree / "normal").iterdir())[0]
    shutil.copy(source, source.with_name("added_1" + source.suffix))
    status = run(repo, "dvc", "status", "download")
    assert "download" in status.stdout and str(tree) in status.stdout, status.stdout
    added = run(repo, "dvc", "repro", "features")
    assert added.returncode == 0 and stages_run(added) == {"download", "split", "features"}, added.stdout[-3000:]
    assert "added_1" in (repo / "data/splits/folder.csv").read_text()
