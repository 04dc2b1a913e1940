"""Waveform augmentation: gain, time shift, mixup and noise on real audio batches; refusals; one training epoch."""

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import compose_config, tiny_overrides
from omegaconf import OmegaConf
from test_augment import settings
from torch import nn

from esclab.data.representations import write_cache
from esclab.errors import EsclabError
from esclab.models import MODELS
from esclab.training.augment import Augment
from esclab.training.run import build_classifier, fold_data, train


def waveforms(n: int = 8, samples: int = 16000) -> torch.Tensor:
    """`n` clips (n x 1 x samples) of different levels: tones in noise, as a standardised waveform cache holds."""
    generator = torch.Generator().manual_seed(0)
    t = torch.arange(samples) / 16000
    tones = torch.sin(2 * torch.pi * 440 * (1 + torch.arange(n))[:, None] * t)
    levels = torch.logspace(-1, 0.5, n)[:, None]
    return (levels * (tones + 0.3 * torch.randn(n, samples, generator=generator)))[:, None]


def one_hot(n: int = 8) -> torch.Tensor:
    return F.one_hot(torch.arange(n), n).float()  # a class per clip: a mixed target shows its pair


def rms_db(x: torch.Tensor) -> torch.Tensor:
    return 10 * torch.log10(x.pow(2).mean(dim=(1, 2)))


def test_gain_on_a_waveform_is_the_log_mel_draw_as_an_amplitude_factor():
    x, gain = waveforms(), {"gain": {"p": 1.0, "max_db": 6.0}}
    torch.manual_seed(0)
    louder, _ = Augment(gain, representation="waveform")(x, one_hot())
    torch.manual_seed(0)  # the same draws on a log-mel (std 1: in dB) are offsets of g dB
    offset, _ = Augment(gain, representation="logmel")(torch.zeros(8, 1, 2, 3), one_hot())
    drawn = offset[:, 0, 0, 0]
    assert torch.allclose(rms_db(louder) - rms_db(x), drawn, atol=1e-3)
    assert torch.allclose(louder, x * 10 ** (drawn / 20).view(-1, 1, 1))  # one factor per clip, no offset
    assert drawn.abs().max() <= 6.0 and drawn.abs().max() > 2.0


def test_time_shift_rolls_each_clip_without_losing_a_sample():
    x = waveforms(samples=400)
    torch.manual_seed(0)
    shifted, _ = Augment({"shift": {"p": 1.0, "max_fraction": 0.25}}, representation="waveform")(x, one_hot())
    shifts = []
    for clip, out in zip(x, shifted):
        shifts += [k for k in range(-100, 101) if torch.equal(torch.roll(clip, k, dims=-1), out)]
    assert len(shifts) == 8 and len(set(shifts)) > 4  # each clip one roll within a quarter, clips rolled differently


def test_noise_is_added_at_the_drawn_snr_of_each_clip():
    x = waveforms()
    torch.manual_seed(0)
    noisy, _ = Augment({"noise": {"p": 1.0, "min_snr_db": 20.0, "max_snr_db": 20.0}}, representation="waveform")(
        x, one_hot())
    snr = rms_db(x) - rms_db(noisy - x)
    assert torch.allclose(snr, torch.full((8,), 20.0), atol=0.2)  # quiet and loud clips alike: relative to each
    torch.manual_seed(0)
    noisy, _ = Augment(settings("noise") | {"noise": settings("noise")["noise"] | {"p": 1.0}},
                       representation="waveform")(x, one_hot())
    snr = rms_db(x) - rms_db(noisy - x)
    assert snr.min() > 10 - 0.2 and snr.max() < 40 + 0.2 and snr.max() - snr.min() > 5
    silent, _ = Augment({"noise": {"p": 1.0, "min_snr_db": 0.0, "max_snr_db": 0.0}}, representation="waveform")(
        torch.zeros(2, 1, 100), one_hot(2))
    assert torch.equal(silent, torch.zeros(2, 1, 100))


