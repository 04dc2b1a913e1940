"""The features stage: every file decoded once into rows of one float16 array, log-mel or waveform.

Workers (one per core, one torch thread each: forked processes on Linux, threads
elsewhere and with CUDA) decode files with soundfile, mix to mono, resample, cut
each file's clips (the file padded or trimmed, or its windows: `features.clips`,
data/clips.py), apply the representation's transform with torch on the chosen
device and write the rows straight into the memory-mapped output. The
result is `logmel.npy` (clips x n_mels x frames) or `waveform.npy` (clips x samples,
data/waveforms.py), float16, rows in split-table order (a file's windows one after
another), read memory-mapped at train time; `index.csv` (the split table's rows, one
per clip, same order; with windows each has its `start`) and `features.json` (the
settings that made it, to detect a stale cache).
"""

import functools
import json
import logging
import multiprocessing
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torchaudio
from tqdm import tqdm

from esclab.atomic import atomic_dir
from esclab.data.audio import decode, pad_or_trim
from esclab.data.clips import cache_rows, check_clips, file_starts, recorded
from esclab.errors import EsclabError

log = logging.getLogger(__name__)
FLOAT16_MAX = float(np.finfo(np.float16).max)


@dataclass(frozen=True)
class LogMelSettings:
    """What makes a feature cache: changing any of these changes its bytes."""

    sample_rate: int = 44100
    duration: float = 5.0
    n_fft: int = 2048
    hop_length: int = 512
    n_mels: int = 128
    f_min: float = 0.0
    f_max: float | None = None
    top_db: float | None = 80.0
    normalize: str = "none"
    clips: str = "pad"
    hop: float | None = None

    def __post_init__(self):
        for name in ("sample_rate", "n_fft", "hop_length", "n_mels"):
            if getattr(self, name) <= 0:
                raise EsclabError(f"features.{name} must be a positive integer, got {getattr(self, name)}")
        if self.duration <= 0:
            raise EsclabError(f"features.duration must be positive seconds, got {self.duration}")
        if self.normalize not in ("none", "per_clip"):
            raise EsclabError(f"features.normalize must be one of none, per_clip; got {self.normalize!r}")
        check_clips(self.clips, self.hop)

    @classmethod
    def from_config(cls, features) -> "LogMelSettings":
        """The settings among conf/features' keys (the rest say how the work is done, not what it gives)."""
        return cls(**{name: features[name] for name in cls.__dataclass_fields__})

    @property
    def n_samples(self) -> int:
        return round(self.duration * self.sample_rate)

    @property
    def n_frames(self) -> int:
        return 1 + self.n_samples // self.hop_length

    # What the generic writer below needs of a representation's settings.
    array = "logmel.npy"
    overflow_fix = "set features.normalize=per_clip"

    @property
    def row_shape(self) -> tuple[int, ...]:
        return (self.n_mels, self.n_frames)

    def transform(self) -> torch.nn.Module:
        return LogMel(self)

    def described(self) -> dict:
        """features.json's description of the cache (a log-mel cache's is the oldest: it names no representation)."""
        return {"settings": recorded(asdict(self))}


