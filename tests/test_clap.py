"""CLAP: its audio tower as a frozen backbone of the embedding cache, and zero-shot classification with its text
tower, on a tiny randomly initialised CLAP saved as a hub checkpoint (conftest's tiny_clap); no hub is contacted."""

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO, TINY, embedding_cache, tiny_overrides, train_on_cache
from scipy.special import softmax

from esclab.data.embeddings import ARRAY
from esclab.errors import EsclabError
from esclab.models.backbones.clap import Clap
from esclab.models.backbones.hub import weights_sha256
from esclab.models.heads import candidates

ZEROSHOT = "experiment=clap_zeroshot"


@pytest.fixture(scope="module")
def clap_features(tiny_clap) -> tuple[str, ...]:
    return "features=clap", f"features.weights.clap={tiny_clap}"


@pytest.fixture(scope="module")
def cache(tiny_data, clap_features, tmp_path_factory):
    return embedding_cache(tiny_data["split"], tmp_path_factory.mktemp("clap"), *clap_features)


@pytest.fixture(scope="module")
def zeroshot_run(tiny_data, cache, clap_features, tmp_path_factory):
    """The zero-shot cross-validation."""
    return train_on_cache(tiny_data, cache, tmp_path_factory.mktemp("clap_zeroshot"), ZEROSHOT, *clap_features)


@pytest.fixture(scope="module")
def fold_rerun(tiny_data, cache, clap_features, tmp_path_factory):
    """Fold 1 of the zero-shot cross-validation again, in a fresh place, its head logged to MLflow (the default;
    it takes seconds per model, so once)."""
    out = tmp_path_factory.mktemp("clap_zeroshot_again")
    return train_on_cache(tiny_data, cache, out, ZEROSHOT, *clap_features, "fold=1", "tracking.log_model=true")


@pytest.fixture(scope="module")
def towers(tiny_clap):
    """The checkpoint read independently of esclab: model, feature extractor, tokenizer."""
    from transformers import AutoTokenizer, ClapFeatureExtractor, ClapModel

    return (ClapModel.from_pretrained(tiny_clap).eval(), ClapFeatureExtractor.from_pretrained(tiny_clap),
            AutoTokenizer.from_pretrained(tiny_clap))


def clip(split_csv, row: int) -> np.ndarray:
    from esclab.data.features import load_clips

    return load_clips(pd.read_csv(split_csv)["path"][row], sample_rate=16000, n_samples=16000)[0]


def audio_features(towers, waveform: np.ndarray) -> np.ndarray:
    model, extractor, _ = towers
    with torch.inference_mode():
        return model.get_audio_features(**extractor(waveform, sampling_rate=16000, return_tensors="pt")
                                        ).pooler_output.numpy()


def test_the_cache_holds_clap_s_projected_audio_embedding_of_each_clip(cache, tiny_data, tiny_clap, towers):
    array = np.load(cache / ARRAY, mmap_mode="r")
    assert array.shape == (25, 1, 8) and array.dtype == np.float16  # 1-s clips: one 1-s window each
    meta = json.loads((cache / "features.json").read_text())
    assert meta["settings"] == {"backbones": ["clap"], "weights_sha256": {"clap": weights_sha256(tiny_clap)},
                                "duration": 1.0}
    assert meta["weights"] == {"clap": str(tiny_clap)}
    for row in (0, 7):
        assert np.allclose(array[row], audio_features(towers, clip(tiny_data["split"], row)), atol=2e-3)


def test_a_clip_longer_than_clap_s_input_is_embedded_window_by_window(tiny_clap, towers):
    backbone = Clap(tiny_clap)
    waveform = np.random.default_rng(0).standard_normal(40000).astype(np.float32)  # 2.5 s: windows of 1, 1, 0.5 s
    embeddings, scores = backbone(waveform)
    assert embeddings.shape == (3, 8) and scores is None and backbone.sample_rate == 16000
    for i, start in enumerate((0, 16000, 32000)):
        assert np.allclose(embeddings[i], audio_features(towers, waveform[start:start + 16000])[0], atol=1e-5)
    assert list(backbone.window_centres(3)) == [0.5, 1.5, 2.5]


