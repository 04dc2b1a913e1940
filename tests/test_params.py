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
