"""Bad config: every mistake is refused before any work, naming the setting (issue 5, "config")."""

import subprocess
import sys

import pytest
from conftest import REPO, compose_config

from esclab.config import check_config
from esclab.errors import EsclabError


def test_defaults_and_every_experiment_pass():
    check_config(compose_config())
    for experiment in (REPO / "conf/experiment").glob("*.yaml"):
        check_config(compose_config(f"experiment={experiment.stem}"))


@pytest.mark.parametrize("override, message", [
    ("lr=abc", r"lr='abc' is not valid: it must be a number > 0"),
    ("lr=0", r"lr=0 is not valid"),
    ("train.batch_size=0", r"train.batch_size=0 is not valid: it must be an integer > 0"),
    ("train.batch_size=-8", r"train.batch_size=-8"),
    ("train.batch_size=2.5", r"train.batch_size=2.5"),
    ("features.n_mels=0", r"features.n_mels=0 is not valid: it must be an integer > 0"),
    ("features.n_mels=-64", r"features.n_mels=-64"),
    ("train.val_fraction=1", r"train.val_fraction=1 is not valid: it must be a number > 0 and < 1"),
    ("trainer.max_epochs=ten", r"trainer.max_epochs='ten'"),
    ("seed=true", r"seed=True is not valid: it must be an integer >= 0"),
    ("fold=first", r"fold='first' is not valid: it must be an integer > 0 or null"),
    ("train.parallel_folds=0", r"train.parallel_folds=0 is not valid: it must be an integer > 0"),
    ("train.label_smoothing=1.0", r"train.label_smoothing=1.0 is not valid: it must be a number >= 0 and < 1"),
])
def test_wrong_type_or_range_names_the_key(override, message):
    with pytest.raises(EsclabError, match=message):
        check_config(compose_config(override))


def run(*args: str, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, cwd=cwd, timeout=300)


def test_wrong_type_is_one_line_from_train_py_before_any_training(tmp_path):
    result = run(sys.executable, str(REPO / "train.py"), "lr=abc", "fold=1", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "esclab: error: lr='abc' is not valid: it must be a number > 0; fix the override, "
        "or the value in conf/ (params.yaml under dvc repro)"]
    assert "Traceback" not in result.stdout + result.stderr


def test_unknown_override_key_is_refused_by_hydra_with_the_fix():
    result = run(str(REPO / ".venv/bin/esclab"), "split", "trian.batch_size=8")
    assert result.returncode == 1
    assert "Could not override 'trian.batch_size'" in result.stderr and "Traceback" not in result.stderr


def test_nonexistent_model_lists_the_available_models():
    result = run(str(REPO / ".venv/bin/esclab"), "split", "model=nonexistent")
    assert result.returncode == 1
    assert "Could not find 'model/nonexistent'" in result.stderr
    assert "Available options in 'model':\n" in result.stderr and "\tcnn4\n" in result.stderr
    assert "Traceback" not in result.stderr