def test_zero_shot_writes_every_fold_s_outputs_with_clap_s_own_probabilities(zeroshot_run, cache, tiny_data, towers):
    """No training: each fold's probabilities are softmax(logit_scale x cosine) of the clip's audio embedding with
    the prompts, computed here from the model's own text and audio towers."""
    model, _, tokenizer = towers
    classes = pd.read_csv(tiny_data["split"]).drop_duplicates("label").sort_values("label")["category"]
    prompts = [f"This is a sound of {name.replace('_', ' ')}." for name in classes]
    with torch.inference_mode():
        text = model.get_text_features(**tokenizer(prompts, padding=True, return_tensors="pt")).pooler_output.numpy()
        scale = model.logit_scale_a.exp().item()
    rows = np.load(cache / ARRAY).astype(np.float64)[:, 0]
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    expected = softmax(scale * rows @ text.T, axis=1)
    index = pd.read_csv(cache / "index.csv").set_index("filename")
    for fold in range(1, 6):
        reports = zeroshot_run / "reports" / "folds" / str(fold)
        assert (zeroshot_run / "models" / f"fold_{fold}.ckpt").is_file() and (reports / "fold.json").is_file()
        predictions = pd.read_csv(reports / "predictions.csv")
        assert set(index.loc[predictions["filename"], "fold"]) == {fold}
        probs = predictions[[f"prob_{i}" for i in range(TINY["n_classes"])]].to_numpy()
        assert np.allclose(probs, expected[index.index.get_indexer(predictions["filename"])], atol=1e-4)
        history = pd.read_csv(reports / "history.csv")
        assert len(history) == 1 and "C" not in history  # one head, nothing chosen
    metrics = json.loads((zeroshot_run / "reports" / "metrics.json").read_text())
    assert 0 <= metrics["accuracy_mean"] <= 1  # random weights: near chance


def test_a_fold_rerun_writes_the_same_bytes(zeroshot_run, fold_rerun):
    name = "reports/folds/1/predictions.csv"
    assert (fold_rerun / name).read_bytes() == (zeroshot_run / name).read_bytes()


def test_the_mlflow_fold_run_holds_the_prompt_head(fold_rerun, cache):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{fold_rerun / 'mlflow.db'}")
    (fold,) = [run for run in mlflow.search_runs(search_all_experiments=True, output_format="list")
               if "mlflow.parentRunId" in run.data.tags]
    assert fold.info.status == "FINISHED" and "test/acc" in fold.data.metrics
    models = mlflow.search_logged_models(experiment_ids=[fold.info.experiment_id], output_format="list")
    head = mlflow.pyfunc.load_model(next(m.model_uri for m in models if m.source_run_id == fold.info.run_id))
    predictions = pd.read_csv(fold_rerun / "reports/folds/1/predictions.csv")
    rows = pd.read_csv(cache / "index.csv").reset_index().set_index("filename").loc[predictions["filename"], "index"]
    probs = np.asarray(head.predict(np.load(cache / ARRAY)[rows].astype(np.float32)))
    assert np.allclose(probs, predictions[[f"prob_{i}" for i in range(TINY["n_classes"])]], atol=1e-5)


def test_predict_serves_a_zero_shot_fold_model_through_the_same_checkpoint(zeroshot_run, tiny_data):
    from esclab.serving.models import load_cross_validation
    from esclab.serving.predict import predict_file

    model = load_cross_validation(zeroshot_run / "models", fold=2)
    predictions = pd.read_csv(zeroshot_run / "reports/folds/2/predictions.csv")
    paths = pd.read_csv(tiny_data["split"]).set_index("filename")["path"]
    result = predict_file(paths[predictions["filename"][0]], model, hop=model.duration)
    expected = predictions.loc[0, [f"prob_{i}" for i in range(TINY["n_classes"])]].to_numpy(dtype=float)
    assert np.allclose(result["probabilities"], expected, atol=1e-4)


