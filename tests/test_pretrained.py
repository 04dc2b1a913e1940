"""Hugging Face audio models fine-tuned on the waveform cache, and frozen through the embedding cache.

No hub weights can be fetched here, so the loading code runs on real files: tiny
randomly initialised models built from each library's own config classes and saved
with `save_pretrained` into a folder that `model.checkpoint` points at.
"""

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO, compose_config, esclab, free_port, printed_warnings, tiny_overrides

from esclab.data.representations import write_cache
from esclab.errors import EsclabError
from esclab.training.module import Classifier
from esclab.training.run import train


def tiny_models() -> dict:
    """(config, feature extractor, model class) of each family, at a few thousand parameters, for 1-s 16 kHz clips."""
    import transformers as T

    return {
        # HuBERT and WavLM load through the same Auto classes as wav2vec2, with no code of their own.
        **{family: (config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                           conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 4), num_conv_pos_embeddings=16,
                           num_conv_pos_embedding_groups=2, classifier_proj_size=16, vocab_size=10),
                    T.Wav2Vec2FeatureExtractor(), model)
           for family, config, model in (("wav2vec2", T.Wav2Vec2Config, T.Wav2Vec2Model),
                                         ("hubert", T.HubertConfig, T.HubertModel),
                                         ("wavlm", T.WavLMConfig, T.WavLMModel))},
        "whisper": (T.WhisperConfig(d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                                    decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_mel_bins=8,
                                    max_source_positions=50, max_target_positions=16, vocab_size=100, pad_token_id=0,
                                    bos_token_id=1, eos_token_id=2, decoder_start_token_id=1, classifier_proj_size=16),
                    T.WhisperFeatureExtractor(feature_size=8, chunk_length=1), T.WhisperModel),
        "ast": (T.ASTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                            num_mel_bins=16, max_length=64, patch_size=16),
                T.ASTFeatureExtractor(num_mel_bins=16, max_length=64), T.ASTModel),
    }


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Each family's tiny pretrained model, as `save_pretrained` writes it (what a hub snapshot holds)."""
    root = tmp_path_factory.mktemp("checkpoints")
    torch.manual_seed(0)
    folders = {}
    for family, (config, extractor, model) in tiny_models().items():
        folders[family] = root / family
        model(config).save_pretrained(folders[family])
        extractor.save_pretrained(folders[family])
    return folders


@pytest.fixture(scope="module")
def waveforms(tiny_data, tmp_path_factory) -> Path:
    """The tiny dataset's waveform cache: 1-s clips at 16 kHz."""
    features = compose_config("features=waveform", "features.duration=1.0", "features.num_workers=0").features
    return write_cache(tiny_data["split"], tmp_path_factory.mktemp("waveforms") / "features", features)


def finetune_overrides(data: dict, cache: Path, out: Path, checkpoint: Path, *extra: str) -> list[str]:
    """A one-epoch fine-tuning run of `checkpoint` on the tiny waveform cache, writing under `out`."""
    tiny = [o for o in tiny_overrides(data, out, "tracking.log_model=false", "trainer.max_epochs=1")
            if not o.startswith(("features.", "paths.features"))]
    return [*tiny, "features=waveform", "features.duration=1.0", f"paths.features={cache}",
            f"model.checkpoint={checkpoint}", *extra]


def finetune(data: dict, cache: Path, out: Path, checkpoint: Path, *extra: str) -> Path:
    train(compose_config(*finetune_overrides(data, cache, out, checkpoint, *extra)))
    return out


@pytest.mark.parametrize(("family", "model", "augment"), [
    ("whisper", "whisper", "none"), ("ast", "ast", "none"), ("hubert", "wav2vec2", "none"),
    ("wavlm", "wav2vec2", "none"), ("wav2vec2", "wav2vec2", "waveform_strong")])
