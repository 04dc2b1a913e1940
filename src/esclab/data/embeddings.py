"""The embedding representation: a frozen pretrained backbone run once over every clip.

`embedding.npy` holds clips x windows x dim, float16, rows in split-table order,
memory-mapped at train time: every window is kept, so pooling them is the head's
choice. `features.json` names the backbone and the sha256 of its weights, so a
cache made with another backbone or other weights is refused at train time, as a
log-mel cache made with other settings is. Clips are decoded as for the log-mel
(mono, resampled, zero-padded or trimmed to `features.duration`); a clip shorter
than one window is padded to one.
"""

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from esclab.atomic import atomic_dir
from esclab.data.features import load_clip
from esclab.errors import EsclabError
from esclab.models.backbones import BACKBONES, build_backbone

log = logging.getLogger(__name__)
ARRAY = "embedding.npy"


@dataclass(frozen=True)
class EmbeddingSettings:
    """What makes an embedding cache: the backbone, its exact weights, and the clips it was fed."""

    backbone: str
    weights_sha256: str
    sample_rate: int
    duration: float

    @property
    def n_samples(self) -> int:
        return round(self.duration * self.sample_rate)


def embedding_settings(features) -> EmbeddingSettings:
    """The settings of a `conf/features/<backbone>.yaml` config, its weights file verified against the pin."""
    if features.backbone not in BACKBONES:
        raise EsclabError(f"features.backbone={features.backbone} is not a known backbone; "
                          f"available: {', '.join(sorted(BACKBONES))}")
    backbone = BACKBONES[features.backbone]
    if features.sample_rate != backbone.sample_rate:
        raise EsclabError(f"features.sample_rate={features.sample_rate}, but {features.backbone} takes "
                          f"{backbone.sample_rate} Hz: set features.sample_rate={backbone.sample_rate}")
    _, sha256 = backbone.checked_weights(features.weights)
    return EmbeddingSettings(backbone=features.backbone, weights_sha256=sha256, sample_rate=features.sample_rate,
                             duration=features.duration)


def write_embeddings(split_csv: Path, out_dir: Path, features) -> Path:
    """The features stage for embeddings: embedding.npy + index.csv + features.json, all or nothing."""
    settings = embedding_settings(features)
    backbone = build_backbone(features.backbone, features.weights)
    table = pd.read_csv(split_csv)
    first = backbone(load_clip(table["path"].iloc[0], sample_rate=settings.sample_rate, n_samples=settings.n_samples))[0]
    shape = (len(table), *first.shape)
    with atomic_dir(out_dir) as tmp:
        out = np.lib.format.open_memmap(tmp / ARRAY, mode="w+", dtype=np.float16, shape=shape)
        for row, path in enumerate(tqdm(table["path"], desc=f"features ({settings.backbone})", unit="clip")):
            embeddings, _ = backbone(load_clip(path, sample_rate=settings.sample_rate, n_samples=settings.n_samples))
            out[row] = embeddings
        if not np.isfinite(out).all():
            raise EsclabError(f"{settings.backbone} embeddings of {split_csv} overflowed float16: "
                              "the weights or the clips are not what they should be")
        out.flush()
        del out
        table.to_csv(tmp / "index.csv", index=False)
        meta = {"representation": "embedding", "array": ARRAY, "settings": asdict(settings),
                "shape": list(shape), "dtype": "float16"}
        (tmp / "features.json").write_text(json.dumps(meta, indent=2) + "\n")
    log.info("features: %d clips -> %s float16 %s embeddings in %s", len(table), shape, settings.backbone, out_dir)
    return out_dir