class LogMel(torch.nn.Module):
    """Waveforms (batch, 1, samples) -> log-mel in dB (batch, 1, n_mels, frames).

    librosa's log-mel, the seed project's: the power spectrogram of periodic-Hann frames,
    centred and zero-padded at the edges; the slaney mel scale and filter norm; 10 log10 of
    the power (at least 1e-10), floored at top_db below each clip's peak. It agrees with
    torchaudio's MelSpectrogram + AmplitudeToDB to float32 rounding (tests/test_features.py),
    computed for speed (bench/features.py):

    - the power |X|^2 is re^2 + im^2, squared in place, where torchaudio takes the complex
      abs (a hypot per bin, half of its time) and squares it again;
    - the filterbank is applied in blocks of bands, each over only the frequency bins its
      filters cover: most of the dense product multiplies zeros. Each bin's row is
      repeated, for its re^2 and im^2, so the product also adds the two.
    """

    bands_per_block = 32  # fewer, wider blocks multiply more zeros; more, narrower ones make more calls
    amin = 1e-10  # the power floor before the log: -100 dB

    def __init__(self, settings: LogMelSettings):
        super().__init__()
        s = settings
        self.n_fft, self.hop_length, self.top_db = s.n_fft, s.hop_length, s.top_db
        self.register_buffer("window", torch.hann_window(s.n_fft), persistent=False)
        f_max = s.f_max if s.f_max is not None else float(s.sample_rate // 2)  # torchaudio's default
        filters = torchaudio.functional.melscale_fbanks(s.n_fft // 2 + 1, s.f_min, f_max, s.n_mels, s.sample_rate,
                                                        norm="slaney", mel_scale="slaney")  # (bins, n_mels)
        self.register_buffer("filters", filters.repeat_interleave(2, dim=0), persistent=False)  # re, im rows
        self.blocks = []  # (first row, end row, first band, end band)
        for first in range(0, s.n_mels, self.bands_per_block):
            end = min(first + self.bands_per_block, s.n_mels)
            rows = self.filters[:, first:end].any(dim=1).nonzero()
            self.blocks.append((int(rows.min()), int(rows.max()) + 1, first, end) if len(rows) else (0, 0, first, end))
        self.per_clip = s.normalize == "per_clip"

    def forward(self, waveforms: torch.Tensor) -> torch.Tensor:
        padded = torch.nn.functional.pad(waveforms, (self.n_fft // 2, self.n_fft // 2))
        spectrum = torch.fft.rfft(padded.unfold(-1, self.n_fft, self.hop_length) * self.window)  # (.., frames, bins)
        squares = torch.view_as_real(spectrum).flatten(-2).square_()  # (.., frames, bins x [re, im])
        mel = torch.cat([squares[..., row:end_row] @ self.filters[row:end_row, band:end_band]
                         for row, end_row, band, end_band in self.blocks], dim=-1).transpose(-1, -2)
        db = 10 * torch.log10(mel.clamp_min(self.amin))
        if self.top_db is not None:
            db = torch.maximum(db, db.amax(dim=(-2, -1), keepdim=True) - self.top_db)
        if self.per_clip:
            mean = db.mean(dim=(-2, -1), keepdim=True)
            std = db.std(dim=(-2, -1), keepdim=True)
            db = (db - mean) / std.clamp_min(1e-5)
        return db


def fit(mono: np.ndarray, rate: int, *, sample_rate: int, n_samples: int) -> np.ndarray:
    """Resample a mono waveform to `sample_rate`, then zero-pad or trim it to `n_samples`."""
    return cut(mono, rate, sample_rate=sample_rate, n_samples=n_samples, starts=[0.0])[0]


def cut(mono: np.ndarray, rate: int, *, sample_rate: int, n_samples: int, starts: Sequence[float]) -> np.ndarray:
    """A mono waveform's clips (len(starts) x n_samples, float32): resampled to `sample_rate` once, then `n_samples`
    from each start (seconds), zero-padded where the audio ends.

    Cutting after resampling the whole file gives each window's edges the filter response of the audio around
    them, as a padded clip's are, and resamples each file once however many windows it has.
    """
    if rate != sample_rate:
        with torch.inference_mode():
            mono = resampler(rate, sample_rate)(torch.from_numpy(mono)).numpy()
    clips = np.zeros((len(starts), n_samples), dtype=np.float32)
    for clip, start in zip(clips, starts):
        pad_or_trim(mono[round(start * sample_rate):], n_samples, out=clip)
    return clips


@functools.lru_cache
def resampler(rate: int, sample_rate: int) -> torchaudio.transforms.Resample:
    """torchaudio.functional.resample from `rate` to `sample_rate`, its filter made once (a third of its time on a
    5-s clip) instead of once per file; the same samples."""
    return torchaudio.transforms.Resample(rate, sample_rate, dtype=torch.float32)


def load_clips(path: str | Path, *, sample_rate: int, n_samples: int, starts: Sequence[float] = (0.0,)) -> np.ndarray:
    """Decode one file to mono float32 at `sample_rate`: its clips of `n_samples` from each start (seconds; by
    default the one clip from 0, the file zero-padded or trimmed)."""
    return cut(*decode(path), sample_rate=sample_rate, n_samples=n_samples, starts=starts)


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise EsclabError(f"features.device must be one of auto, cpu, cuda; got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise EsclabError("features.device=cuda but no CUDA GPU is visible; use features.device=auto or cpu")
    return torch.device(device)


def runs_of_files(files: list[tuple[str, list[float]]], batch_size: int) -> list[tuple[int, list]]:
    """The workers' jobs: runs of whole files (path, clip starts) of at least `batch_size` clips each (the last
    may have fewer), with the row each run's first clip goes to."""
    jobs, first, run, count = [], 0, [], 0
    for path, starts in files:
        run.append((path, starts))
        count += len(starts)
        if count >= batch_size:
            jobs.append((first, run))
            first, run, count = first + count, [], 0
    return jobs + [(first, run)] if run else jobs


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """torch on one CPU thread for the block, then as before.

    The workers already fill the cores, and one clip's transform gains nothing
    from more threads: on a busy machine, two threads per clip made it ~20x slower.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


_job_runner: Callable[[Any], Any] | None = None  # what a forked worker process runs (workers() installs it)


def _install(runner: Callable[[Any], Any]) -> None:
    global _job_runner
    torch.set_num_threads(1)
    _job_runner = runner


def _run_installed(job: Any) -> Any:
    return _job_runner(job)


@contextmanager
def workers(runner: Callable[[Any], Any], num_workers: int, device: torch.device
            ) -> Iterator[Callable[[list], Iterator]]:
    """A function that maps `runner` over a list of jobs, in order, on `num_workers` workers, each with one torch
    thread; 0 runs every job in the calling thread (easy to debug).

    On Linux with the CPU the workers are processes forked from this one: they inherit
    `runner` and what it holds (the transform, the memory-mapped output), take the jobs
    in chunks and send back only what `runner` returns. A clip's log-mel is some twenty
    torch calls, and the Python around each holds the GIL: on 2 cores two threads ran
    ESC-50 at ~650 clips/s, two forked processes at ~830 (bench/features.py). A fork
    costs milliseconds, where spawning a process that imports torch took ~3 s, about
    what all of ESC-50 takes. With CUDA (a forked child cannot use it once the parent
    has) and on other systems (where fork is unsafe or missing) they are threads.
    The processes are forked when the returned function is first called, so call it
    before starting threads of your own (a progress bar's monitor).
    """
    if not num_workers:
        with one_torch_thread():
            yield lambda jobs: map(runner, jobs)
        return
    if device.type == "cpu" and sys.platform == "linux":
        pool = ProcessPoolExecutor(num_workers, mp_context=multiprocessing.get_context("fork"),
                                   initializer=_install, initargs=(runner,))
        runner = _run_installed
    else:
        pool = ThreadPoolExecutor(num_workers)
    with one_torch_thread():
        try:
            # Chunks amortise the trips between processes and leave each worker several, to even out their ends.
            yield lambda jobs: pool.map(runner, jobs, chunksize=max(1, len(jobs) // (8 * num_workers)))
        finally:
            pool.shutdown(cancel_futures=True)  # after an error, start no more jobs


def compute_rows(files: list[tuple[str, list[float]]], settings, out: np.ndarray, array: str, *,
                 device: torch.device, batch_size: int, num_workers: int) -> None:
    """Fill `out` (one row per clip start of `files` x settings.row_shape, float16, memory-mapped) in row order.

    The workers (see `workers`) each decode and transform runs of about `batch_size`
    clips and write them into `out` themselves: a shared mapping of the file, which
    processes write as threads do. A row that overflows float16 stops the stage,
    naming `array`.
    """
    transform = settings.transform().to(device)

    def fill(job: tuple[int, list[tuple[str, list[float]]]]) -> int:
        first, run = job
        clips = [load_clips(path, sample_rate=settings.sample_rate, n_samples=settings.n_samples, starts=starts)
                 for path, starts in run]
        waves = clips[0] if len(clips) == 1 else np.concatenate(clips)  # a run is one file on a CPU: no copy
        for start in range(0, len(waves), batch_size):
            with torch.inference_mode():
                rows = transform(torch.from_numpy(waves[start:start + batch_size]).to(device).unsqueeze(1))
            low, high = torch.aminmax(rows)
            if not (low >= -FLOAT16_MAX and high <= FLOAT16_MAX):  # also false for NaN
                raise EsclabError(f"{array} overflowed float16; {settings.overflow_fix}")
            out[first + start:first + start + len(rows)] = rows.squeeze(1).to(torch.float16).cpu().numpy()
        return len(run)

    with workers(fill, num_workers, device) as run:
        counts = run(runs_of_files(files, batch_size))
        with tqdm(total=len(files), desc="features", unit="file") as bar:
            for count in counts:
                bar.update(count)


def write_features(split_csv: Path, out_dir: Path, settings, *, device: str = "auto",
                   batch_size: int | None = None, num_workers: int | None = None) -> Path:
    """The features stage: read the split table, write the settings' array + index.csv + features.json.

    `settings` is a LogMelSettings or a WaveformSettings (data/waveforms.py): each names
    its array file, its row shape, its torch transform and its description.
    """
    table = cache_rows(pd.read_csv(split_csv), settings)
    torch_device = pick_device(device)
    if batch_size is None:
        # Measured on 2 CPU cores: one 5-s clip per call ran ~7x faster than 64 per call
        # (cache-bound STFT); a GPU only pays off with large batches.
        batch_size = 256 if torch_device.type == "cuda" else 1
    if batch_size <= 0:
        raise EsclabError(f"features.batch_size must be positive or null, got {batch_size}")
    if num_workers is None:
        num_workers = os.cpu_count() or 1
    shape = (len(table), *settings.row_shape)
    with atomic_dir(out_dir) as tmp:
        out = np.lib.format.open_memmap(tmp / settings.array, mode="w+", dtype=np.float16, shape=shape)
        compute_rows(file_starts(table), settings, out, f"{settings.array} of {split_csv}", device=torch_device,
                     batch_size=batch_size, num_workers=num_workers)
        del out  # readers see the rows through the page cache; a flush would wait for the disk (nothing is fsynced)
        table.to_csv(tmp / "index.csv", index=False)
        meta = settings.described() | {"shape": list(shape), "dtype": "float16"}
        (tmp / "features.json").write_text(json.dumps(meta, indent=2) + "\n")
    log.info("features: %d files, %d clips -> %s float16 array in %s", table["path"].nunique(), len(table), shape,
             out_dir)
    return out_dir
