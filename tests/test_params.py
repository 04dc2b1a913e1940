"""params.yaml, which `dvc repro` reads, must be conf/ composed: the three ways in can never disagree."""

from conftest import REPO

from esclab.params import compose, recorded_overrides


def test_params_yaml_is_conf_composed():
    params = (REPO / "params.yaml").read_text()
    expected = compose(REPO / "conf", recorded_overrides(params))
    assert params == expected, "params.yaml differs from conf/: run `make params` (or `make demo` again)"


def test_recorded_overrides_round_trip():
    text = compose(REPO / "conf", ["dataset=esc10", "features.n_mels=64"])
    assert recorded_overrides(text) == ["dataset=esc10", "features.n_mels=64"]
    assert "n_mels: 64" in text and "name: esc10" in text
    assert recorded_overrides("dataset:\n  name: esc50\n") == []


def test_every_dvc_param_exists_in_params_yaml():
    import yaml

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        for key in stage.get("params", []):
            node = params
            for part in key.split("."):
                assert part in node, f"dvc.yaml stage {name} lists {key}, missing from params.yaml"
                node = node[part]


def test_fold_list_follows_n_folds_in_dvcs_own_composition():
    """params.yaml is written by DVC's composition (as `dvc exp run -S` does), where esclab's resolver must be found."""
    import yaml

    assert yaml.safe_load(compose(REPO / "conf", []))["dataset"]["folds"] == [1, 2, 3, 4, 5]
    assert yaml.safe_load(compose(REPO / "conf", ["dataset.n_folds=3"]))["dataset"]["folds"] == [1, 2, 3]


def test_dvc_runs_one_train_stage_per_fold_of_the_config(tmp_path):
    """dvc.yaml's train stages come from params.yaml's dataset.folds, and evaluate waits for every one of them."""
    import os
    import shutil
    import subprocess
    import sys

    for name in ("dvc.yaml", "conf", "train.py"):
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy)(REPO / name, tmp_path / name)
    (tmp_path / "params.yaml").write_text(compose(REPO / "conf", ["dataset.n_folds=3"]))
    env = os.environ | {"PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}"}
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=tmp_path, env=env, check=True)
    stages = subprocess.run(["dvc", "stage", "list", "--name-only"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, check=True).stdout.split()
    assert stages == ["download", "split", "features", "train@1", "train@2", "train@3", "evaluate"]
    dag = subprocess.run(["dvc", "dag", "--dot", "evaluate"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         check=True).stdout
    assert all(f'"train@{k}" -> "evaluate"' in dag for k in (1, 2, 3)), dag
