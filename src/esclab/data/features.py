"""The features stage: every clip decoded once into one float16 array, log-mel or waveform.

Worker processes (one per core, one thread each) decode clips with soundfile, mix
to mono, resample, pad or trim, apply the representation's transform with torch on
the chosen device (on a GPU each worker holds its own CUDA context) and write the
rows straight into the memory-mapped output. The result is `logmel.npy` (clips x
n_mels x frames) or `waveform.npy` (clips x samples, data/waveforms.py), float16,
rows in split-table order, read memory-mapped at train time; `index.csv` (the split
table rows, same order) and `features.json` (the settings that made it, to detect a
stale cache).
"""

import json
import logging
import os
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

    def __post_init__(self):
        for name in ("sample_rate", "n_fft", "hop_length", "n_mels"):
            if getattr(self, name) <= 0:
                raise EsclabError(f"features.{name} must be a positive integer, got {getattr(self, name)}")
        if self.duration <= 0:
            raise EsclabError(f"features.duration must be positive seconds, got {self.duration}")
        if self.normalize not in ("none", "per_clip"):
            raise EsclabError(f"features.normalize must be one of none, per_clip; got {self.normalize!r}")

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
        return {"settings": asdict(self)}


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
    if rate != sample_rate:
        mono = torchaudio.functional.resample(torch.from_numpy(mono), rate, sample_rate).numpy()
    return pad_or_trim(mono, n_samples)


def load_clip(path: str | Path, *, sample_rate: int, n_samples: int) -> np.ndarray:
    """Decode one file to mono float32 at `sample_rate`, zero-padded or trimmed to `n_samples`."""
    return fit(*decode(path), sample_rate=sample_rate, n_samples=n_samples)


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


def _start_worker(npy_path: Path, settings, device: torch.device, threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)
    _worker.update(out=np.load(npy_path, mmap_mode="r+"), transform=settings.transform().to(device),
                   settings=settings, device=device)


def _fill_rows(job: tuple[int, list[str]]) -> int:
    """Decode a run of clips and write their transformed rows straight into the shared output file."""
    start, paths = job
    s = _worker["settings"]
    waves = np.stack([load_clip(p, sample_rate=s.sample_rate, n_samples=s.n_samples) for p in paths])
    with torch.inference_mode():
        mels = _worker["transform"](torch.from_numpy(waves).to(_worker["device"]).unsqueeze(1))
    _worker["out"][start:start + len(paths)] = mels.squeeze(1).to(torch.float16).cpu().numpy()
    return len(paths)


def compute_rows(paths: list[str], settings, npy_path: Path, *,
                 device: torch.device, batch_size: int, num_workers: int) -> None:
    """Fill the .npy at `npy_path` (len(paths) x settings.row_shape, already allocated) in row order.

    Worker processes each decode and transform runs of `batch_size` clips and write
    them into the memory-mapped file themselves, so no audio crosses a pipe.
    """
    jobs = [(i, paths[i:i + batch_size]) for i in range(0, len(paths), batch_size)]
    with tqdm(total=len(paths), desc="features", unit="clip") as bar:
        if num_workers == 0:  # everything in this process: slower, but easy to debug
            _start_worker(npy_path, settings, device, threads=None)
            done = map(_fill_rows, jobs)
        else:  # one thread per process: the processes already fill the cores
            pool = get_context("spawn").Pool(num_workers, _start_worker, (npy_path, settings, device, 1))
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
    table = pd.read_csv(split_csv)
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
        compute_rows(table["path"].tolist(), settings, tmp / settings.array, device=torch_device,
                     batch_size=batch_size, num_workers=num_workers)
        array = np.load(tmp / settings.array, mmap_mode="r")
        if not np.isfinite(array).all():
            raise EsclabError(f"{settings.array} of {split_csv} overflowed float16; {settings.overflow_fix}")
        del array
        table.to_csv(tmp / "index.csv", index=False)
        meta = settings.described() | {"shape": list(shape), "dtype": "float16"}
        (tmp / "features.json").write_text(json.dumps(meta, indent=2) + "\n")
    log.info("features: %d clips -> %s float16 array in %s", len(table), shape, out_dir)
    return out_dir