def test_one_fine_tuning_epoch_of_each_family(tiny_data, waveforms, checkpoints, tmp_path, family, model, augment):
    """HuBERT and WavLM are `model=wav2vec2` with another checkpoint. (wav2vec2's own run is train.py's, below:
    here it trains on waveforms mixed, louder, shifted and noisier.)"""
    out = finetune(tiny_data, waveforms, tmp_path, checkpoints[family], f"model={model}", "fold=2",
                   f"augment={augment}")
    predictions = pd.read_csv(out / "reports/folds/2/predictions.csv")
    assert set(predictions["fold"]) == {2} and len(predictions) == 5
    assert np.allclose(predictions.filter(like="prob_").sum(axis=1), 1, atol=1e-5)
    history = pd.read_csv(out / "reports/folds/2/history.csv")
    assert list(history["epoch"]) == [0] and history["val/acc"].notna().all() and history["train/loss"].notna().all()


def test_the_backbone_trains_at_backbone_lr_the_new_head_at_lr_and_the_feature_encoder_can_stay_frozen(checkpoints):
    model = dict(compose_config("model=wav2vec2", f"model.checkpoint={checkpoints['wav2vec2']}",
                                "model.backbone_lr=1e-5", "features=waveform").model)
    optimizer = dict(compose_config("optimizer=adamw", "lr=1e-3").optimizer)
    module = Classifier(model=model, n_classes=5, input_shape=(16000,), optimizer=optimizer)
    head, backbone = module.configure_optimizers().param_groups
    network = module.model.network
    names = {id(p): name for name, p in network.named_parameters()}
    assert (head["lr"], backbone["lr"]) == (1e-3, 1e-5)
    assert sorted(names[id(p)] for p in head["params"]) == [
        "classifier.bias", "classifier.weight", "projector.bias", "projector.weight"]
    encoder = {name for name, p in network.named_parameters() if name.startswith("wav2vec2.feature_extractor.")}
    assert encoder and not {names[id(p)] for p in backbone["params"]} & encoder  # frozen: in no group
    assert not any(p.requires_grad for name, p in network.named_parameters() if name in encoder)
    assert len(head["params"]) + len(backbone["params"]) == sum(p.requires_grad for p in network.parameters())

    model |= {"backbone_lr": None, "freeze_feature_encoder": False}
    (everything,) = Classifier(model=model, n_classes=5, input_shape=(16000,),
                               optimizer=optimizer).configure_optimizers().param_groups
    assert everything["lr"] == 1e-3 and len(everything["params"]) == len(list(network.parameters()))


def test_a_model_without_a_feature_encoder_refuses_to_freeze_one(checkpoints):
    model = dict(compose_config("model=whisper", f"model.checkpoint={checkpoints['whisper']}", "features=waveform",
                                "model.freeze_feature_encoder=true").model)
    with pytest.raises(EsclabError, match="model.freeze_feature_encoder=true, but WhisperForAudioClassification"):
        Classifier(model=model, n_classes=5, input_shape=(16000,), optimizer={})


def test_another_sample_rate_is_refused_by_name(checkpoints):
    model = dict(compose_config("model=ast", f"model.checkpoint={checkpoints['ast']}", "features=waveform",
                                "features.sample_rate=44100").model)
    with pytest.raises(EsclabError, match="reads 16000 Hz audio, but the waveform cache is at 44100 Hz: set "
                                          "features.sample_rate=16000"):
        Classifier(model=model, n_classes=5, input_shape=(44100,), optimizer={})


@pytest.fixture(scope="module")
def wav2vec2_run(tiny_data, waveforms, checkpoints, tmp_path_factory) -> Path:
    """Fold 2 fine-tuned from a copy of the tiny wav2vec2, the copy deleted afterwards."""
    out = tmp_path_factory.mktemp("wav2vec2_run")
    copy = shutil.copytree(checkpoints["wav2vec2"], out / "wav2vec2-copy")
    finetune(tiny_data, waveforms, out, copy, "experiment=wav2vec2_finetune", "fold=2", "trainer.max_epochs=1",
             "train.batch_size=8")
    shutil.rmtree(copy)
    return out