def test_waveform_mixup_mixes_each_clip_with_the_partner_its_target_names():
    x, targets = waveforms(), one_hot()
    torch.manual_seed(1)
    mixup = {"mixup": settings("waveform_strong")["mixup"]}  # between-class learning's uniform ratio
    mixed, soft = Augment(mixup, representation="waveform")(x, targets)
    assert torch.allclose(soft.sum(dim=1), torch.ones(8)) and (soft >= 0).all()
    partners = 0
    for i in range(8):
        lam = soft[i, i]
        others = [j for j in range(8) if j != i and soft[i, j] > 0]
        if others:
            (j,), partners = others, partners + 1
            assert torch.allclose(mixed[i], lam * x[i] + (1 - lam) * x[j], atol=1e-6)
        else:
            assert lam == 1 and torch.equal(mixed[i], x[i])
    assert partners >= 6


def test_augment_none_hands_back_the_very_tensors_and_draws_nothing():
    x, targets = waveforms(), one_hot()
    state = torch.get_rng_state()
    out, out_targets = Augment(settings("none"), representation="waveform")(x, targets)
    assert out is x and out_targets is targets
    assert torch.equal(torch.get_rng_state(), state)


def test_an_ingredient_for_the_other_representation_is_refused_before_training(tiny_data, tmp_path):
    with pytest.raises(EsclabError, match=r"^augment.specaugment does not act on waveform features \(features."
                                          r"representation=waveform\): leave it out, with augment ingredients among "
                                          r"gain, shift, mixup, noise$"):
        Augment(settings("strong"), representation="waveform")
    with pytest.raises(EsclabError, match=r"^augment.noise does not act on logmel features .* among gain, shift, "
                                          r"mixup, specaugment$"):
        train(compose_config(*tiny_overrides(tiny_data, tmp_path, "augment=noise", "fold=1")))
    assert not (tmp_path / "reports").exists() and not (tmp_path / "mlflow.db").exists()


class WaveProbe(nn.Module):
    """The smallest waveform learner, for this test only: a strided convolution, mean over time, linear."""

    def __init__(self, *, n_classes: int, input_shape: tuple[int]):
        super().__init__()
        self.layers = nn.Sequential(nn.Conv1d(1, 8, 64, stride=32), nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten(),
                                    nn.Linear(8, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


@pytest.fixture(scope="module")
def waveform_cache(tiny_data, tmp_path_factory):
    features = compose_config("features=waveform", "features.duration=1.0", "features.num_workers=0").features
    return write_cache(tiny_data["split"], tmp_path_factory.mktemp("waveform") / "features", features)


@pytest.mark.parametrize("augment", ["none", "waveform_strong"])
def test_a_waveform_training_epoch_sees_augmented_batches_only_when_asked(tiny_data, waveform_cache, tmp_path,
                                                                          monkeypatch, augment):
    monkeypatch.setitem(MODELS, "wave_probe", WaveProbe)
    tiny = [o for o in tiny_overrides(tiny_data, tmp_path, "fold=1") if not o.startswith(("features.", "paths.feat"))]
    cfg = compose_config(*tiny, "features=waveform", "features.duration=1.0", f"paths.features={waveform_cache}",
                         f"augment={augment}")
    cfg.model = OmegaConf.create({"name": "wave_probe", "input": "waveform"})
    data = fold_data(cfg, 1)
    module = build_classifier(cfg, data)
    assert module.hparams.preprocessing["representation"] == "waveform"  # from the cache it trains on
    seen = []
    module.model.register_forward_pre_hook(lambda network, args: seen.append(args[0].clone()))
    before = [p.detach().clone() for p in module.parameters()]
    L.Trainer(accelerator="cpu", max_epochs=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False).fit(module, datamodule=data)
    loader = data.train_dataloader()
    loader.sampler.set_epoch(0)
    batches = [x for x, _, _ in loader]
    assert len(seen) == len(batches) > 0 and seen[0].shape == batches[0].shape == (8, 1, 16000)
    assert all(torch.equal(a, b) for a, b in zip(seen, batches)) == (augment == "none")
    assert all(torch.isfinite(x).all() for x in seen)
    assert not any(torch.equal(a, p) for a, p in zip(before, module.parameters()))  # it trained
