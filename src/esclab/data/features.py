"""The features stage: every file decoded once into rows of one float16 array, log-mel or waveform.

Worker processes (one per core, one thread each) decode files with soundfile, mix
to mono, resample, cut each file's clips (the file padded or trimmed, or its windows:
`features.clips`, data/clips.py), apply the representation's transform with torch on
the chosen device (on a GPU each worker holds its own CUDA context) and write the
rows straight into the memory-mapped output. The result is `logmel.npy` (clips x
n_mels x frames) or `waveform.npy` (clips x samples, data/waveforms.py), float16,
rows in split-table order (a file's windows one after another), read memory-mapped at
train time; `index.csv` (the split table's rows, one per clip, same order; with windows
each has its `start`) and `features.json` (the settings that made it, to detect a stale cache).
"""

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

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

    The slaney mel scale and filter norm and zero padding at the edges match
    librosa's defaults. The channel axis matters: torchaudio floors top_db over
    everything but the leading axis, so (batch, 1, ...) floors each clip on its own.
    """

    def __init__(self, settings: LogMelSettings):
        super().__init__()
        s = settings
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=s.sample_rate, n_fft=s.n_fft, hop_length=s.hop_length, n_mels=s.n_mels,
            f_min=s.f_min, f_max=s.f_max, power=2.0, center=True, pad_mode="constant",
            norm="slaney", mel_scale="slaney",
        )
        self.to_db = torchaudio.transforms.AmplitudeToDB(stype="power", top_db=s.top_db)
        self.per_clip = s.normalize == "per_clip"

    def forward(self, waveforms: torch.Tensor) -> torch.Tensor:
        db = self.to_db(self.mel(waveforms))
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
        mono = torchaudio.functional.resample(torch.from_numpy(mono), rate, sample_rate).numpy()
    return np.stack([pad_or_trim(mono[round(start * sample_rate):], n_samples) for start in starts])


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


# Each worker process keeps its own view of the output file and its own transform.
_worker: dict = {}


def _start_worker(npy_path: Path, settings, device: torch.device, batch_size: int, threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)
    _worker.update(out=np.load(npy_path, mmap_mode="r+"), transform=settings.transform().to(device),
                   settings=settings, device=device, batch_size=batch_size)


def _fill_rows(job: tuple[int, list[tuple[str, list[float]]]]) -> int:
    """Decode a run of files and write their clips' transformed rows straight into the shared output file, from
    row `first` on, `batch_size` clips per transform call (a long file's many windows too)."""
    first, files = job
    s, size = _worker["settings"], _worker["batch_size"]
    waves = np.concatenate([load_clips(path, sample_rate=s.sample_rate, n_samples=s.n_samples, starts=starts)
                            for path, starts in files])
    for start in range(0, len(waves), size):
        with torch.inference_mode():
            rows = _worker["transform"](torch.from_numpy(waves[start:start + size]).to(_worker["device"]).unsqueeze(1))
        _worker["out"][first + start:first + start + len(rows)] = rows.squeeze(1).to(torch.float16).cpu().numpy()
    return len(files)


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


def compute_rows(files: list[tuple[str, list[float]]], settings, npy_path: Path, *,
                 device: torch.device, batch_size: int, num_workers: int) -> None:
    """Fill the .npy at `npy_path` (one row per clip start of `files` x settings.row_shape, already allocated) in
    row order.

    Worker processes each decode and transform runs of about `batch_size` clips and write
    them into the memory-mapped file themselves, so no audio crosses a pipe.
    """
    jobs = runs_of_files(files, batch_size)
    with tqdm(total=len(files), desc="features", unit="file") as bar:
        if num_workers == 0:  # everything in this process: slower, but easy to debug
            _start_worker(npy_path, settings, device, batch_size, threads=None)
            done = map(_fill_rows, jobs)
        else:  # one thread per process: the processes already fill the cores
            pool = get_context("spawn").Pool(num_workers, _start_worker, (npy_path, settings, device, batch_size, 1))
            done = pool.imap_unordered(_fill_rows, jobs)
        try:
            for count in done:
                bar.update(count)
        finally:
            if num_workers:
                pool.terminate()


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
        np.lib.format.open_memmap(tmp / settings.array, mode="w+", dtype=np.float16, shape=shape).flush()
        compute_rows(file_starts(table), settings, tmp / settings.array, device=torch_device,
                     batch_size=batch_size, num_workers=num_workers)
        array = np.load(tmp / settings.array, mmap_mode="r")
        if not np.isfinite(array).all():
            raise EsclabError(f"{settings.array} of {split_csv} overflowed float16; {settings.overflow_fix}")
        del array
        table.to_csv(tmp / "index.csv", index=False)
        meta = settings.described() | {"shape": list(shape), "dtype": "float16"}
        (tmp / "features.json").write_text(json.dumps(meta, indent=2) + "\n")
    log.info("features: %d files, %d clips -> %s float16 array in %s", table["path"].nunique(), len(table), shape,
             out_dir)
    return out_dir
