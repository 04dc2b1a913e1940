"""Seed 001's head on a frozen backbone's embeddings: pool the clip's windows, then a small feed-forward net.

Pooling is the head's choice because the embedding cache keeps every window:
`mean` (the usual clip embedding), `max` (the loudest evidence of each feature),
or `both` side by side.
"""

from collections.abc import Sequence

import torch
from torch import nn

from esclab.errors import EsclabError

POOLINGS = ("mean", "max", "both")


def check_pooling(pooling: str) -> None:
    """Refuse a `model.pooling` that no head knows (the ffn here and the scikit-learn heads share them)."""
    if pooling not in POOLINGS:
        raise EsclabError(f"model.pooling={pooling!r} is not one of {', '.join(POOLINGS)}")


class FFN(nn.Module):
    """Embeddings (batch, 1, windows, dim) -> class logits (batch, n_classes)."""

    def __init__(self, *, n_classes: int, input_shape: tuple[int, int], pooling: str = "mean",
                 hidden: Sequence[int] = (256,), dropout: float = 0.3):
        super().__init__()
        check_pooling(pooling)
        self.pooling = pooling
        width = input_shape[1] * (2 if pooling == "both" else 1)
        layers: list[nn.Module] = []
        for i, units in enumerate(hidden):
            layers += [nn.Dropout(dropout)] if i else []
            layers += [nn.Linear(width, units), nn.ReLU()]
            width = units
        layers += [nn.Dropout(dropout), nn.Linear(width, n_classes)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(pool_windows(x.squeeze(1), self.pooling))


def pool_windows(windows: torch.Tensor, how: str) -> torch.Tensor:
    """(batch, windows, dim) -> (batch, dim), or (batch, 2 dim) for `both`: heads.pool's arithmetic in torch."""
    return {"mean": lambda: windows.mean(dim=1), "max": lambda: windows.amax(dim=1),
            "both": lambda: torch.cat([windows.mean(dim=1), windows.amax(dim=1)], dim=1)}[how]()
