"""aiSFX (Ma and Lerch, ISMIR 2022): a CNN trained on sound-effects libraries, frozen, with its real weights, offline.

The weights ship inside the PyPI wheel `aisfx==0.1.2` as `aisfx/models/checkpoint.pth`
(CC BY 4.0), pinned here by sha256. The wheel is installed with `--no-deps` (its pins,
numpy 1.23 and librosa 0.9.2, do not fit this Python) and its code is not run: its
loader calls `torch.load` in a way torch >= 2.6 refuses. The network is rebuilt here,
the DCASE 2018 cross-task baseline `Cnn_9layers` that the paper's "X-Sequential-CE"
model embeds with: four blocks of two 3x3 convolutions with batch norm and ReLU, 2x2
max pooling after the first three, 64 -> 512 channels; the mean over frequency, then the
maximum over time, is the 512-d embedding. Only its `embedding_net.*` weights are
loaded, with `weights_only=True` (the checkpoint also holds the nine training datasets'
classifier layers, whose class names it does not carry, so no class scores come out).

The front end is the package's librosa one (the paper used Essentia's, which the package
says the librosa one approximates): 44.1 kHz, the clip scaled to a peak of 1, power
spectrogram of 2048-sample periodic Hann frames every 1024 samples (centred,
zero-padded), 96 HTK mel bands over 0-22050 Hz each scaled to unit sum,
log10(10000 mel + 1), divided by 9.4578 (the paper's maximum over its training data).
Blocks of 100 frames (2.3 s) every 50 frames (1.16 s) are embedded; the last block is
zero-padded so that the whole clip is covered, and a short clip still makes one.
"""

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from esclab.models.backbones.weights import PinnedWeights

SAMPLE_RATE = 44100
N_FFT, HOP = 2048, 1024
N_MELS = 96
LOG_SCALE, LOG_MAX = 10000.0, 9.457798957824707
BLOCK, BLOCK_HOP = 100, 50  # frames
EMBEDDING_DIM = 512
WEIGHTS = PinnedWeights(backbone="aisfx", title="aiSFX", package="aisfx", relative="models/checkpoint.pth",
                        sha256="499ea75909c932a2f94c35fa722fa4fabc5bcb7e84917209cc5f7402627b7eb5",  # aisfx 0.1.2's
                        install="pip install --no-deps aisfx==0.1.2")


class ConvBlock(nn.Module):
    def __init__(self, channels_in: int, channels_out: int, pool: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, padding=1, bias=False)
        self.bn1, self.bn2 = nn.BatchNorm2d(channels_out), nn.BatchNorm2d(channels_out)
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        return F.max_pool2d(x, self.pool) if self.pool > 1 else x


class EmbeddingNet(nn.Module):
    """(blocks, 1, 100 frames, 96 bands) -> (blocks, 512); state dict keys as in the checkpoint's `embedding_net.`."""

    def __init__(self):
        super().__init__()
        self.conv_block1 = ConvBlock(1, 64, pool=2)
        self.conv_block2 = ConvBlock(64, 128, pool=2)
        self.conv_block3 = ConvBlock(128, 256, pool=2)
        self.conv_block4 = ConvBlock(256, 512, pool=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in (self.conv_block1, self.conv_block2, self.conv_block3, self.conv_block4):
            x = block(x)
        return x.mean(dim=3).amax(dim=2)


def mel_filters() -> torch.Tensor:
    """(1025 FFT bins x 96 bands): HTK-mel triangles over 0-22050 Hz, each scaled to sum to 1 (librosa's norm=1)."""
    import librosa

    weights = librosa.filters.mel(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=N_MELS, fmin=0.0, fmax=SAMPLE_RATE / 2,
                                  htk=True, norm=1.0)
    return torch.from_numpy(weights.T.astype(np.float32))


def blocks(waveform: np.ndarray | torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
    """A 44.1 kHz mono waveform as the network's input: (blocks, 1, 100 frames, 96 bands), float32.

    Written with tensor operations only (no branch on the data), so that `esclab export` traces it into ONNX.
    """
    x = torch.as_tensor(waveform, dtype=torch.float32)
    peak = x.abs().max()
    x = torch.where(peak > 0, x / peak, x)
    spectrum = torch.stft(x, N_FFT, HOP, window=torch.hann_window(N_FFT), center=True, pad_mode="constant",
                          return_complex=True)
    mel = spectrum.abs().pow(2).T @ filters  # frames x bands
    log_mel = torch.log10(mel * LOG_SCALE + 1) / LOG_MAX
    n_blocks = 1 + -(-max(len(log_mel) - BLOCK, 0) // BLOCK_HOP)
    padded = F.pad(log_mel, (0, 0, 0, (n_blocks - 1) * BLOCK_HOP + BLOCK - len(log_mel)))
    return padded.unfold(0, BLOCK, BLOCK_HOP).transpose(1, 2).unsqueeze(1)


def load_network(path: Path) -> EmbeddingNet:
    """The checkpoint's embedding network, read as plain tensors; its numpy scalars (dataset indices) allowed."""
    from numpy._core.multiarray import scalar

    allowed = [(scalar, "numpy.core.multiarray.scalar"), np.dtype, type(np.dtype(np.int64))]
    with torch.serialization.safe_globals(allowed):
        state, _datasets = torch.load(path, map_location="cpu", weights_only=True)
    prefix = "embedding_net."
    network = EmbeddingNet()
    network.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    return network.eval()


class AiSfx:
    """The frozen network: a waveform in, per-block embeddings (n x 512) out, no class scores."""

    name = "aisfx"
    sample_rate = SAMPLE_RATE
    pinned = WEIGHTS

    def __init__(self, weights: Path | None = None):
        self.weights, self.sha256 = WEIGHTS.checked(weights)
        self.source = str(weights) if weights else None  # the setting as given: null is the wheel's copy
        self.network = load_network(self.weights)
        self.filters = mel_filters()

    @staticmethod
    def window_centres(n_windows: int) -> np.ndarray:
        """Seconds from the clip's start to the middle of each block (frame t is centred on sample t * 1024)."""
        return (np.arange(n_windows) * BLOCK_HOP + (BLOCK - 1) / 2) * HOP / SAMPLE_RATE

    @torch.inference_mode()
    def __call__(self, waveform: np.ndarray) -> tuple[np.ndarray, None]:
        return self.network(blocks(waveform, self.filters)).numpy(), None
