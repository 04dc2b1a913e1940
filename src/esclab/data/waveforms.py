"""The waveform representation: every clip decoded once, as the audio itself, for learners that read audio.

`waveform.npy` holds clips x samples, float16, rows in split-table order: mono,
resampled to `features.sample_rate` (16 kHz by default, the rate of the pretrained
speech and audio models), zero-padded or trimmed to `features.duration`, or cut into
windows of that length (`features.clips=windows`, data/clips.py). It is
written by the same worker pool as the log-mel (data/features.py), with no transform.
float16 keeps 11 bits of mantissa relative to each sample, a quantisation noise
about 66 dB below the signal at any level, and halves the cache; the model widens
the rows to float32.
"""

from dataclasses import asdict, dataclass

import torch

from esclab.data.clips import check_clips, recorded
from esclab.errors import EsclabError


@dataclass(frozen=True)
class WaveformSettings:
    """What makes a waveform cache: changing any of these changes its bytes."""

    sample_rate: int = 16000
    duration: float = 5.0
    clips: str = "pad"
    hop: float | None = None

    def __post_init__(self):
        if self.sample_rate <= 0:
            raise EsclabError(f"features.sample_rate must be a positive integer, got {self.sample_rate}")
        if self.duration <= 0:
            raise EsclabError(f"features.duration must be positive seconds, got {self.duration}")
        check_clips(self.clips, self.hop)

    @classmethod
    def from_config(cls, features) -> "WaveformSettings":
        return cls(sample_rate=features.sample_rate, duration=features.duration, clips=features.clips,
                   hop=features.hop)

    @property
    def n_samples(self) -> int:
        return round(self.duration * self.sample_rate)

    array = "waveform.npy"
    overflow_fix = "a decoded sample exceeds float16's range (65504): check the files' sample format"

    @property
    def row_shape(self) -> tuple[int, ...]:
        return (self.n_samples,)

    def transform(self) -> torch.nn.Module:
        return Samples()

    def described(self) -> dict:
        return {"representation": "waveform", "array": self.array, "settings": recorded(asdict(self))}


class Samples(torch.nn.Module):
    """Waveforms (batch, 1, samples) -> (batch, 1, samples): the audio as decoded."""

    def forward(self, waveforms: torch.Tensor) -> torch.Tensor:
        return waveforms
