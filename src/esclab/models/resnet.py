"""Seed 002's ImageNet network on log-mel "images": a torchvision ResNet whose first convolution reads one channel.

The architecture comes from `torchvision.models.get_model(arch)` (resnet50 by
default, any torchvision ResNet by `model.arch`). Its ImageNet weights are loaded
into the three-channel network first, then the first convolution becomes a
one-channel one whose kernels are the sums of the RGB kernels: a grey image fed to
all three channels gives the same activations, so ImageNet's filters are kept. The
last layer is replaced by one for the dataset's classes. Global average pooling
takes any mels x frames, so the log-mel is not resized to 224 x 224.

`model.weights` is a pipeline input like the data: `imagenet` (torchvision's
weights, downloaded once into $TORCH_HOME/hub/checkpoints, as torch.hub caches
them), the path of a local state-dict file (the same ImageNet file copied from
elsewhere, for offline machines), or `none` (random weights). The sha256 of the
file is on every MLflow run and part of its key (tracking.py).
"""

from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn

from esclab.checksums import sha256_of
from esclab.errors import EsclabError

ARCH, WEIGHTS = "resnet50", "imagenet"  # the defaults: seed 002's network, ImageNet's weights
OFFLINE_FIX = "download the .pth elsewhere and set model.weights=/path/file.pth"


def resnets() -> list[str]:
    """The torchvision classification models built by its ResNet class (resnet*, resnext*, wide_resnet*)."""
    return [name for name in torchvision.models.list_models(module=torchvision.models)
            if name.startswith(("resnet", "resnext", "wide_resnet"))]


def imagenet_file(arch: str) -> Path:
    """torchvision's ImageNet weights for `arch` (its default, best set), downloaded unless torch.hub has them.

    The file goes where `torch.hub.load_state_dict_from_url` keeps it, checked
    against the hash prefix in its name, and written under a temporary name first.
    """
    url = torchvision.models.get_model_weights(arch).DEFAULT.url
    target = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        prefix = torch.hub.HASH_REGEX.search(target.name)
        try:
            torch.hub.download_url_to_file(url, str(target), hash_prefix=prefix and prefix.group(1), progress=False)
        except (OSError, RuntimeError) as err:  # no network (URLError is an OSError), or a download that is not it
            raise EsclabError(f"model.weights=imagenet: torchvision's {arch} weights cannot be downloaded from {url} "
                              f"({type(err).__name__}); {OFFLINE_FIX}") from None
    return target


def weights_file(*, arch: str = ARCH, weights: str = WEIGHTS) -> Path | None:
    """The state-dict file `model.weights` names for `arch`; None for `none` (random weights)."""
    if weights == "none":
        return None
    if weights == "imagenet":
        return imagenet_file(arch)
    path = Path(weights).expanduser()
    if not path.is_file():
        raise EsclabError(f"model.weights={weights}: no such file; set it to the path of a {arch} state dict (.pth), "
                          "imagenet (torchvision's weights, downloaded) or none (random weights)")
    return path


class ResNet(nn.Module):
    """Log-mel spectrogram (batch, 1, n_mels, n_frames) -> class logits (batch, n_classes).

    `input_shape` is not needed: the global average pooling takes any size.
    """

    def __init__(self, *, n_classes: int, input_shape: tuple[int, int], arch: str = ARCH, weights: str = WEIGHTS):
        super().__init__()
        if arch not in resnets():
            raise EsclabError(f"model.arch={arch} is not a torchvision ResNet: use one of {', '.join(resnets())}")
        network = torchvision.models.get_model(arch, weights=None)
        path = weights_file(arch=arch, weights=weights)
        if path is not None:
            load_state(network, path, arch)
        rgb = network.conv1
        network.conv1 = nn.Conv2d(1, rgb.out_channels, rgb.kernel_size, rgb.stride, rgb.padding, bias=False)
        with torch.no_grad():
            network.conv1.weight.copy_(rgb.weight.sum(dim=1, keepdim=True))
        network.fc = nn.Linear(network.fc.in_features, n_classes)
        self.network = network
        self.self_contained = {"weights": "none"}  # a trained fold's state dict replaces the start (models/__init__.py)

    @staticmethod
    def weights_sha256(*, arch: str = ARCH, weights: str = WEIGHTS) -> str | None:
        path = weights_file(arch=arch, weights=weights)
        return sha256_of(path) if path else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)


def load_state(network: nn.Module, path: Path, arch: str) -> None:
    """`path`'s state dict into the three-channel `network`; one line when it is not a state dict of `arch`."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        network.load_state_dict(state)
    except Exception as err:  # a foreign or damaged file fails in pickle, zipfile or load_state_dict in many ways
        reason = " ".join(str(err).split())[:240]
        raise EsclabError(f"model.weights={path} is not a state dict of torchvision's {arch} ({type(err).__name__}: "
                          f"{reason}); point it at {arch}'s ImageNet .pth, or set model.arch to the network it is "
                          "for") from None