def test_cpu_reruns_are_byte_identical_and_the_test_fold_never_chooses_the_model(
        wav2vec2_run, tiny_data, waveforms, checkpoints, tmp_path):
    """Again from the original folder, on a cache whose test-fold clips are noise: the same training to the byte
    (history.csv), so nothing of the test fold reached training or validation; only its predictions differ."""
    scrambled = Path(shutil.copytree(waveforms, tmp_path / "scrambled"))
    array = np.load(scrambled / "waveform.npy", mmap_mode="r+")
    test_rows = np.flatnonzero(pd.read_csv(scrambled / "index.csv")["fold"].to_numpy() == 2)
    array[test_rows] = np.random.default_rng(0).normal(0, 0.3, array[test_rows].shape).astype(np.float16)
    array.flush()
    for cache, out in ((waveforms, tmp_path / "again"), (scrambled, tmp_path / "noisy")):
        finetune(tiny_data, cache, out, checkpoints["wav2vec2"], "experiment=wav2vec2_finetune", "fold=2",
                 "trainer.max_epochs=1", "train.batch_size=8")
    first, again, noisy = (out / "reports/folds/2" for out in (wav2vec2_run, tmp_path / "again", tmp_path / "noisy"))
    assert (first / "history.csv").read_bytes() == (again / "history.csv").read_bytes()
    assert (first / "predictions.csv").read_bytes() == (again / "predictions.csv").read_bytes()
    assert (first / "history.csv").read_bytes() == (noisy / "history.csv").read_bytes()
    assert (first / "predictions.csv").read_bytes() != (noisy / "predictions.csv").read_bytes()


def test_a_fine_tuned_fold_predicts_with_its_pretrained_folder_gone(wav2vec2_run, tiny_data, capsys):
    from esclab.serving.predict import main

    predictions = pd.read_csv(wav2vec2_run / "reports/folds/2/predictions.csv")
    table = pd.read_csv(tiny_data["split"])
    paths = dict(zip(table["filename"], table["path"]))
    classes = table.drop_duplicates("label").sort_values("label")["category"].tolist()
    assert not (wav2vec2_run / "wav2vec2-copy").exists()
    files = [paths[name] for name in predictions["filename"]]
    assert main([*files, "--models", str(wav2vec2_run / "models"), "--fold", "2", "--json", "-k", "5"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert len(records) == len(predictions) == 5
    for record, (_, row) in zip(records, predictions.iterrows()):  # each file is one window: its cache row
        for entry in record["top"]:
            assert entry["probability"] == pytest.approx(row[f"prob_{classes.index(entry['class'])}"], abs=1e-4)


def test_export_refuses_a_fine_tuned_model_in_one_line(wav2vec2_run, tmp_path):
    from esclab.serving.export import export

    models = wav2vec2_run / "models"
    with pytest.raises(EsclabError, match=f"{models} holds fine-tuned Hugging Face models, whose feature extractor "
                                          "esclab export cannot turn into ONNX"):
        export(models, tmp_path / "export", fold=2)
    assert not (tmp_path / "export").exists()


def test_train_py_fine_tunes_wav2vec2_end_to_end(tiny_data, waveforms, checkpoints, tmp_path):
    """`python train.py experiment=wav2vec2_finetune` at tiny sizes, one fold, offline: its outputs and MLflow run,
    which holds the fold's checkpoint (the model: the feature extractor's numpy leaves no graph to log)."""
    overrides = finetune_overrides(tiny_data, waveforms, tmp_path, checkpoints["wav2vec2"],
                                   "experiment=wav2vec2_finetune", "fold=1", "trainer.max_epochs=1",
                                   "train.batch_size=8", "trainer.accumulate_grad_batches=2")
    overrides = [o for o in overrides if o != "tracking.log_model=false"]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(REPO / "train.py"), *overrides], cwd=tmp_path, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert printed_warnings(result.stdout + result.stderr) == []
    assert set(pd.read_csv(tmp_path / "reports/folds/1/predictions.csv")["fold"]) == {1}

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("esclab").experiment_id])
    child = next(r for r in runs if r.data.tags["esclab.fold"] == "1")
    assert child.data.params["model.checkpoint"] == str(checkpoints["wav2vec2"])
    assert child.data.params["trainer.accumulate_grad_batches"] == "2"
    assert [a.path for a in client.list_artifacts(child.info.run_id, "checkpoint")] == ["checkpoint/fold_1.ckpt"]


@pytest.fixture(scope="module")
def frozen(tiny_data, checkpoints, tmp_path_factory) -> Path:
    """The tiny dataset's embedding cache of the tiny wav2vec2, used frozen (features=wav2vec2)."""
    features = compose_config("features=wav2vec2", "features.duration=1.0",
                              f"features.weights.wav2vec2={checkpoints['wav2vec2']}").features
    return write_cache(tiny_data["split"], tmp_path_factory.mktemp("frozen") / "features", features)


