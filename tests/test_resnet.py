"""Seed 002's ImageNet ResNet on log-mel: a local weights file, the one-channel stem, a fold trained, offline errors.

A tiny run uses resnet18 (the code is resnet50's) with a state dict of random numbers
saved by the test: the real loading path, without ImageNet's download.
"""

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision
from conftest import compose_config, free_port, tiny_overrides
from mlflow import MlflowClient

from esclab.checksums import sha256_of
from esclab.errors import EsclabError
from esclab.models import build_model
from esclab.serving.models import load_fold
from esclab.training.run import train

TINY_RESNET = ("model=resnet", "model.arch=resnet18")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A torchvision resnet18 state dict, as its ImageNet .pth is one, of seeded random numbers."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("resnet") / "resnet18.pth"
    torch.save(torchvision.models.get_model("resnet18").state_dict(), path)
    return path


def resnet(**settings) -> torch.nn.Module:
    return build_model("resnet", n_classes=5, input_shape=(32, 126), **{"arch": "resnet18"} | settings)


def test_the_stem_keeps_imagenets_filters_summed_over_rgb_and_the_last_layer_fits_the_classes(weights):
    saved = torch.load(weights, weights_only=True)
    network = resnet(weights=str(weights)).network
    assert network.conv1.weight.shape == (64, 1, 7, 7)
    assert torch.equal(network.conv1.weight, saved["conv1.weight"].sum(dim=1, keepdim=True))
    assert torch.equal(network.layer4[1].conv2.weight, saved["layer4.1.conv2.weight"])
    assert network.fc.out_features == 5 and network.fc.in_features == saved["fc.weight"].shape[1]
    assert not torch.equal(resnet(weights="none").network.layer4[1].conv2.weight, saved["layer4.1.conv2.weight"])


def test_a_fold_trains_from_a_local_file_byte_identically_and_records_its_sha256(weights, tiny_data, tmp_path,
                                                                                 monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow's artifacts (the ~130 MB checkpoints) go to ./mlruns: removed with tmp_path
    copy = Path(shutil.copyfile(weights, tmp_path / "resnet18.pth"))
    outputs = []
    for run in ("a", "b"):
        out = tmp_path / run
        train(compose_config(*tiny_overrides(tiny_data, out, *TINY_RESNET, f"model.weights={copy}", "fold=1",
                                             "trainer.max_epochs=1", "tracking.log_model=false")))
        outputs += [(out / "reports/folds/1" / name).read_bytes() for name in ("predictions.csv", "history.csv")]
    assert outputs[:2] == outputs[2:]
    predictions = pd.read_csv(tmp_path / "a/reports/folds/1/predictions.csv")
    assert predictions.filter(like="prob_").shape == (5, 5)

    client = MlflowClient(f"sqlite:///{tmp_path / 'a/mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("esclab").experiment_id], "tags.`esclab.fold` = '1'")
    assert runs[0].data.tags["model.weights.sha256"] == sha256_of(copy)
    assert runs[0].data.params["model.weights"] == str(copy)

    # The checkpoint holds the trained weights: using it needs no pretrained file.
    copy.unlink()
    hparams = torch.load(tmp_path / "a/models/fold_1.ckpt", weights_only=False)["hyper_parameters"]
    assert hparams["model"]["weights"] == "none"  # rebuilt from random weights, then the fold's state dict
    model = load_fold(tmp_path / "a/models/fold_1.ckpt")
    index = pd.read_csv(tiny_data["features"] / "index.csv")
    rows = np.load(tiny_data["features"] / "logmel.npy")[index.index[index["fold"] == 1]]
    assert np.allclose(model.predict(rows), predictions.filter(like="prob_").to_numpy(), atol=1e-5)


def test_imagenet_weights_offline_end_in_one_line_naming_the_setting_and_the_fix(tiny_data, tmp_path, monkeypatch):
    """torchvision downloads through urllib, which honours https_proxy: a port nobody listens on refuses at once."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for name in ("https_proxy", "HTTPS_PROXY"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{free_port()}")
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    cfg = compose_config(*tiny_overrides(tiny_data, tmp_path, *TINY_RESNET, "fold=1"))
    with pytest.raises(EsclabError, match=r"^model.weights=imagenet: torchvision's resnet18 weights cannot be "
                                          r"downloaded from https://download.pytorch.org/models/resnet18-f37072fd.pth "
                                          r"\(URLError\); download the .pth elsewhere and set "
                                          r"model.weights=/path/file.pth$"):
        train(cfg)
    assert not list((tmp_path / "torch").rglob("*.pth*"))  # nothing half-downloaded left where torch.hub looks
    assert not (tmp_path / "reports").exists()


def test_a_missing_or_foreign_weights_file_ends_in_one_line(weights, tmp_path):
    with pytest.raises(EsclabError, match=r"model.weights=.*nope.pth: no such file; set it to the path of a resnet18"):
        resnet(weights=str(tmp_path / "nope.pth"))
    with pytest.raises(EsclabError, match=r"is not a state dict of torchvision's resnet34 \(RuntimeError: Error\(s\) "
                                          r"in loading state_dict .*set model.arch to the network it is for"):
        resnet(arch="resnet34", weights=str(weights))
    (tmp_path / "notes.pth").write_text("not a state dict\n")
    with pytest.raises(EsclabError, match=r"notes.pth is not a state dict of torchvision's resnet18") as error:
        resnet(weights=str(tmp_path / "notes.pth"))
    assert "\n" not in str(error.value)
    with pytest.raises(EsclabError, match="model.arch=vgg16 is not a torchvision ResNet: use one of resnet101"):
        resnet(arch="vgg16", weights="none")