def test_export_refuses_a_clap_model_in_one_line(zeroshot_run, tmp_path):
    from esclab.serving.export import export

    with pytest.raises(EsclabError, match="holds clap models, whose feature extractor esclab export cannot turn into "
                                          "ONNX .*: use esclab predict or esclab serve"):
        export(zeroshot_run / "models", tmp_path / "export", fold=1)
    assert not (tmp_path / "export").exists()


def test_a_trained_head_reads_the_clap_cache(tiny_data, cache, clap_features, tmp_path):
    run = train_on_cache(tiny_data, cache, tmp_path, "experiment=clap_svm", *clap_features, "fold=2")
    history = pd.read_csv(run / "reports/folds/2/history.csv")
    assert list(history["C"]) == [0.0001, 0.001, 0.01]  # conf/model/svm.yaml's, chosen on validation
    assert len(pd.read_csv(run / "reports/folds/2/predictions.csv")) == 5


def test_the_template_is_what_the_text_tower_reads(tiny_clap):
    features = {"backbones": ["clap"], "weights": {"clap": str(tiny_clap)}}
    rows = np.ones((2, 1, 8), dtype=np.float32)

    def prompts(template: str):
        ((_, head),) = candidates("zeroshot", pooling="mean", seed=0, classes=["dog", "crying_baby"],
                                  features=features, template=template)
        return head.fit(rows)[-1]

    sound, recording = prompts("This is a sound of {label}."), prompts("A recording of {label}")
    assert sound.texts == ("This is a sound of dog.", "This is a sound of crying baby.")
    assert recording.texts == ("A recording of dog", "A recording of crying baby")
    assert not np.allclose(sound.prompt_embeddings_, recording.prompt_embeddings_)
    with pytest.raises(EsclabError, match=r"model.template='A dog' has no \{label\}"):
        prompts("A dog")


@pytest.mark.parametrize("setting, message", [
    ({"features": {"backbones": ["yamnet"], "weights": {}}}, r"reads CLAP embeddings alone, but "
                                                             r"features.backbones=\['yamnet'\]: set features=clap"),
    ({"balanced": True}, "trains nothing, so train.class_weights=balanced has nothing to weigh"),
    ({"C": [1.0]}, "model=zeroshot has no setting C"),
])
def test_zero_shot_refuses_what_it_cannot_honour(tiny_clap, setting, message):
    given = {"features": {"backbones": ["clap"], "weights": {"clap": str(tiny_clap)}}} | setting
    with pytest.raises(EsclabError, match=message):
        candidates("zeroshot", pooling="mean", seed=0, classes=["dog"], template="{label}", **given)


def test_an_uncached_hub_id_offline_ends_in_one_line(tiny_data, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(EsclabError) as error:
        embedding_cache(tiny_data["split"], tmp_path, "features=clap")
    assert str(error.value) == (
        "features.weights.clap=laion/clap-htsat-unfused: HF_HUB_OFFLINE=1 and it is not in the hub's cache; download "
        "it where the hub can be reached (`huggingface-cli download <id> --local-dir DIR`), copy DIR here and set "
        "features.weights.clap=DIR")
    assert not (tmp_path / "features").exists()


def test_train_py_runs_the_named_experiment(tiny_data, cache, clap_features, tmp_path):
    overrides = [o for o in tiny_overrides(tiny_data, tmp_path) if not o.startswith(("features.", "paths.features"))]
    command = [sys.executable, "train.py", ZEROSHOT, *clap_features, *overrides, "features.duration=1.0",
               f"paths.features={cache}", "fold=3", "tracking.log_model=false", f"hydra.run.dir={tmp_path / 'hydra'}"]
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"} | {"HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(pd.read_csv(tmp_path / "reports/folds/3/predictions.csv")) == 5