def test_a_frozen_encoder_caches_its_hidden_state_averaged_over_yamnets_windows(frozen, tiny_data, checkpoints):
    from esclab.data.features import load_clips
    from esclab.models.backbones import build_backbone
    from esclab.models.backbones.hub import weights_sha256

    array = np.load(frozen / "embedding.npy", mmap_mode="r")
    assert array.shape == (25, 2, 16) and array.dtype == np.float16  # 1 s: two 0.96 s windows, as YAMNet's
    settings = json.loads((frozen / "features.json").read_text())["settings"]
    assert settings["weights_sha256"] == {"wav2vec2": weights_sha256(checkpoints["wav2vec2"])}
    encoder = build_backbone("wav2vec2", checkpoints["wav2vec2"])
    clip = load_clips(pd.read_csv(tiny_data["split"])["path"][3], sample_rate=16000, n_samples=16000)[0]
    embeddings, scores = encoder(clip)
    assert scores is None and np.allclose(array[3], embeddings, atol=1e-2, rtol=1e-2)
    import transformers

    hidden = transformers.AutoModel.from_pretrained(checkpoints["wav2vec2"])(
        torch.from_numpy((clip - clip.mean()) / np.sqrt(clip.var() + 1e-7))[None]).last_hidden_state[0]
    # The tiny encoder's strides make 799 frames of 1/799 s: those centred in 0-0.96 s are the first 767, those
    # in 0.48-1.44 s the last 415.
    assert len(hidden) == 799
    assert np.allclose(embeddings, [hidden[:767].mean(0).detach(), hidden[384:].mean(0).detach()], atol=1e-5)


def test_seed_001s_wav2vec2_and_ffn_trains_on_the_frozen_cache(frozen, tiny_data, checkpoints, tmp_path):
    tiny = [o for o in tiny_overrides(tiny_data, tmp_path, "tracking.log_model=false", "trainer.max_epochs=2", "fold=3")
            if not o.startswith(("features.", "paths.features"))]
    train(compose_config("experiment=wav2vec2_ffn", *tiny, "features.duration=1.0", f"paths.features={frozen}",
                         f"features.weights.wav2vec2={checkpoints['wav2vec2']}"))
    predictions = pd.read_csv(tmp_path / "reports/folds/3/predictions.csv")
    assert set(predictions["fold"]) == {3} and len(predictions) == 5


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """huggingface_hub pointed at an empty cache and at `endpoint` (its settings are read at import: set here)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))

    def point_at(endpoint: str, offline: bool = False):
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)

    return point_at


class NoSuchRepo(BaseHTTPRequestHandler):
    """The hub's answer for an id that does not exist: 404 with its error code."""

    def do_GET(self):
        self.send_response(404)
        self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


FIX = (r"download it where the hub can be reached \(`huggingface-cli download <id> --local-dir DIR`\), copy DIR "
       r"here and set model.checkpoint=DIR$")


def test_an_id_the_hub_does_not_have_is_one_line_naming_the_setting(hub):
    from esclab.models.backbones.hub import resolve

    server = ThreadingHTTPServer(("127.0.0.1", 0), NoSuchRepo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        hub(f"http://127.0.0.1:{server.server_address[1]}")
        with pytest.raises(EsclabError, match="model.checkpoint=org/no-such-model is not a model the hub lets us "
                                              f"download, nor a folder here: check the id, or {FIX}"):
            resolve("org/no-such-model", "model.checkpoint")
    finally:
        server.shutdown()
        server.server_close()


def test_an_unreachable_hub_is_one_line_with_the_offline_fix(hub):
    from esclab.models.backbones.hub import resolve

    hub(f"http://127.0.0.1:{free_port()}")  # nothing listens there
    with pytest.raises(EsclabError, match=f"model.checkpoint=facebook/wav2vec2-base: the Hugging Face hub cannot be "
                                          f"reached; {FIX}"):
        resolve("facebook/wav2vec2-base", "model.checkpoint")


def test_a_folder_without_weights_is_refused_by_name(checkpoints, tmp_path):
    from esclab.models.backbones.hub import resolve

    folder = Path(shutil.copytree(checkpoints["ast"], tmp_path / "ast"))
    (folder / "model.safetensors").unlink()
    with pytest.raises(EsclabError, match=f"model.checkpoint={folder}: {folder} holds no config.json and weights"):
        resolve(str(folder), "model.checkpoint")


def test_offline_without_the_model_is_one_line_from_the_features_stage(tiny_data, tmp_path):
    """HF_HUB_OFFLINE=1 and an id not in the hub's cache: `esclab features` prints one line, no traceback."""
    env_overrides = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub-cache")}
    result = esclab("features", "features=wav2vec2", f"paths.split={tiny_data['split']}",
                    f"paths.features={tmp_path / 'features'}", cwd=tmp_path, env=env_overrides)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "esclab: error: features.weights.wav2vec2=facebook/wav2vec2-base: HF_HUB_OFFLINE=1 and it is not in the hub's "
        "cache; download it where the hub can be reached (`huggingface-cli download <id> --local-dir DIR`), copy DIR "
        "here and set features.weights.wav2vec2=DIR"]
    assert not (tmp_path / "features").exists()


