"""Augmentation and the strong recipe: training batches only, soft targets, per-step schedules, end to end."""

import subprocess
import sys

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, compose_config, tiny_overrides
from omegaconf import OmegaConf

from esclab.errors import EsclabError
from esclab.training.augment import Augment
from esclab.training.run import build_classifier, fold_data

INGREDIENTS = ["specaugment", "mixup", "shift", "gain"]
SMALL_CNN = ["model.channels=[8,16]", "model.fc_dim=16"]  # these tests are about batches, not the network


def settings(name: str) -> dict:
    """conf/augment/<name>.yaml, composed as a run sees it."""
    return OmegaConf.to_container(compose_config(f"augment={name}").augment)


def a_batch(n_classes: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Eight standardised log-mels (32 mels x 126 frames) and their one-hot targets."""
    x = torch.randn(8, 1, 32, 126, generator=torch.Generator().manual_seed(0))
    return x, F.one_hot(torch.arange(8) % n_classes, n_classes).float()


def fold_module(tiny_data, tmp_path, *overrides: str):
    """Fold 1 of the tiny data and a small cnn4 module built from conf/ as a run builds it."""
    cfg = compose_config(*tiny_overrides(tiny_data, tmp_path, "fold=1", *SMALL_CNN, *overrides))
    data = fold_data(cfg, 1)
    return cfg, data, build_classifier(cfg, data)


def quiet_trainer(**kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, **kwargs)


def test_augment_none_feeds_the_loaders_batches_to_the_network_bit_identical(tiny_data, tmp_path):
    _, data, module = fold_module(tiny_data, tmp_path)
    seen = []

    def record(network, args):
        seen.append(args[0].clone())

    module.model.register_forward_pre_hook(record)
    quiet_trainer(max_epochs=1, limit_val_batches=0).fit(module, datamodule=data)
    loader = data.train_dataloader()
    loader.sampler.set_epoch(0)
    expected = [x for x, _, _ in loader]
    assert len(seen) == len(expected) > 0
    assert all(torch.equal(a, b) for a, b in zip(seen, expected))


def test_augmentation_never_touches_validation_or_prediction_batches(tiny_data, tmp_path):
    _, data, module = fold_module(tiny_data, tmp_path, "augment=strong")
    augmented, augment = [], module.augment

    def spy(x, targets):
        augmented.append(len(x))
        return augment(x, targets)

    module.augment = spy
    trainer = quiet_trainer(max_epochs=1)  # with the sanity check and a validation epoch
    trainer.fit(module, datamodule=data)
    assert sum(augmented) == len(data.train_rows)  # each training clip once, nothing else
    augmented.clear()
    strong_val = trainer.validate(module, datamodule=data, verbose=False)
    strong_probs = torch.cat([p for _, p in trainer.predict(module, datamodule=data)])
    assert augmented == []

    _, _, plain = fold_module(tiny_data, tmp_path, "augment=none")
    plain.load_state_dict(module.state_dict())
    assert trainer.validate(plain, datamodule=data, verbose=False) == strong_val
    assert torch.equal(torch.cat([p for _, p in trainer.predict(plain, datamodule=data)]), strong_probs)


def test_mixup_soft_targets_sum_to_one_and_are_one_hot_without_mixup():
    x, targets = a_batch()
    torch.manual_seed(0)
    _, mixed = Augment(settings("mixup"))(x, targets)
    assert torch.allclose(mixed.sum(dim=1), torch.ones(8)) and (mixed >= 0).all()
    assert (mixed > 0).sum(dim=1).max() == 2 and not torch.equal(mixed, targets)  # two clips' labels, mixed
    for name in ["none", "specaugment", "shift", "gain"]:
        _, kept = Augment(settings(name))(x, targets)
        assert torch.equal(kept, targets), name


@pytest.mark.parametrize("name", INGREDIENTS)
def test_each_ingredient_changes_a_batch_at_probability_one_and_not_at_zero(name):
    x, targets = a_batch()
    config = settings(name)
    torch.manual_seed(0)
    changed, _ = Augment(config | {name: config[name] | {"p": 1.0}})(x, targets)
    kept, _ = Augment(config | {name: config[name] | {"p": 0.0}})(x, targets)
    assert changed.shape == x.shape and not torch.equal(changed, x)
    assert torch.equal(kept, x)


@pytest.mark.parametrize("mels, frames", [(32, 126), (128, 431)])
def test_specaugment_masks_the_same_share_of_any_input_size(mels, frames):
    """At most freq_mask of the bins and time_mask of the frames per mask, whatever the input's size."""
    x = torch.randn(64, 1, mels, frames, generator=torch.Generator().manual_seed(0)) + 10  # no zeros but the masks
    torch.manual_seed(0)
    spec = {"p": 1.0, "freq_mask": 0.25, "time_mask": 0.1, "n_masks": 1}
    masked, _ = Augment({"specaugment": spec})(x, x.new_zeros(64, 2))
    hidden = masked[:, 0] == 0
    bands, spans = hidden.all(dim=2).sum(dim=1), hidden.all(dim=1).sum(dim=1)  # per clip: whole rows, whole columns
    assert bands.max() <= int(0.25 * mels) and spans.max() <= int(0.1 * frames)
    assert bands.max() >= int(0.25 * mels) // 2 and spans.max() >= int(0.1 * frames) // 2  # and they are that wide


def test_specaugment_refuses_widths_that_are_not_fractions():
    with pytest.raises(EsclabError, match=r"augment\.specaugment\.time_mask is a fraction of the input .* got 48"):
        Augment({"specaugment": {"p": 1.0, "freq_mask": 0.1, "time_mask": 48, "n_masks": 2}})


def test_gain_is_an_offset_of_decibels_over_the_training_std(tiny_data, tmp_path):
    x, targets = a_batch()
    out, _ = Augment({"gain": {"p": 1.0, "max_db": 6.0}}, std=20.0)(x, targets)
    offset = (out - x).flatten(1)
    assert torch.allclose(offset, offset[:, :1].expand_as(offset), atol=1e-6)  # one level change per clip
    assert offset.abs().max() <= 6.0 / 20.0 + 1e-6 and offset.abs().max() > 0.1
    _, data, module = fold_module(tiny_data, tmp_path, "augment=gain")
    assert module.hparams.feature_std == data.std != 1.0  # a run converts with its training split's std


@pytest.mark.parametrize(("preset", "representation"), [("strong", "logmel"), ("waveform_strong", "waveform")])
def test_augmentation_replays_from_the_global_seed(preset, representation):
    """BatchSeed re-seeds torch before every batch, so a resumed epoch draws the same augmentations."""
    from test_waveform_augment import one_hot, waveforms

    x, targets = a_batch() if representation == "logmel" else (waveforms(), one_hot())
    strong = Augment(settings(preset), representation=representation)
    runs = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        runs.append(strong(x, targets))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert not torch.equal(runs[0][0], runs[2][0])


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")
def test_label_smoothing_applies_on_top_of_mixup_targets(tiny_data, tmp_path):
    _, data, module = fold_module(tiny_data, tmp_path, "augment=mixup", "train.label_smoothing=0.1")
    x, y, rows = next(iter(data.train_dataloader()))
    module.train()
    torch.manual_seed(0)
    loss = module.training_step((x, y, rows), 0)
    torch.manual_seed(0)  # the same draws: mixup's, then dropout's
    mixed, targets = module.augment(x, F.one_hot(y, data.n_classes).float())
    smoothed = 0.9 * targets + 0.1 / data.n_classes
    expected = -(smoothed * torch.log_softmax(module(mixed), dim=1)).sum(dim=1).mean()
    assert torch.allclose(loss, expected, atol=1e-6)


@pytest.mark.parametrize("name, overrides", [("warmup_cosine", ["scheduler.warmup_fraction=0.25"]), ("onecycle", [])])
def test_per_step_schedulers_warm_up_then_decay_over_a_tiny_run(tiny_data, tmp_path, name, overrides):
    cfg, data, module = fold_module(tiny_data, tmp_path, f"scheduler={name}", "train.batch_size=2", *overrides)
    lrs = []

    class RecordLr(L.Callback):
        def on_train_batch_start(self, trainer, *args):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer = quiet_trainer(max_epochs=3, limit_val_batches=0, callbacks=[RecordLr()])
    trainer.fit(module, datamodule=data)
    assert len(lrs) == trainer.estimated_stepping_batches > 12  # one lr per optimizer step, the total it was built for
    peak = lrs.index(max(lrs))
    assert 0 < peak < len(lrs) - 1 and max(lrs) == pytest.approx(cfg.lr, rel=0.01)  # one-cycle peaks between steps
    assert lrs[:peak + 1] == sorted(lrs[:peak + 1]) and lrs[peak:] == sorted(lrs[peak:], reverse=True)
    assert lrs[-1] < 0.05 * cfg.lr
    if name == "warmup_cosine":
        warmup = round(0.25 * len(lrs))
        assert lrs[:warmup] == pytest.approx([cfg.lr * (s + 1) / warmup for s in range(warmup)])


def test_unknown_ingredient_and_bad_probability_are_refused():
    with pytest.raises(EsclabError, match="augment.cutout is not an augmentation: must be one of gain, shift, mixup"):
        Augment({"cutout": {"p": 0.5}})
    with pytest.raises(EsclabError, match=r"augment.gain.p must be a probability between 0 and 1, got 1.5"):
        Augment({"gain": {"p": 1.5, "max_db": 6.0}})


def test_cnn4_strong_experiment_runs_end_to_end(tiny_data, tmp_path):
    overrides = tiny_overrides(tiny_data, tmp_path, "trainer.max_epochs=2", "fold=1", "tracking.log_model=false")
    result = subprocess.run([sys.executable, str(REPO / "train.py"), "experiment=cnn4_strong", *overrides],
                            cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    history = (tmp_path / "reports/folds/1/history.csv").read_text().splitlines()
    assert len(history) == 3 and (tmp_path / "reports/folds/1/predictions.csv").is_file()
    hparams = torch.load(tmp_path / "models/fold_1.ckpt", weights_only=False)["hyper_parameters"]
    assert set(hparams["augment"]) == set(INGREDIENTS) and hparams["label_smoothing"] == 0.1
    assert hparams["optimizer"]["_target_"] == "torch.optim.AdamW" and hparams["scheduler"]["interval"] == "step"
