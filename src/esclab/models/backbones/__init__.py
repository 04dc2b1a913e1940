"""Pretrained networks used frozen: each turns a waveform into per-window embeddings, from pinned weights.

A backbone class has `name`, `sample_rate`, `pinned` (its PinnedWeights, weights.py, or HubWeights, hub.py:
`pinned.checked(weights) -> (path, sha256)` refuses a file that is not the pinned one),
`window_centres(n) -> seconds` and, once built, `weights` (the file or folder), `sha256`, `source` (the
setting that rebuilds it from exactly these weights: a hub id with its revision, null for a wheel's copy) and
`__call__(waveform) -> (embeddings windows x dim, class scores or None)`.
`features.backbones` picks them by their keys here.
"""

from pathlib import Path

from esclab.models.backbones.aisfx import AiSfx
from esclab.models.backbones.clap import Clap
from esclab.models.backbones.speech import SPEECH_BACKBONES
from esclab.models.backbones.yamnet import YamNet

BACKBONES = {"yamnet": YamNet, "aisfx": AiSfx, "clap": Clap, **SPEECH_BACKBONES}


def build_backbone(name: str, weights: str | Path | None):
    return BACKBONES[name](Path(weights) if weights else None)
