"""Pretrained networks used frozen: each turns a waveform into per-window embeddings, from pinned weights.

A backbone class has `name`, `sample_rate`, `checked_weights(weights) -> (path, sha256)`
(refusing a file that is not the pinned one) and, once built, `sha256` and
`__call__(waveform) -> (embeddings windows x dim, class scores or None)`.
`features.backbone` picks one by its key here.
"""

from pathlib import Path

from esclab.models.backbones.yamnet import YamNet

BACKBONES = {"yamnet": YamNet}


def build_backbone(name: str, weights: str | Path | None):
    return BACKBONES[name](Path(weights) if weights else None)
