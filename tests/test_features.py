"""The features stage: one float16 array in split order that matches librosa's log-mel."""

import json
import os
import sys
import threading

import librosa
import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
import torchaudio

from esclab.data.audio import decode
from esclab.data.features import LogMel, LogMelSettings, load_clips, workers, write_features
from esclab.data.split import write_split
from esclab.data.waveforms import WaveformSettings
from esclab.errors import EsclabError

SETTINGS = LogMelSettings(sample_rate=16000, duration=1.0, n_fft=512, hop_length=128, n_mels=32)
# float16 keeps ~3 significant digits: 0.03 dB steps below 64 dB, 0.06 dB below 128 dB.
# The rest of the tolerance covers float32 FFT differences between torch and numpy.
TOLERANCE_DB = 0.1


@pytest.fixture
def split_csv(raw, tmp_path):
    out = tmp_path / "split.csv"
    write_split(raw, out, n_classes=5, n_folds=5, esc10_only=False)
    return out


def build(split_csv, out_dir, settings=SETTINGS, **kwargs):
    kwargs.setdefault("num_workers", 0)
    write_features(split_csv, out_dir, settings, device="cpu", **kwargs)
    return np.load(out_dir / "logmel.npy", mmap_mode="r")


def librosa_logmel(path, s: LogMelSettings):
    y, sr = librosa.load(path, sr=s.sample_rate, mono=True, duration=s.duration)
    y = np.pad(y, (0, s.n_samples - len(y)))
    power = librosa.feature.melspectrogram(y=y, sr=sr, n_fft=s.n_fft, hop_length=s.hop_length, n_mels=s.n_mels,
                                           fmin=s.f_min, fmax=s.f_max, center=True, pad_mode="constant", power=2.0)
    return librosa.power_to_db(power, ref=1.0, amin=1e-10, top_db=s.top_db)


@pytest.mark.parametrize("settings", [SETTINGS, LogMelSettings(sample_rate=16000, duration=0.5, n_fft=400,
                                                                   hop_length=160, n_mels=80, f_min=50.0, f_max=7000.0,
                                                                   top_db=None)])
def test_log_mel_is_torchaudios_to_float32_rounding(settings):
    """LogMel's power (re^2 + im^2) and filterbank (in blocks of bands) are torchaudio's, computed faster."""
    loudness = torch.tensor([1.0, 1e-2, 1e-4]).view(3, 1, 1)  # the dB floor and the -100 dB amin both in play
    waves = torch.randn(3, 1, settings.n_samples, generator=torch.Generator().manual_seed(0)) * loudness
    s = settings
    mel = torchaudio.transforms.MelSpectrogram(s.sample_rate, n_fft=s.n_fft, hop_length=s.hop_length, f_min=s.f_min,
                                               f_max=s.f_max, n_mels=s.n_mels, pad_mode="constant", norm="slaney",
                                               mel_scale="slaney")
    expected = torchaudio.transforms.AmplitudeToDB(top_db=s.top_db)(mel(waves))
    assert torch.abs(LogMel(settings)(waves) - expected).max() < 1e-3


def test_16_bit_pcm_decodes_to_libsndfiles_own_float_values(tmp_path):
    samples = np.random.default_rng(0).integers(-2**15, 2**15, (1000, 2), dtype=np.int16)
    samples[:2] = [[-2**15, 2**15 - 1], [2**15 - 1, -2**15]]
    sf.write(tmp_path / "pcm16.wav", samples, 16000, subtype="PCM_16")
    mono, rate = decode(tmp_path / "pcm16.wav")
    expected = sf.read(tmp_path / "pcm16.wav", dtype="float32")[0].mean(axis=1)
    assert rate == 16000 and mono.dtype == np.float32 and mono.tobytes() == expected.tobytes()


