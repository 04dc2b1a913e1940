"""The seed paper's network: four conv blocks, then a two-layer classifier.

Every size is a constructor argument (fed from conf/model/cnn4.yaml) so an
experiment can change the network without touching code; the defaults are the
seed's. The flatten size is derived from the input shape because it changes
with features.n_mels and the clip length, and a hard-coded number would break
the first time either did.
"""

from collections.abc import Sequence

import torch
from torch import nn

from esclab.errors import EsclabError


def _block(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    """Conv (size-preserving) -> BatchNorm -> ReLU -> 2x2 max-pool, which halves each spatial dim."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride=1, padding=kernel_size // 2),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
        nn.MaxPool2d(2, stride=2),
    )


class CNN4(nn.Module):
    """Log-mel spectrogram (batch, 1, n_mels, n_frames) -> class logits (batch, n_classes).

    It returns logits, not probabilities: cross-entropy wants logits, and the
    softmax is applied only where predictions are made.
    """

    def __init__(self, *, n_classes: int, input_shape: tuple[int, int],
                 channels: Sequence[int] = (64, 128, 256, 512), kernel_size: int = 3,
                 fc_dim: int = 1024, dropout: float = 0.5):
        super().__init__()
        if kernel_size % 2 == 0:
            # Only an odd kernel with padding kernel_size // 2 keeps the size, which the flatten size assumes.
            raise EsclabError(f"model.kernel_size={kernel_size} must be odd (e.g. 3) "
                              "so each convolution keeps the spectrogram's size")
        channels = [int(c) for c in channels]
        n_mels, n_frames = input_shape
        height, width = n_mels, n_frames
        for stage in range(1, len(channels) + 1):
            height, width = height // 2, width // 2
            if height == 0 or width == 0:
                raise EsclabError(
                    f"an input of {n_mels} mel bands x {n_frames} frames shrinks to nothing after pooling stage {stage} "
                    f"of {len(channels)} (one per entry of model.channels): raise features.n_mels or the clip length "
                    f"(features.duration), or list fewer model.channels")

        widths = [1, *channels]  # the input is one log-mel "image" channel
        self.features = nn.Sequential(*(
            _block(c_in, c_out, kernel_size) for c_in, c_out in zip(widths, widths[1:])))
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(widths[-1] * height * width, fc_dim),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(fc_dim, n_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
