"""aiSFX with its real weights (from the aisfx wheel), offline: the port equals the package's own code, bad weights."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from esclab.checksums import sha256_of
from esclab.errors import EsclabError
from esclab.models.backbones import aisfx
from esclab.models.backbones.aisfx import AiSfx

SR = aisfx.SAMPLE_RATE


@pytest.fixture(scope="module")
def model() -> AiSfx:
    return AiSfx()


def tone_in_noise(duration: float, seed: int = 0) -> np.ndarray:
    t = np.arange(int(duration * SR)) / SR
    noise = np.random.default_rng(seed).normal(0, 0.05, t.size)
    return (0.3 * np.sin(2 * np.pi * 440 * t) + noise).astype(np.float32)


def test_the_port_gives_the_packages_own_embeddings(model, tmp_path):
    """The wheel's code (its librosa front end, blocking and network class), run on the same clip and weights."""
    from aisfx.models.cnn2d import EmbeddingNet
    from aisfx.preprocessing import blocking, spectrogram_normalize
    from aisfx.spectrogram.spectrogram_librosa import compute_spectrogram

    waveform = tone_in_noise(5.0)
    path = tmp_path / "clip.wav"
    sf.write(path, waveform, SR, subtype="FLOAT")
    spectrogram = spectrogram_normalize(compute_spectrogram(str(path), SR, aisfx.N_FFT, aisfx.HOP, aisfx.N_MELS,
                                                            0.0, SR / 2).T)  # it returns bands x frames
    reference_blocks = blocking(spectrogram, aisfx.BLOCK, aisfx.BLOCK_HOP, drop_partial_block=False)
    ours = aisfx.blocks(waveform, aisfx.mel_filters())
    assert ours.shape == (4, 1, aisfx.BLOCK, aisfx.N_MELS)
    assert np.allclose(ours[:, 0].numpy(), reference_blocks, atol=1e-5)

    reference = EmbeddingNet("max", 3, 1, 64)
    reference.load_state_dict(model.network.state_dict())
    with torch.no_grad():
        expected = reference.eval()(torch.as_tensor(reference_blocks, dtype=torch.float32)).numpy()
    embeddings, scores = model(waveform)
    assert scores is None and embeddings.shape == (4, aisfx.EMBEDDING_DIM) and embeddings.dtype == np.float32
    assert np.allclose(embeddings, expected, atol=1e-4)


def test_the_loaded_weights_are_the_checkpoints():
    """Every layer of the embedding network comes from the file (none left at its random initialisation)."""
    loaded = aisfx.load_network(aisfx.WEIGHTS.package_file()).state_dict()
    fresh = aisfx.EmbeddingNet().state_dict()
    assert loaded.keys() == fresh.keys()
    weights = [k for k in loaded if k.endswith("weight")]
    assert weights and all(not torch.equal(loaded[k], fresh[k]) for k in weights)


@pytest.mark.parametrize(("duration", "n_blocks"), [(5.0, 4), (2.3, 1), (0.2, 1), (3.0, 2)])
def test_blocks_every_1_16_s_and_a_short_clip_is_padded_to_one(model, duration, n_blocks):
    embeddings, _ = model(tone_in_noise(duration))
    assert embeddings.shape == (n_blocks, aisfx.EMBEDDING_DIM) and np.isfinite(embeddings).all()
    assert len(AiSfx.window_centres(n_blocks)) == n_blocks


def test_silence_and_clipped_audio_give_finite_embeddings(model):
    assert np.isfinite(model(np.zeros(SR, dtype=np.float32))[0]).all()
    clipped = np.clip(tone_in_noise(2.0) * 20, -1, 1)
    assert np.isfinite(model(clipped)[0]).all()


def test_loudness_does_not_change_the_embedding(model):
    """The front end scales each clip to a peak of 1, as the package's does."""
    waveform = tone_in_noise(2.0)
    assert np.allclose(model(waveform)[0], model(0.1 * waveform)[0], atol=1e-4)


def test_embeddings_are_the_same_on_every_call(model):
    waveform = tone_in_noise(3.0, seed=2)
    assert np.array_equal(model(waveform)[0], model(waveform)[0])


@pytest.mark.parametrize("damage", ["truncated", "not a checkpoint"])
def test_a_damaged_weights_file_is_refused_with_both_hashes(tmp_path, damage):
    bad = tmp_path / "checkpoint.pth"
    data = aisfx.WEIGHTS.package_file().read_bytes()
    bad.write_bytes(data[: len(data) // 3] if damage == "truncated" else b"plain text")
    with pytest.raises(EsclabError) as err:
        AiSfx(bad)
    message = str(err.value)
    assert str(bad) in message and aisfx.WEIGHTS.setting in message and "aisfx==0.1.2" in message
    assert aisfx.WEIGHTS.sha256 in message and sha256_of(bad) in message and "\n" not in message


def test_missing_weights_name_the_setting_and_the_package(tmp_path):
    with pytest.raises(EsclabError, match="features.weights.aisfx.*aisfx==0.1.2"):
        AiSfx(tmp_path / "nowhere.pth")


def test_a_good_copy_elsewhere_is_accepted(tmp_path, model):
    copy = Path(shutil.copy(aisfx.WEIGHTS.package_file(), tmp_path / "copy.pth"))
    waveform = tone_in_noise(1.0, seed=3)
    assert np.array_equal(AiSfx(copy)(waveform)[0], model(waveform)[0])
