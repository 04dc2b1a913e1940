"""Decoding and resampling audio with numpy and soundfile only (no torch), so that a small device can run them too."""

import math
from pathlib import Path
from typing import BinaryIO

import numpy as np
import soundfile as sf

from esclab.errors import EsclabError


def decode(source: str | Path | BinaryIO, fix: str = "replace the file, or remove it and its row from meta/esc50.csv",
           name: str | None = None) -> tuple[np.ndarray, int]:
    """Decode one file, or file-like object (called `name` in messages), to mono float32 at its own rate; a file that
    holds no usable audio is refused with `fix`."""
    name = name or str(source)
    try:
        with sf.SoundFile(source) as file:
            (audio, from_integers), rate = _samples(file), file.samplerate
    except (sf.LibsndfileError, RuntimeError, OSError) as err:
        raise EsclabError(f"cannot decode {name} ({err}); {fix}") from None
    if audio.shape[0] == 0:
        raise EsclabError(f"{name} holds no audio samples; {fix}")
    mono = audio[:, 0] if audio.shape[1] == 1 else audio.mean(axis=1, dtype=np.float32)
    if not from_integers and not np.isfinite(mono).all():  # scaled integers always are
        raise EsclabError(f"{name} decodes to NaN or infinite samples; {fix}")
    return mono, rate


def _samples(file: sf.SoundFile) -> tuple[np.ndarray, bool]:
    """The file's samples (frames x channels), float32 in [-1, 1], and whether they were read as integers.

    16-bit PCM (ESC-50's format, and most WAV files) is read as integers and scaled
    by numpy: the same values libsndfile's own float conversion gives (both multiply
    by 2**-15, which is exact), several times faster.
    """
    if file.subtype == "PCM_16":
        return file.read(dtype="int16", always_2d=True) * np.float32(2**-15), True
    return file.read(dtype="float32", always_2d=True), False


def pad_or_trim(mono: np.ndarray, n_samples: int, out: np.ndarray | None = None) -> np.ndarray:
    """`mono` zero-padded or trimmed to `n_samples`, float32: written into `out` (zeros, a row of a clips array)
    if given, so a file's clips are cut in place rather than stacked after."""
    clip = np.zeros(n_samples, dtype=np.float32) if out is None else out
    clip[:min(n_samples, len(mono))] = mono[:n_samples]
    return clip


def resample(mono: np.ndarray, rate: int, target: int) -> np.ndarray:
    """`mono` from `rate` to `target` Hz with the filter torchaudio.functional.resample uses by default (training's
    resampler), in numpy, for the devices that run exported models without torch (tests/test_export.py checks the two
    agree).

    Each output sample is a Hann-windowed sinc interpolation of the input: the cut-off is 0.99 of the lower Nyquist
    frequency, the sinc is cut after 6 zero crossings on each side. With both rates divided by their greatest common
    divisor (`up` outputs for every `down` inputs), the `up` filters repeat every `down` inputs, so the whole
    resampling is one product of the input's strided frames with an (up x taps) filter bank.
    """
    if rate == target:
        return np.asarray(mono, dtype=np.float32)
    gcd = math.gcd(rate, target)
    down, up = rate // gcd, target // gcd
    zero_crossings, cutoff = 6, min(down, up) * 0.99
    width = math.ceil(zero_crossings * down / cutoff)
    t = (np.arange(-width, width + down) / down)[None, :] - (np.arange(up) / up)[:, None]
    t = np.clip(t * cutoff, -zero_crossings, zero_crossings)
    window = np.cos(t * math.pi / zero_crossings / 2) ** 2
    filters = np.sinc(t) * window * cutoff / down  # (up, taps)
    padded = np.pad(np.asarray(mono, dtype=np.float64), (width, width + down))
    frames = np.lib.stride_tricks.sliding_window_view(padded, filters.shape[1])[::down]
    out = (frames @ filters.T).reshape(-1)
    return out[:math.ceil(up * len(mono) / down)].astype(np.float32)
