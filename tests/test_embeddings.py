"""The embedding representation: a real YAMNet run once over every clip, a head trained per fold on the cache."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO, compose_config, printed_warnings

from esclab.data.embeddings import ARRAY
from esclab.data.representations import cache_settings, check_learner, write_cache
from esclab.errors import EsclabError
from esclab.models import build_model
from esclab.models.backbones import yamnet
from esclab.training.data import check_cache

YAMNET = ("features=yamnet", "features.duration=1.0")


@pytest.fixture(scope="module")
def split_csv(tiny_data):
    """The tiny dataset's split table (conftest's, shared by the session)."""
    return tiny_data["split"]


@pytest.fixture(scope="module")
def cache(split_csv, tmp_path_factory):
    return write_cache(split_csv, tmp_path_factory.mktemp("embedding") / "features", compose_config(*YAMNET).features)


def test_cache_holds_every_window_of_every_clip_in_split_order(cache, split_csv):
    array = np.load(cache / ARRAY, mmap_mode="r")
    assert array.shape == (25, 2, yamnet.EMBEDDING_DIM) and array.dtype == np.float16  # 1 s: two 0.96 s windows
    assert list(pd.read_csv(cache / "index.csv")["path"]) == list(pd.read_csv(split_csv)["path"])
    meta = json.loads((cache / "features.json").read_text())
    assert meta["representation"] == "embedding" and meta["array"] == ARRAY
    assert meta["settings"] == {"backbones": ["yamnet"], "weights_sha256": {"yamnet": yamnet.WEIGHTS.sha256},
                                "duration": 1.0}
    # Row i is the backbone's embedding of clip i, to float16 precision.
    first, _ = yamnet.YamNet()(_clip(split_csv, 0))
    assert np.allclose(array[0], first, atol=1e-2, rtol=1e-2)


def _clip(split_csv, row):
    from esclab.data.features import load_clips

    return load_clips(pd.read_csv(split_csv)["path"][row], sample_rate=16000, n_samples=16000)[0]


def test_a_rebuilt_cache_is_byte_identical(cache, split_csv, tmp_path):
    again = write_cache(split_csv, tmp_path / "features", compose_config(*YAMNET).features)
    for name in (ARRAY, "index.csv", "features.json"):
        assert (again / name).read_bytes() == (cache / name).read_bytes(), name


def test_other_weights_or_another_duration_make_the_cache_stale(cache, tmp_path):
    check_cache(cache, "embedding", cache_settings(compose_config(*YAMNET).features))
    with pytest.raises(EsclabError, match=r"features.duration=5.0 \(cache has 1.0\)"):
        check_cache(cache, "embedding", cache_settings(compose_config("features=yamnet").features))
    built = json.loads((cache / "features.json").read_text())["settings"]
    with pytest.raises(EsclabError, match="features.weights_sha256=.*dvc repro features"):
        check_cache(cache, "embedding", built | {"weights_sha256": {"yamnet": "0" * 64}})
    with pytest.raises(EsclabError, match=r"features.backbones=\['yamnet', 'aisfx'\] \(cache has \['yamnet'\]\)"):
        check_cache(cache, "embedding", cache_settings(compose_config("features=yamnet_aisfx",
                                                                      "features.duration=1.0").features))


def test_wrong_weights_are_refused_before_anything_is_written(split_csv, tmp_path):
    bad = tmp_path / "weights.zip"
    bad.write_bytes(yamnet.WEIGHTS.package_file().read_bytes()[:1000])
    features = compose_config(*YAMNET, f"features.weights.yamnet={bad}").features
    with pytest.raises(EsclabError, match=f"sha256 mismatch for YAMNet weights {bad} \\(features.weights.yamnet\\)"):
        write_cache(split_csv, tmp_path / "features", features)
    assert not (tmp_path / "features").exists() and not list(tmp_path.glob(".features*"))


def test_a_weights_copy_elsewhere_gives_the_same_cache(cache, split_csv, tmp_path):
    copy = shutil.copy(yamnet.WEIGHTS.package_file(), tmp_path / "YamNet_w8a8.onnx.zip")
    features = compose_config(*YAMNET, f"features.weights.yamnet={copy}").features
    again = write_cache(split_csv, tmp_path / "features", features)
    assert (again / ARRAY).read_bytes() == (cache / ARRAY).read_bytes()


@pytest.fixture(scope="module")
def combined(split_csv, tmp_path_factory):
    """Both real backbones over 3-s clips: YAMNet's 6 windows, aiSFX's 2 blocks put on them."""
    features = compose_config("features=yamnet_aisfx", "features.duration=3.0").features
    return write_cache(split_csv, tmp_path_factory.mktemp("combined") / "features", features)


def test_a_combined_cache_puts_each_backbones_windows_side_by_side_on_the_finest_grid(combined, split_csv):
    from esclab.data.features import load_clips
    from esclab.models.backbones.aisfx import AiSfx

    array = np.load(combined / ARRAY, mmap_mode="r")
    assert array.shape == (25, 6, 1024 + 512) and array.dtype == np.float16
    meta = json.loads((combined / "features.json").read_text())
    assert meta["settings"]["backbones"] == ["yamnet", "aisfx"] and set(meta["settings"]["weights_sha256"]) == {
        "yamnet", "aisfx"}
    path = pd.read_csv(split_csv)["path"][3]
    own, _ = yamnet.YamNet()(load_clips(path, sample_rate=16000, n_samples=3 * 16000)[0])
    blocks, _ = AiSfx()(load_clips(path, sample_rate=44100, n_samples=3 * 44100)[0])
    # YAMNet's windows are centred at 0.49, 0.97, 1.45, 1.93, 2.41, 2.89 s; aiSFX's blocks at 1.15 and 2.31 s.
    assert np.allclose(array[3, :, :1024], own, atol=1e-2, rtol=1e-2)
    assert np.allclose(array[3, :, 1024:], blocks[[0, 0, 0, 1, 1, 1]], atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize(("overrides", "message"), [
    (["features.backbones=[yamnet,yamnet]"], r"features.backbones=\['yamnet', 'yamnet'\] must name each"),
    (["features.backbones=[vggish]"],
     r"features.backbones=\['vggish'\] must name .* from: aisfx, clap, .*wav2vec2.*, yamnet"),
    (["features.backbones=[]"], r"features.backbones=\[\] must name"),
    (["features.backbones=[aisfx]"], "features.weights.yamnet is set, but yamnet is not in features.backbones"),
])
def test_bad_backbone_settings_are_refused_in_one_line(overrides, message):
    features = compose_config("features=yamnet_aisfx", *overrides).features
    if "weights.yamnet" in message:
        features.weights.yamnet = "/some/copy.zip"
    with pytest.raises(EsclabError, match=message):
        cache_settings(features)


def test_a_learner_that_cannot_read_the_representation_is_refused_in_one_line():
    cfg = compose_config("features=yamnet", "model=cnn4")
    with pytest.raises(EsclabError, match="model=cnn4 reads logmel features, but features.representation=embedding: "
                                          "choose features=logmel"):
        check_learner(cfg.model, cfg.features)
    cfg = compose_config("model=ffn")
    with pytest.raises(EsclabError, match="model=ffn reads embedding features.*choose features=yamnet"):
        check_learner(cfg.model, cfg.features)


@pytest.mark.parametrize("pooling", ["mean", "max", "both"])
def test_the_head_pools_the_windows(pooling):
    head = build_model("ffn", n_classes=3, input_shape=(4, 8), pooling=pooling, hidden=[5], dropout=0.0).eval()
    x = torch.randn(2, 1, 4, 8)
    logits = head(x)
    assert logits.shape == (2, 3)
    assert torch.allclose(head(x[:, :, torch.randperm(4)]), logits, atol=1e-6)  # window order does not matter


def test_an_unknown_pooling_is_refused():
    with pytest.raises(EsclabError, match="model.pooling='median'"):
        build_model("ffn", n_classes=3, input_shape=(4, 8), pooling="median")


@pytest.mark.parametrize(("experiment", "cache_fixture", "duration", "head"), [
    ("yamnet_ffn", "cache", 1.0, "ffn"), ("yamnet_aisfx_svm", "combined", 3.0, "svm")])
def test_train_py_runs_a_pretrained_experiment_end_to_end(request, split_csv, tiny_tree, tmp_path, experiment,
                                                          cache_fixture, duration, head):
    """`python train.py experiment=...`, at tiny sizes: every fold, pooled metrics, MLflow runs, a logged model."""
    cache = request.getfixturevalue(cache_fixture)
    overrides = [f"experiment={experiment}", "dataset=synthetic", "dataset.synthetic.n_classes=5",
                 f"features.duration={duration}", f"paths.raw={tiny_tree}", f"paths.split={split_csv}",
                 f"paths.features={cache}", f"paths.models={tmp_path / 'models'}",
                 f"paths.reports={tmp_path / 'reports'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
                 "trainer.max_epochs=3", "trainer.enable_progress_bar=false", "train.batch_size=8"]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    result = subprocess.run([sys.executable, str(REPO / "train.py"), *overrides], cwd=tmp_path, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert printed_warnings(result.stdout + result.stderr) == []
    metrics = json.loads((tmp_path / "reports/metrics.json").read_text())
    assert len(metrics["fold_accuracy"]) == 5 and metrics["n_clips"] == 25
    for fold in range(1, 6):
        predictions = pd.read_csv(tmp_path / f"reports/folds/{fold}/predictions.csv")
        assert set(predictions["fold"]) == {fold}  # each fold's model predicts only the fold it never saw

    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("esclab").experiment_id])
    child = next(r for r in runs if r.data.tags["esclab.fold"] == "1")
    backbones = compose_config(f"experiment={experiment}").features.backbones
    assert json.loads(child.data.params["features.backbones"]) == list(backbones)
    assert child.data.params["model.name"] == head
    assert child.data.tags["data.features.md5"].endswith(".dir")
    assert child.data.tags["backbone"] == "+".join(backbones)
    assert child.data.tags["backbone.yamnet.weights.sha256"] == yamnet.WEIGHTS.sha256
    assert ("backbone.aisfx.weights.sha256" in child.data.tags) == ("aisfx" in backbones)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    models = mlflow.search_logged_models(experiment_ids=[child.info.experiment_id], output_format="list")
    model = mlflow.pyfunc.load_model(next(m.model_uri for m in models if m.source_run_id == child.info.run_id))
    probs = np.asarray(model.predict(np.load(cache / ARRAY)[:3].astype(np.float32)))
    assert probs.shape == (3, 5) and np.allclose(probs.sum(axis=1), 1, atol=1e-5)


def train_head(cache: Path, tiny_tree: Path, out: Path, *overrides: str) -> Path:
    from esclab.training.run import train

    train(compose_config("experiment=yamnet_svm", "dataset=synthetic", "dataset.synthetic.n_classes=5", *YAMNET[1:],
                         f"paths.raw={tiny_tree}", f"paths.split={cache / 'index.csv'}", f"paths.features={cache}",
                         f"paths.models={out / 'models'}", f"paths.reports={out / 'reports'}",
                         f"tracking.uri=sqlite:///{out / 'mlflow.db'}", *overrides))
    return out / "reports/folds"


@pytest.mark.parametrize("head", ["svm", "logistic"])
def test_a_head_chooses_C_without_ever_seeing_the_test_fold(cache, tiny_tree, tmp_path, head):
    """The same head on a cache whose test-fold rows are replaced by noise: the same fit, the same choice of C
    (history.csv to the byte); only the test predictions differ."""
    scrambled = Path(shutil.copytree(cache, tmp_path / "scrambled"))
    array = np.load(scrambled / ARRAY, mmap_mode="r+")
    test_rows = np.flatnonzero(pd.read_csv(scrambled / "index.csv")["fold"].to_numpy() == 2)
    array[test_rows] = np.random.default_rng(0).normal(0, 5, array[test_rows].shape).astype(np.float16)
    array.flush()
    overrides = (f"model={head}", "fold=2", "tracking.log_model=false")
    clean, noisy = (train_head(c, tiny_tree, tmp_path / name, *overrides)
                    for name, c in (("clean", cache), ("noisy", scrambled)))
    assert (clean / "2/history.csv").read_bytes() == (noisy / "2/history.csv").read_bytes()
    history = pd.read_csv(clean / "2/history.csv")
    assert list(history["C"]) == list(compose_config(f"model={head}").model.C)
    assert (clean / "2/predictions.csv").read_bytes() != (noisy / "2/predictions.csv").read_bytes()


def test_the_svm_experiment_pools_its_folds_and_logs_a_model_that_gives_probabilities(cache, tiny_tree, tmp_path):
    import mlflow
    from mlflow import MlflowClient

    folds = train_head(cache, tiny_tree, tmp_path)
    metrics = json.loads((tmp_path / "reports/metrics.json").read_text())
    assert len(metrics["fold_accuracy"]) == 5 and metrics["n_clips"] == 25
    for fold in range(1, 6):
        predictions = pd.read_csv(folds / f"{fold}/predictions.csv")
        assert set(predictions["fold"]) == {fold}
        assert np.allclose(predictions.filter(like="prob_").sum(axis=1), 1, atol=1e-5)
        assert (tmp_path / f"models/fold_{fold}.ckpt").is_file()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    child = next(r for r in client.search_runs([client.get_experiment_by_name("esclab").experiment_id])
                 if r.data.tags["esclab.fold"] == "3")
    assert child.data.params["model.name"] == "svm" and {"val/acc", "test/acc"} <= set(child.data.metrics)
    mlflow.set_tracking_uri(uri)
    models = mlflow.search_logged_models(experiment_ids=[child.info.experiment_id], output_format="list")
    model = mlflow.pyfunc.load_model(next(m.model_uri for m in models if m.source_run_id == child.info.run_id))
    probs = np.asarray(model.predict(np.load(cache / ARRAY)[:3].astype(np.float32)))
    assert probs.shape == (3, 5) and np.allclose(probs.sum(axis=1), 1, atol=1e-5)


def test_bad_C_is_refused_by_name():
    from esclab.models.heads import candidates

    with pytest.raises(EsclabError, match=r"model.C=\[0, 1\] must be a list of positive numbers"):
        candidates("svm", C=[0, 1], pooling="mean", seed=0)
    with pytest.raises(EsclabError, match="model=logistic has no setting kernel"):
        candidates("logistic", C=[1], pooling="mean", seed=0, kernel="linear")