def test_array_shape_dtype_index_and_settings(split_csv, tmp_path):
    array = build(split_csv, tmp_path / "features")
    table = pd.read_csv(split_csv)
    assert array.dtype == np.float16
    assert array.shape == (len(table), 32, 1 + 16000 // 128)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "features" / "index.csv"), table)
    meta = json.loads((tmp_path / "features" / "features.json").read_text())
    assert meta["settings"]["n_mels"] == 32 and meta["shape"] == list(array.shape)


def test_every_row_matches_librosa_for_its_own_clip(split_csv, tmp_path):
    # Row i must be clip i of the split table (order) and equal librosa's log-mel (values).
    array = build(split_csv, tmp_path / "features", num_workers=2)
    paths = pd.read_csv(split_csv)["path"]
    for i in (0, 7, len(paths) - 1):
        expected = librosa_logmel(paths[i], SETTINGS)
        assert np.abs(array[i].astype(np.float32) - expected).max() < TOLERANCE_DB
    assert np.abs(array[0].astype(np.float32) - librosa_logmel(paths[1], SETTINGS)).max() > 1.0


def test_batch_size_does_not_change_a_byte(split_csv, tmp_path):
    one = np.asarray(build(split_csv, tmp_path / "a", batch_size=1))
    many = np.asarray(build(split_csv, tmp_path / "b", batch_size=7))
    assert one.tobytes() == many.tobytes()


def test_per_clip_normalisation(split_csv, tmp_path):
    settings = LogMelSettings(**{**SETTINGS.__dict__, "normalize": "per_clip"})
    array = build(split_csv, tmp_path / "features", settings).astype(np.float32)
    assert np.allclose(array.mean(axis=(1, 2)), 0, atol=0.01)
    assert np.allclose(array.std(axis=(1, 2)), 1, atol=0.01)


def test_stereo_48k_8bit_is_mixed_resampled_and_converted(tmp_path):
    t = np.arange(48000) / 48000
    left, right = 0.5 * np.sin(2 * np.pi * 440 * t), 0.5 * np.sin(2 * np.pi * 880 * t)
    sf.write(tmp_path / "odd.wav", np.stack([left, right], axis=1), 48000, subtype="PCM_U8")
    clip = load_clips(tmp_path / "odd.wav", sample_rate=16000, n_samples=16000)[0]
    spectrum = np.abs(np.fft.rfft(clip))
    assert clip.dtype == np.float32 and clip.shape == (16000,)
    assert {round(f) for f in np.argsort(spectrum)[-2:]} == {440, 880}  # 1 Hz bins: both channels kept


def test_short_clip_is_zero_padded_and_long_clip_trimmed(tmp_path):
    sf.write(tmp_path / "short.wav", np.full(4000, 0.25), 16000)
    sf.write(tmp_path / "long.wav", np.full(40000, 0.25), 16000)
    short = load_clips(tmp_path / "short.wav", sample_rate=16000, n_samples=16000)[0]
    long = load_clips(tmp_path / "long.wav", sample_rate=16000, n_samples=16000)[0]
    assert np.allclose(short[:4000], 0.25) and not short[4000:].any()
    assert long.shape == (16000,) and np.allclose(long, 0.25)


@pytest.mark.parametrize("content", [b"", b"this is not audio at all" * 10])
def test_undecodable_file_is_named(tmp_path, content):
    (tmp_path / "bad.wav").write_bytes(content)
    with pytest.raises(EsclabError, match="bad.wav"):
        load_clips(tmp_path / "bad.wav", sample_rate=16000, n_samples=16000)[0]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_failed_build_leaves_no_output(split_csv, tmp_path, num_workers):
    """The same one-line error whether the file failed in this process or in a worker."""
    table = pd.read_csv(split_csv)
    with open(table["path"][3], "r+b") as f:
        f.truncate(20)  # a WAV cut inside its header
    with pytest.raises(EsclabError, match=f"^cannot decode {table['path'][3]} .*; replace the file"):
        build(split_csv, tmp_path / "features", num_workers=num_workers)
    assert list(tmp_path.glob("*features*")) == []


@pytest.mark.skipif(sys.platform != "linux", reason="forked worker processes are Linux's; elsewhere they are threads")
def test_cpu_workers_are_forked_processes_that_return_in_job_order():
    parent, local = os.getpid(), "made after import, inherited by the fork, never pickled"
    with workers(lambda job: (job, os.getpid(), local), 2, torch.device("cpu")) as run:
        results = list(run(list(range(40))))
    assert [job for job, _, _ in results] == list(range(40))
    pids = {pid for _, pid, _ in results}
    assert parent not in pids and 1 <= len(pids) <= 2
    assert {text for _, _, text in results} == {local}
    with workers(lambda job: os.getpid(), 0, torch.device("cpu")) as run:
        assert set(run([1, 2])) == {parent}


def test_cuda_workers_are_threads_of_this_process():
    """A forked child cannot use CUDA once its parent has; the device only picks the pool here, nothing runs on it."""
    with workers(lambda job: (job, os.getpid(), threading.get_ident()), 2, torch.device("cuda")) as run:
        results = list(run(list(range(40))))
    assert [job for job, _, _ in results] == list(range(40))
    assert {pid for _, pid, _ in results} == {os.getpid()}
    assert threading.get_ident() not in {thread for _, _, thread in results}


@pytest.mark.parametrize("key", ["n_mels", "hop_length"])
def test_non_positive_setting_is_refused(key):
    with pytest.raises(EsclabError, match=f"features.{key} must be a positive integer, got 0"):
        LogMelSettings(**{key: 0})


def test_nan_samples_are_refused_naming_the_file(tmp_path):
    samples = np.zeros(16000, dtype=np.float32)
    samples[100] = np.nan
    sf.write(tmp_path / "nan.wav", samples, 16000, subtype="FLOAT")
    with pytest.raises(EsclabError, match="nan.wav decodes to NaN or infinite samples"):
        load_clips(tmp_path / "nan.wav", sample_rate=16000, n_samples=16000)[0]


@pytest.mark.parametrize("normalize", ["none", "per_clip"])
def test_all_zero_clip_gives_a_finite_floor_row(split_csv, tmp_path, normalize):
    """Digital silence is a real ESC-50 case: it becomes the -100 dB floor (0 after per-clip scaling), never NaN."""
    table = pd.read_csv(split_csv)
    sf.write(table["path"][0], np.zeros(16000, dtype=np.int16), 16000, subtype="PCM_16")
    array = build(split_csv, tmp_path / "features", LogMelSettings(**{**SETTINGS.__dict__, "normalize": normalize}))
    assert np.isfinite(array).all()
    assert np.unique(array[0]).tolist() == ([-100.0] if normalize == "none" else [0.0])


def test_rebuilt_cache_is_byte_identical(split_csv, tmp_path):
    build(split_csv, tmp_path / "a", num_workers=0)
    build(split_csv, tmp_path / "b", num_workers=2)
    for name in ("logmel.npy", "index.csv", "features.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_a_row_that_overflows_float16_stops_the_stage_naming_the_array_and_leaves_no_output(split_csv, tmp_path):
    table = pd.read_csv(split_csv)
    sf.write(table["path"][2], np.full(16000, 1e5, dtype=np.float32), 16000, subtype="FLOAT")  # beyond float16's 65504
    with pytest.raises(EsclabError, match="waveform.npy of .*split.csv overflowed float16; a decoded sample exceeds"):
        write_features(split_csv, tmp_path / "features", WaveformSettings(duration=1.0), device="cpu", num_workers=2)
    assert list(tmp_path.glob("*features*")) == []
