"""Imbalanced classes (seeds 000/001: crying 457 / screaming 862 / normal 2631): class-weighted loss, balanced
sampling, validation by balanced accuracy, and balanced accuracy beside accuracy in the reports."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY_FEATURES, compose_config, folder_overrides

from esclab.data.representations import write_cache
from esclab.errors import EsclabError
from esclab.evaluation.metrics import pooled_metrics
from esclab.training.data import EpochBalanced, EpochShuffle, balanced_class_weights
from esclab.training.module import Classifier
from esclab.training.run import train


def test_balanced_class_weights_give_every_class_the_same_total_weight():
    labels = np.array([0] * 10 + [1] * 30 + [2] * 60)
    weights = balanced_class_weights(labels, 4)
    assert weights[:3] == pytest.approx([100 / 40, 100 / 120, 100 / 240]) and weights[3] == 0.0  # n / (4 x count)
    totals = np.bincount(labels, minlength=4)[:3] * np.array(weights[:3])
    assert totals == pytest.approx([25, 25, 25])


def test_balanced_sampler_draws_each_class_about_equally_and_replays_an_epoch():
    labels = np.array([0] * 20 + [1] * 80 + [2] * 900)
    sampler = EpochBalanced(labels, seed=7)
    draws = []
    for epoch in range(5):
        sampler.set_epoch(epoch)
        draws += list(sampler)
    assert len(draws) == 5 * len(labels)
    shares = np.bincount(labels[draws]) / len(draws)
    assert shares == pytest.approx([1 / 3] * 3, abs=0.03)  # against 0.02 / 0.08 / 0.9 in the data
    assert len(set(draws) & set(range(20))) == 20  # every rare clip is drawn (it repeats)
    sampler.set_epoch(3)
    again = EpochBalanced(labels, seed=7)
    again.set_epoch(3)
    assert list(sampler) == list(again)  # (seed, epoch) fixes the draw, as EpochShuffle's order
    sampler.set_epoch(4)
    assert list(sampler) != list(again)
    assert sorted(EpochShuffle(len(labels), 7)) == list(range(len(labels)))  # shuffle: each row once


def test_balanced_accuracy_is_the_mean_recall_beside_accuracy():
    # 8 of class 0, 2 of class 1; the model says 0 for everything: 80 % accurate, 50 % balanced.
    pred = pd.DataFrame({"filename": [f"{i}.wav" for i in range(10)], "fold": [1] * 5 + [2] * 5,
                         "label": [0] * 8 + [1] * 2, "pred": [0] * 10, "prob_0": [0.9] * 10, "prob_1": [0.1] * 10})
    metrics, per_class = pooled_metrics(pred, ["normal", "crying"], top_k=1)
    assert metrics["accuracy_pooled"] == 0.8 and metrics["balanced_accuracy"] == 0.5
    assert metrics["balanced_accuracy"] == per_class["recall"].mean()
    assert metrics["macro_f1"] == pytest.approx(per_class["f1"].mean(), abs=1e-6)


@pytest.fixture(scope="module")
def folder_data(folder_split, tmp_path_factory) -> dict[str, Path]:
    """The synthetic imbalanced tree's grouped 3-fold split through tiny log-mel features."""
    features = compose_config("dataset=synthetic_folder", *(f"features.{k}={v}" for k, v in TINY_FEATURES.items()),
                              "features.num_workers=1").features
    return folder_split | {"features": write_cache(folder_split["split"], tmp_path_factory.mktemp("f"), features)}


def folder_run(data: dict[str, Path], out: Path, *overrides: str):
    return compose_config(*folder_overrides(data, out, *(f"features.{k}={v}" for k, v in TINY_FEATURES.items()),
                                            *overrides))


def test_a_network_trains_with_class_weights_balanced_sampling_and_balanced_validation(folder_data, tmp_path):
    train(folder_run(folder_data, tmp_path, "train.class_weights=balanced", "train.sampler=balanced",
                     "train.monitor=val/balanced_acc"))
    module = Classifier.load_from_checkpoint(tmp_path / "models/fold_1.ckpt", map_location="cpu")
    index = pd.read_csv(folder_data["features"] / "index.csv")
    # training rows: neither the test fold nor the validation share; weights from their counts, rarest highest
    weights = module.hparams.class_weights
    assert len(weights) == 3 and weights[0] > weights[2] > weights[1]  # crying 10 < screaming 18 < normal 50
    assert torch.equal(module.class_weights, torch.tensor(weights)) and "class_weights" not in module.state_dict()
    history = pd.read_csv(tmp_path / "reports/folds/1/history.csv")
    assert history["val/balanced_acc"].between(0, 1).all()
    predictions = pd.read_csv(tmp_path / "reports/folds/1/predictions.csv")
    assert sorted(predictions["filename"]) == sorted(index.loc[index["fold"] == 1, "filename"])


def test_a_head_refuses_balanced_sampling_before_it_reads_anything(tmp_path):
    with pytest.raises(EsclabError, match="train.sampler=balanced draws training batches.*train.sampler=shuffle"):
        train(compose_config("features=yamnet", "model=logistic", "train.sampler=balanced", "fold=1",
                             f"paths.features={tmp_path / 'none'}", f"paths.models={tmp_path}",
                             f"paths.reports={tmp_path}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"))
    assert list(tmp_path.iterdir()) == []


def test_unknown_imbalance_settings_are_named(folder_data, tmp_path):
    with pytest.raises(EsclabError, match="train.class_weights must be one of none, balanced; got 'inverse'"):
        train(folder_run(folder_data, tmp_path, "train.class_weights=inverse"))
    with pytest.raises(EsclabError, match="train.sampler must be one of shuffle, balanced; got 'weighted'"):
        train(folder_run(folder_data, tmp_path, "train.sampler=weighted"))
    assert not (tmp_path / "models/fold_1.ckpt").exists()


def test_a_head_weighs_its_classes_as_scikit_learn_does():
    from esclab.models.heads import candidates

    for head, balanced in (("logistic", True), ("svm", True), ("logistic", False)):
        ((_, pipeline),) = candidates(head, C=[1.0], pooling="mean", seed=0, balanced=balanced)
        classifier = pipeline[-1].estimator if head == "svm" else pipeline[-1]
        assert classifier.class_weight == ("balanced" if balanced else None)
