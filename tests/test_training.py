"""Training: fold isolation, per-fold statistics, reproducibility, the run's outputs."""

import json

import numpy as np
import pandas as pd
import pytest
from conftest import compose_config, tiny_overrides

from esclab.errors import EsclabError
from esclab.training.data import FoldData, check_cache
from esclab.training.run import train


def rows_seen(loader) -> set[int]:
    return {int(r) for _, _, rows in loader for r in rows}


@pytest.mark.parametrize("val_fold", [None, 4])
def test_test_fold_never_reaches_training_or_validation(tiny_data, val_fold):
    data = FoldData(tiny_data["features"], test_fold=2, batch_size=4, val_fold=val_fold)
    data.setup()
    folds = data.index["fold"].to_numpy()
    train, val, test = (rows_seen(data.train_dataloader()), rows_seen(data.val_dataloader()),
                        rows_seen(data.test_dataloader()))
    assert test == set(np.flatnonzero(folds == 2))
    assert not (train | val) & test
    assert not train & val and len(train) + len(val) + len(test) == len(folds)
    if val_fold:
        assert {folds[r] for r in val} == {4}


def test_validation_keeps_each_source_recording_on_one_side(tiny_data):
    data = FoldData(tiny_data["features"], test_fold=1, val_fraction=0.25)
    data.setup()
    key = data.index["src_file"].astype(str) + "/" + data.index["label"].astype(str)
    assert not set(key[data.train_rows]) & set(key[data.val_rows])
    assert set(data.index["label"][data.val_rows]) == set(data.index["label"])  # stratified: every class


def test_normalisation_statistics_come_from_training_rows_only(tiny_data):
    data = FoldData(tiny_data["features"], test_fold=3)
    data.setup()
    train = np.asarray(data.array[data.train_rows], dtype=np.float64)
    assert data.mean == pytest.approx(train.mean()) and data.std == pytest.approx(train.std())
    everything = np.asarray(data.array, dtype=np.float64)
    assert data.mean != pytest.approx(everything.mean(), abs=1e-9)
    x, _, _ = next(iter(data.train_dataloader()))
    assert x.shape[1:] == (1, *data.input_shape)


def test_the_val_fold_cannot_be_the_test_fold(tiny_data):
    data = FoldData(tiny_data["features"], test_fold=2, val_fold=2)
    with pytest.raises(EsclabError, match="train.val_fold=2 is the test fold"):
        data.setup()


def test_stale_feature_cache_is_detected(tiny_data):
    settings = json.loads((tiny_data["features"] / "features.json").read_text())["settings"]
    with pytest.raises(EsclabError, match=r"features.n_mels=64 \(cache has 32\).*dvc repro features"):
        check_cache(tiny_data["features"], "logmel", settings | {"n_mels": 64})
    with pytest.raises(EsclabError, match="holds logmel features, but features.representation=embedding"):
        check_cache(tiny_data["features"], "embedding", {})


def test_one_fold_writes_checkpoint_predictions_and_history(tiny_data, tmp_path):
    cfg = compose_config(*tiny_overrides(tiny_data, tmp_path, "fold=2", "tracking.log_model=false"))
    score = train(cfg)  # fold 2's validation score: its best val/acc, the epoch its kept model comes from
    predictions = pd.read_csv(tmp_path / "reports/folds/2/predictions.csv")
    index = pd.read_csv(tiny_data["features"] / "index.csv")
    assert sorted(predictions["filename"]) == sorted(index.loc[index["fold"] == 2, "filename"])
    probs = predictions.filter(like="prob_")
    assert probs.shape[1] == 5 and np.allclose(probs.sum(axis=1), 1, atol=1e-4)
    history = pd.read_csv(tmp_path / "reports/folds/2/history.csv")
    assert list(history["epoch"]) == [0, 1] and history["val/acc"].notna().all()
    assert score == json.loads((tmp_path / "reports/folds/2/fold.json").read_text())["best_val"]["val/acc"]
    assert score == pytest.approx(history["val/acc"].max(), rel=1e-5)  # history.csv keeps 6 digits
    assert (tmp_path / "models/fold_2.ckpt").stat().st_size > 0
    assert not (tmp_path / "models/.fold_2").exists()


def test_a_whole_cross_validation_returns_its_folds_mean_validation_score(tiny_data, tmp_path):
    """What a hyper-parameter search maximises: never a test fold's accuracy."""
    from mlflow import MlflowClient

    cfg = compose_config(*tiny_overrides(tiny_data, tmp_path, "trainer.max_epochs=1", "tracking.log_model=false"))
    score = train(cfg)
    folds = [json.loads((tmp_path / f"reports/folds/{k}/fold.json").read_text()) for k in range(1, 6)]
    assert score == pytest.approx(np.mean([fold["best_val"]["val/acc"] for fold in folds]))
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (parent,) = client.search_runs([client.get_experiment_by_name("esclab").experiment_id],
                                   "tags.`esclab.fold` = 'all'")
    assert parent.data.metrics["val/acc_best_mean"] == pytest.approx(score)
    test_accuracy = json.loads((tmp_path / "reports/metrics.json").read_text())["accuracy_mean"]
    assert parent.data.metrics["accuracy_mean"] == pytest.approx(test_accuracy)


def test_two_cpu_runs_with_the_same_seed_are_identical(tiny_data, tmp_path):
    outputs = []
    for run in ("a", "b"):
        cfg = compose_config(*tiny_overrides(tiny_data, tmp_path / run, "fold=1", "tracking.log_model=false"))
        train(cfg)
        outputs.append((tmp_path / run / "reports/folds/1/predictions.csv").read_bytes())
        outputs.append((tmp_path / run / "reports/folds/1/history.csv").read_bytes())
    assert outputs[0] == outputs[2] and outputs[1] == outputs[3]


def test_fold_out_of_range_is_refused(tiny_data, tmp_path):
    cfg = compose_config(*tiny_overrides(tiny_data, tmp_path, "fold=7"))
    with pytest.raises(EsclabError, match="fold=7 is not a test fold of dataset=synthetic: use one of 1, 2, 3, 4, 5, or fold=null"):
        train(cfg)


def test_multirun_sweep_runs_each_value_into_its_own_mlflow_parent(tiny_data, tmp_path):
    import subprocess
    import sys

    from conftest import REPO
    from mlflow import MlflowClient

    overrides = tiny_overrides(tiny_data, tmp_path, "fold=1", "trainer.max_epochs=1", "tracking.log_model=false")
    overrides = [o for o in overrides if not o.startswith("lr=")]
    result = subprocess.run([sys.executable, str(REPO / "train.py"), "-m", "lr=1e-3,3e-4", *overrides],
                            cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("esclab").experiment_id])
    parents = {r.data.params["lr"] for r in runs if r.data.tags["esclab.fold"] == "all"}
    assert parents == {"0.001", "0.0003"}
    assert len(list((tmp_path / "multirun").glob("*/*/*/.hydra/config.yaml"))) == 2  # each job keeps its config