def test_a_frozen_whisper_averages_only_the_frames_of_the_audio_not_of_its_padding(checkpoints):
    """Whisper's extractor pads every clip to its input length (1 s for the tiny one): half a second of audio is
    the first half of the encoder's frames, and only those make the clip's embedding."""
    import transformers

    from esclab.models.backbones import build_backbone

    clip = np.sin(2 * np.pi * 440 * np.arange(8000) / 16000).astype(np.float32)
    embeddings, _ = build_backbone("whisper", checkpoints["whisper"])(clip)
    extractor = transformers.WhisperFeatureExtractor.from_pretrained(checkpoints["whisper"])
    encoder = transformers.WhisperModel.from_pretrained(checkpoints["whisper"]).encoder.eval()
    with torch.inference_mode():
        frames = encoder(extractor(clip, sampling_rate=16000, return_tensors="pt").input_features).last_hidden_state[0]
    assert len(frames) == 50 and embeddings.shape == (1, 16)  # 0.5 s: one window
    assert np.allclose(embeddings[0], frames[:25].mean(0), atol=1e-5)
    assert not np.allclose(embeddings[0], frames.mean(0), atol=1e-3)


def test_a_hub_id_takes_a_revision_and_names_the_one_it_resolved_to(hub, checkpoints, caplog):
    """Offline, from the hub's cache as huggingface_hub lays it out (refs/main names a commit, snapshots/<commit>/
    holds its files): a bare id resolves to main's commit, and the log says how to pin it; `id@<commit>` to that
    commit's files whatever main says; a revision the cache lacks is one line naming it."""
    from huggingface_hub import constants

    from esclab.models.backbones.hub import resolve

    hub("http://127.0.0.1:9", offline=True)
    repo = Path(constants.HF_HUB_CACHE) / "models--esclab--tiny"
    old, new = "1" * 40, "2" * 40
    shutil.copytree(checkpoints["wav2vec2"], repo / "snapshots" / old)
    shutil.copytree(checkpoints["hubert"], repo / "snapshots" / new)
    (repo / "refs").mkdir()
    (repo / "refs/main").write_text(new)
    with caplog.at_level(logging.INFO, logger="esclab.models.backbones.hub"):
        current = resolve("esclab/tiny", "model.checkpoint")
    assert (current.folder, current.revision) == (repo / "snapshots" / new, new)
    assert f"to keep these weights: model.checkpoint=esclab/tiny@{new}" in caplog.text
    pinned = resolve(f"esclab/tiny@{old}", "model.checkpoint")
    assert pinned.folder == repo / "snapshots" / old and pinned.exact_name == f"esclab/tiny@{old}"
    assert pinned.sha256 != current.sha256
    with pytest.raises(EsclabError, match=f"model.checkpoint=esclab/tiny@{'3' * 40}: HF_HUB_OFFLINE=1 and it is not "
                                          "in the hub's cache"):
        resolve(f"esclab/tiny@{'3' * 40}", "model.checkpoint")
    folder = resolve(str(pinned.folder), "model.checkpoint")  # a folder is itself: no revision
    assert folder.revision is None and folder.exact_name == str(pinned.folder)
