"""The fast path (resident batches, channels_last, compile, concurrent folds) changes the speed, not the numbers."""

import pandas as pd
import pytest
import torch
from conftest import TINY, compose_config, split_and_features, tiny_overrides

from esclab.data.synthetic import write_tree
from esclab.models import build_model
from esclab.training.data import EpochShuffle, FoldData, ResidentBatches
from esclab.training.module import Classifier
from esclab.training.run import speed_up, train


@pytest.fixture(scope="module")
def two_folds(tmp_path_factory):
    """The tiny dataset in two folds: a whole cross-validation is two fold runs, which keeps this file quick."""
    root = tmp_path_factory.mktemp("two_folds")
    return split_and_features(write_tree(root, **TINY, n_folds=2), root, n_folds=2)


def overrides(data, out, *extra: str) -> list[str]:
    return tiny_overrides(data, out, "dataset.n_folds=2", "tracking.log_model=false", "train.resident=false", *extra)


@pytest.fixture(scope="module")
def sequential(two_folds, tmp_path_factory):
    """The reference: a whole cross-validation, one fold after another, batches from the DataLoader."""
    out = tmp_path_factory.mktemp("sequential")
    train(compose_config(*overrides(two_folds, out)))
    return out


def same_file(name: str, *roots) -> bool:
    first, second = (root / name for root in roots)
    return first.read_bytes() == second.read_bytes()


def loader(tiny_data, split: str, resident: bool, epoch: int):
    data = FoldData(tiny_data["features"], test_fold=2, batch_size=4, seed=7, resident=resident)
    data.setup()
    batches = getattr(data, f"{split}_dataloader")()
    if split == "train":
        batches.sampler.set_epoch(epoch)  # what Lightning does before each epoch
    return batches


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_resident_batches_are_the_dataloader_batches_in_the_same_order(tiny_data, split):
    orders = []
    for epoch in (0, 1):
        plain, resident = loader(tiny_data, split, False, epoch), loader(tiny_data, split, True, epoch)
        assert isinstance(resident, ResidentBatches) and len(resident) == len(plain)
        expected, got = list(plain), list(resident)
        assert len(got) == len(expected)
        for (x, y, rows), (x_r, y_r, rows_r) in zip(expected, got):
            assert x.dtype == x_r.dtype and torch.equal(x, x_r)
            assert torch.equal(y, y_r) and torch.equal(rows, rows_r)
        orders.append(torch.cat([rows for _, _, rows in got]))
    assert torch.equal(orders[0], orders[1]) == (split != "train")  # training reshuffles every epoch


def test_training_on_resident_batches_gives_the_dataloader_weights_and_predictions(two_folds, sequential, tmp_path,
                                                                                   monkeypatch):
    epochs_set, shuffled = [], []
    set_epoch, iterate = EpochShuffle.set_epoch, ResidentBatches.__iter__
    monkeypatch.setattr(EpochShuffle, "set_epoch", lambda self, e: epochs_set.append(e) or set_epoch(self, e))
    monkeypatch.setattr(ResidentBatches, "__iter__", lambda self: shuffled.append(bool(self.sampler)) or iterate(self))
    train(compose_config(*overrides(two_folds, tmp_path, "fold=1", "train.resident=true")))
    assert set(shuffled) == {True, False}  # training and evaluation both ran on resident batches
    assert epochs_set == [0, 1]  # and Lightning set the training order's epoch before each epoch

    resident, plain = (torch.load(root / "models/fold_1.ckpt", weights_only=False)["state_dict"]
                       for root in (tmp_path, sequential))
    assert resident.keys() == plain.keys() and all(torch.equal(resident[k], plain[k]) for k in plain)
    assert same_file("reports/folds/1/predictions.csv", tmp_path, sequential)
    assert same_file("reports/folds/1/history.csv", tmp_path, sequential)


def test_channels_last_gives_the_same_predictions_within_float_tolerance(two_folds, sequential, tmp_path):
    torch.manual_seed(0)
    plain = Classifier(model={"name": "cnn4"}, n_classes=5, input_shape=(32, 126), optimizer={}).eval()
    fast = Classifier(**plain.hparams).eval()
    fast.load_state_dict(plain.state_dict())
    x = torch.randn(8, 1, 32, 126)
    speed_up(fast.model, channels_last=True)
    assert torch.allclose(fast(x), plain(x), atol=1e-5)

    train(compose_config(*overrides(two_folds, tmp_path, "fold=1", "train.channels_last=true")))
    got, expected = (pd.read_csv(root / "reports/folds/1/predictions.csv") for root in (tmp_path, sequential))
    assert (got["filename"] == expected["filename"]).all() and (got["pred"] == expected["pred"]).all()
    # Training widens the last-digit differences: Adam turns a near-zero gradient's sign into a full lr step.
    assert abs(got.filter(like="prob_") - expected.filter(like="prob_")).to_numpy().max() < 1e-2


def test_channels_last_and_compile_keep_the_checkpoint_format():
    def network():
        torch.manual_seed(0)
        return build_model("cnn4", n_classes=5, input_shape=(32, 64))

    plain, fast = network(), speed_up(network(), channels_last=True, compile=True)
    conv = fast.features[1][0].weight  # the first block's has one input channel: both layouts at once
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    state = fast.state_dict()
    assert state.keys() == plain.state_dict().keys()
    plain.load_state_dict(state)  # a checkpoint of the fast network loads into a plain one


def test_two_folds_at_a_time_give_the_sequential_results(two_folds, sequential, tmp_path):
    train(compose_config(*overrides(two_folds, tmp_path, "train.parallel_folds=2")))
    for fold in (1, 2):
        assert same_file(f"reports/folds/{fold}/predictions.csv", tmp_path, sequential)
        assert same_file(f"reports/folds/{fold}/history.csv", tmp_path, sequential)
    assert same_file("reports/metrics.json", tmp_path, sequential)
