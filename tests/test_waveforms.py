"""The waveform representation: the decoded audio of every clip, in split order, through the features stage."""

import json

import librosa
import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
from conftest import compose_config

from esclab.data.representations import cache_settings, check_learner, write_cache
from esclab.errors import EsclabError
from esclab.training.data import FoldData, check_cache

WAVEFORM = ("features=waveform", "features.duration=1.5", "features.num_workers=0")


@pytest.fixture(scope="module")
def split_csv(tiny_data):
    """The tiny dataset's split table (conftest's, shared by the session)."""
    return tiny_data["split"]


@pytest.fixture(scope="module")
def cache(split_csv, tmp_path_factory):
    return write_cache(split_csv, tmp_path_factory.mktemp("waveform") / "features", compose_config(*WAVEFORM).features)


def test_rows_are_each_clips_audio_resampled_padded_and_in_split_order(cache, split_csv):
    array = np.load(cache / "waveform.npy", mmap_mode="r")
    table = pd.read_csv(split_csv)
    assert array.shape == (len(table), 24000) and array.dtype == np.float16
    pd.testing.assert_frame_equal(pd.read_csv(cache / "index.csv"), table)
    meta = json.loads((cache / "features.json").read_text())
    assert meta == {"representation": "waveform", "array": "waveform.npy",
                    "settings": {"sample_rate": 16000, "duration": 1.5}, "shape": [len(table), 24000],
                    "dtype": "float16"}
    for row in (0, 11, len(table) - 1):
        audio, rate = sf.read(table["path"][row], dtype="float32")
        expected = librosa.resample(audio, orig_sr=rate, target_sr=16000) if rate != 16000 else audio
        expected = np.pad(expected, (0, max(0, 24000 - len(expected))))[:24000]
        assert np.abs(array[row].astype(np.float32) - expected).max() < 2e-3 + 0.05 * (rate != 16000)
    assert not np.array_equal(array[0], array[1])


def test_a_rebuilt_cache_is_byte_identical_with_or_without_workers(cache, split_csv, tmp_path):
    again = write_cache(split_csv, tmp_path / "features",
                        compose_config(*WAVEFORM[:2], "features.num_workers=2").features)
    for name in ("waveform.npy", "index.csv", "features.json"):
        assert (again / name).read_bytes() == (cache / name).read_bytes(), name


def test_another_rate_makes_the_cache_stale_and_a_log_mel_learner_is_refused(cache):
    check_cache(cache, "waveform", cache_settings(compose_config(*WAVEFORM).features))
    with pytest.raises(EsclabError, match=r"features.sample_rate=44100 \(cache has 16000\)"):
        check_cache(cache, "waveform", cache_settings(compose_config(*WAVEFORM, "features.sample_rate=44100").features))
    with pytest.raises(EsclabError, match="holds waveform features, but features.representation=logmel"):
        check_cache(cache, "logmel", cache_settings(compose_config().features))
    cfg = compose_config(*WAVEFORM, "model=cnn4")
    with pytest.raises(EsclabError, match="model=cnn4 reads logmel features, but features.representation=waveform: "
                                          "choose features=logmel"):
        check_learner(cfg.model, cfg.features)


def test_bad_settings_are_refused_by_name():
    with pytest.raises(EsclabError, match="features.duration must be positive"):
        cache_settings(compose_config(*WAVEFORM[:1], "features.duration=0").features)


def test_fold_data_serves_the_rows_memory_mapped(cache):
    data = FoldData(cache, test_fold=2, normalize="none")
    data.setup()
    assert data.input_shape == (24000,)
    x, label, row = next(iter(data.test_dataloader()))
    assert x.shape == (5, 1, 24000) and x.dtype == torch.float32  # a 5-clip fold
    assert set(data.index["fold"].to_numpy()[row.numpy()]) == {2}
