"""The networks a config can name, by the key `model.name` (scikit-learn heads are in heads.py).

Training builds its network only through `build_model`, so a new architecture
needs no change to the training code. To add one:

1. write it in one file here, `src/esclab/models/<name>.py`, as an `nn.Module`
   whose constructor takes keyword-only `n_classes`, `input_shape` and its
   layer sizes as plain typed arguments with defaults;
2. add one line to `MODELS` below: `"<name>": ClassName`;
3. add `conf/model/<name>.yaml` with `name: <name>`, `input:` (the representation
   it reads: logmel, waveform or embedding) and every other key a constructor argument;
   select it with `model=<name>`.

A network that starts from pretrained weights has a static method
`weights_sha256(**settings)`, the sha256 of the weights its settings name (None for
random weights): it is on every run and part of the run key (`pretrained_sha256`).
Its `self_contained` attribute names the constructor arguments that rebuild it with
those files gone (a trained model's state dict replaces the start anyway), which the
checkpoint keeps, so using a trained model never needs the pretrained files.
"""

from torch import nn

from esclab.errors import EsclabError
from esclab.models.cnn4 import CNN4
from esclab.models.ffn import FFN
from esclab.models.pretrained import Pretrained
from esclab.models.resnet import ResNet

MODELS: dict[str, type[nn.Module]] = {"cnn4": CNN4, "ffn": FFN, "pretrained": Pretrained, "resnet": ResNet}


def build_model(name: str, *, n_classes: int, input_shape: tuple[int, ...], **layers) -> nn.Module:
    """The network registered as `name`, for `n_classes` and cached rows of `input_shape` ((n_mels, n_frames),
    (samples,) or (windows, dim))."""
    if name not in MODELS:
        raise EsclabError(f"model={name} is not a known model; available: {', '.join(sorted(MODELS))}")
    return MODELS[name](n_classes=n_classes, input_shape=input_shape, **layers)


def pretrained_sha256(model: dict) -> str | None:
    """The sha256 of the weights the network of `model` (a conf/model config) starts from; None when it starts
    from random weights, or is no network of this registry (a scikit-learn head)."""
    weights_sha256 = getattr(MODELS.get(model["name"]), "weights_sha256", None)
    return weights_sha256(**model_settings(model)) if weights_sha256 else None


def model_settings(model: dict) -> dict:
    """A `conf/model/<name>.yaml` config's constructor arguments: all but `name` and `input`."""
    return {k: v for k, v in model.items() if k not in ("name", "input")}
