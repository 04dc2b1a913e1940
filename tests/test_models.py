"""The model registry and cnn4: the seed's exact layers, sizes derived from the input, clear errors."""

import pytest
import torch
import yaml
from conftest import REPO
from torch import nn

from esclab.errors import EsclabError
from esclab.models import build_model, model_settings
from esclab.models.cnn4 import CNN4

# The seed loaded clips with librosa's defaults: 22.05 kHz, 5 s, hop 512, 128 mels -> 128 x 216.
SEED_SHAPE = (128, 216)
CHANNELS = [64, 128, 256, 512]


@pytest.fixture(scope="module")
def seed_model() -> CNN4:
    torch.manual_seed(0)
    return build_model("cnn4", n_classes=50, input_shape=SEED_SHAPE).eval()


def expected_parameters(flat: int, n_classes: int) -> int:
    """The seed network's parameter count, by hand: each term is one layer's weights plus biases."""
    count = 0
    for c_in, c_out in zip([1, *CHANNELS], CHANNELS):
        count += c_in * c_out * 3 * 3 + c_out  # conv 3x3: weights + bias
        count += 2 * c_out                      # batch norm: scale + shift (running stats are buffers)
    count += flat * 1024 + 1024                 # hidden dense layer
    count += 1024 * n_classes + n_classes       # output layer
    return count


def test_seed_layers_exactly(seed_model):
    blocks = list(seed_model.features)
    assert len(blocks) == 4
    for block, c_in, c_out in zip(blocks, [1, *CHANNELS], CHANNELS):
        conv, bn, relu, pool = block
        assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
        assert isinstance(relu, nn.ReLU) and isinstance(pool, nn.MaxPool2d)
        assert (conv.in_channels, conv.out_channels) == (c_in, c_out)
        assert (conv.kernel_size, conv.stride, conv.padding) == ((3, 3), (1, 1), (1, 1))
        assert bn.num_features == c_out
        assert (pool.kernel_size, pool.stride) == (2, 2)

    flatten, hidden, relu, dropout, out = seed_model.classifier
    assert isinstance(flatten, nn.Flatten) and isinstance(relu, nn.ReLU)
    # 128 x 216 halved four times (floor): 8 x 13.
    assert (hidden.in_features, hidden.out_features) == (512 * 8 * 13, 1024) == (53248, 1024)
    assert isinstance(dropout, nn.Dropout) and dropout.p == 0.5
    assert (out.in_features, out.out_features) == (1024, 50)

    assert sum(p.numel() for p in seed_model.parameters()) == expected_parameters(53248, 50)
    with torch.no_grad():
        assert seed_model(torch.randn(2, 1, *SEED_SHAPE)).shape == (2, 50)


def test_flatten_size_follows_input_shape():
    model = CNN4(n_classes=10, input_shape=(64, 126)).eval()
    assert model.classifier[1].in_features == 512 * 4 * 7
    with torch.no_grad():
        assert model(torch.randn(3, 1, 64, 126)).shape == (3, 10)


def test_returns_deterministic_logits_in_eval_mode(seed_model):
    x = torch.randn(4, 1, *SEED_SHAPE)
    with torch.no_grad():
        first, second = seed_model(x), seed_model(x)
    assert torch.equal(first, second)  # dropout is off in eval mode
    assert not torch.allclose(first.sum(dim=1), torch.ones(4))  # no softmax inside
    assert (first < 0).any()


def test_too_small_input_is_refused():
    with pytest.raises(EsclabError, match=r"features\.n_mels.*model\.channels"):
        CNN4(n_classes=50, input_shape=(8, 216))  # 8 -> 4 -> 2 -> 1 -> 0 at the fourth pooling


def test_unknown_model_is_refused_with_the_choices():
    with pytest.raises(EsclabError, match=r"model=vit is not a known model; available: cnn4, ffn, pretrained, resnet"):
        build_model("vit", n_classes=50, input_shape=SEED_SHAPE)


def test_every_config_key_is_a_constructor_argument():
    config = yaml.safe_load((REPO / "conf" / "model" / "cnn4.yaml").read_text())
    layers = model_settings(config)
    assert set(layers) == {"channels", "kernel_size", "fc_dim", "dropout"} and config["input"] == "logmel"
    model = build_model(config["name"], n_classes=50, input_shape=(32, 126), **layers)
    assert sum(p.numel() for p in model.parameters()) == expected_parameters(512 * 2 * 7, 50)


@pytest.mark.parametrize("path", sorted((REPO / "conf" / "model").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_model_config_builds_and_names_what_it_reads(path, tiny_clap):
    from esclab.models.heads import HEADS, candidates

    config = yaml.safe_load(path.read_text())
    assert config["input"] in ("logmel", "waveform", "embedding")
    if config["name"] in HEADS:  # what training gives a head besides its settings; zeroshot reads a CLAP cache's
        features = {"backbones": ["clap"], "weights": {"clap": str(tiny_clap)}}
        assert config["name"] == path.stem
        assert candidates(config["name"], seed=0, classes=["dog", "rain"], features=features, **model_settings(config))
    elif "checkpoint" in config:  # a Hugging Face family: built from tiny checkpoints in test_pretrained.py
        assert config["name"] == "pretrained" and config["input"] == "waveform"
    else:
        assert config["name"] == path.stem
        shape = (32, 126) if config["input"] == "logmel" else (10, 1024)
        # From random weights: the architecture the config names, without downloading ImageNet's (test_resnet.py).
        settings = model_settings(config) | ({"weights": "none"} if "weights" in config else {})
        assert build_model(config["name"], n_classes=5, input_shape=shape, **settings)


def test_even_kernel_is_refused():
    with pytest.raises(EsclabError, match=r"model\.kernel_size=4 must be odd"):
        CNN4(n_classes=50, input_shape=SEED_SHAPE, kernel_size=4)
