"""The networks a config can name, by the key `model.name` (scikit-learn heads are in heads.py).

Training builds its network only through `build_model`, so a new architecture
needs no change to the training code. To add one:

1. write it in one file here, `src/esclab/models/<name>.py`, as an `nn.Module`
   whose constructor takes keyword-only `n_classes`, `input_shape` and its
   layer sizes as plain typed arguments with defaults;
2. add one line to `MODELS` below: `"<name>": ClassName`;
3. add `conf/model/<name>.yaml` with `name: <name>`, `input:` (the representation
   it reads: logmel or embedding) and every other key a constructor argument;
   select it with `model=<name>`.

A network that starts from pretrained weights names them in a `weights` setting
(`none`: random weights) and says which file that is with a static method
`pretrained_file(**settings)`: its sha256 is on every run (`pretrained_sha256`).
A trained model is rebuilt with `pretrained=False` (weights none), since its own
state dict replaces the start: where it is used, the pretrained file need not be.
"""

from torch import nn

from esclab.checksums import sha256_of
from esclab.errors import EsclabError
from esclab.models.cnn4 import CNN4
from esclab.models.ffn import FFN
from esclab.models.resnet import ResNet

MODELS: dict[str, type[nn.Module]] = {"cnn4": CNN4, "ffn": FFN, "resnet": ResNet}


def build_model(name: str, *, n_classes: int, input_shape: tuple[int, int], pretrained: bool = True,
                **layers) -> nn.Module:
    """The network registered as `name`, for `n_classes` and cached rows of `input_shape` ((n_mels, n_frames) or
    (windows, dim)); with `pretrained=False`, from random weights whatever its `weights` setting says."""
    if name not in MODELS:
        raise EsclabError(f"model={name} is not a known model; available: {', '.join(sorted(MODELS))}")
    if not pretrained and "weights" in layers:
        layers = layers | {"weights": "none"}
    return MODELS[name](n_classes=n_classes, input_shape=input_shape, **layers)


def pretrained_sha256(model: dict) -> str | None:
    """The sha256 of the weights file the network of `model` (a conf/model config) starts from; None when it starts
    from random weights, or is no network of this registry (a scikit-learn head)."""
    pretrained_file = getattr(MODELS.get(model["name"]), "pretrained_file", None)
    path = pretrained_file(**model_settings(model)) if pretrained_file else None
    return sha256_of(path) if path else None


def model_settings(model: dict) -> dict:
    """A `conf/model/<name>.yaml` config's constructor arguments: all but `name` and `input`."""
    return {k: v for k, v in model.items() if k not in ("name", "input")}
