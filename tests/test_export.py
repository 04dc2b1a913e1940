"""`esclab export`: one ONNX file per model, checked against the torch model, run without torch, and its bad inputs."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
import soundfile as sf
from conftest import embedding_run, esclab


@pytest.fixture(scope="module")
def cnn4_export(cnn4_run) -> Path:
    result = esclab("export", "--out", "exported", cwd=cnn4_run)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr  # nothing but the one line on stdout: no library noise
    return cnn4_run / "exported"


@pytest.fixture(scope="module")
def combo_run(tiny_data, tmp_path_factory) -> Path:
    """YAMNet and aiSFX side by side, a feed-forward head: both backbones, two input rates, the window grid."""
    return embedding_run(tiny_data, tmp_path_factory.mktemp("export_combo"), "features=yamnet_aisfx",
                         "experiment=yamnet_aisfx_ffn")


def probabilities(result: subprocess.CompletedProcess) -> list[dict[str, float]]:
    assert result.returncode == 0, result.stderr
    return [{e["class"]: e["probability"] for e in record["top"]} for record in json.loads(result.stdout)]


def test_the_export_holds_the_whole_model_and_says_what_it_is(cnn4_export, cnn4_run):
    record = json.loads((cnn4_export / "export.json").read_text())
    assert record["verified_max_abs_difference"] <= record["tolerance"] == 1e-3
    assert record["folds"] == [f"fold_{k}.ckpt" for k in range(1, 6)]
    model = onnx.load(str(cnn4_export / "model.onnx"))
    meta = json.loads({p.key: p.value for p in model.metadata_props}["esclab"])
    assert meta["inputs"] == {"waveform_16000": 16000} and meta["duration"] == 1.0
    assert meta["classes"] == record["classes"] and len(meta["classes"]) == 5
    assert [i.name for i in model.graph.input] == ["waveform_16000"]
    assert [o.name for o in model.graph.output] == ["probabilities"]
    sizes = {name: (cnn4_export / name).stat().st_size for name in ("model.onnx", "model.int8.onnx")}
    assert sizes == record["bytes"] and sizes["model.int8.onnx"] < sizes["model.onnx"] / 2
    assert record["int8_max_abs_difference"] > 0  # the int8 copy really is another model


@pytest.mark.parametrize("name", ["model.onnx", "model.int8.onnx"])
def test_the_exported_file_predicts_what_the_fold_models_predict(cnn4_export, cnn4_run, tiny_data, name):
    clips = pd.read_csv(tiny_data["split"])["path"][[0, 9, 17]].tolist()
    torch_answer = probabilities(esclab("predict", *clips, "--json", "-k", "5", cwd=cnn4_run))
    onnx_answer = probabilities(esclab("predict", "--models", str(cnn4_export / name), *clips, "--json", "-k", "5",
                                       cwd=cnn4_run))
    tolerance = 1e-4 if name == "model.onnx" else 0.05
    for ours, theirs in zip(onnx_answer, torch_answer):
        assert ours == pytest.approx(theirs, abs=tolerance)
        assert max(ours, key=ours.get) == max(theirs, key=theirs.get)


def test_the_device_resampler_is_trainings(cnn4_export, cnn4_run, tiny_data, tmp_path):
    """torchaudio's default filter, in numpy: a 44.1 kHz recording gets the answer the torch path gives it."""
    import librosa
    import torch
    import torchaudio

    from esclab.data.audio import resample

    rng = np.random.default_rng(0)
    for rate, target, length in [(16000, 44100, 16000), (44100, 16000, 44100), (48000, 16000, 4800), (8000, 16000, 7)]:
        x = rng.normal(0, 0.3, length).astype(np.float32)
        expected = torchaudio.functional.resample(torch.from_numpy(x), rate, target).numpy()
        assert resample(x, rate, target) == pytest.approx(expected, abs=1e-4)
    path = pd.read_csv(tiny_data["split"])["path"][4]
    audio, rate = sf.read(path, dtype="float32")
    sf.write(tmp_path / "44k.wav", librosa.resample(audio, orig_sr=rate, target_sr=44100), 44100, subtype="FLOAT")
    torch_answer = probabilities(esclab("predict", str(tmp_path / "44k.wav"), "--json", "-k", "5", cwd=cnn4_run))
    exported = str(cnn4_export / "model.onnx")
    onnx_answer = probabilities(esclab("predict", "--models", exported, str(tmp_path / "44k.wav"), "--json", "-k", "5",
                                       cwd=cnn4_run))
    assert onnx_answer[0] == pytest.approx(torch_answer[0], abs=1e-3)


def test_a_device_needs_numpy_and_onnxruntime_only(cnn4_export, tiny_data):
    """The whole prediction from the exported file, in a process that never imports torch."""
    clip = pd.read_csv(tiny_data["split"])["path"][0]
    script = ("import sys\n"
              "from esclab.serving.predict import main\n"
              f"status = main(['--models', {str(cnn4_export / 'model.int8.onnx')!r}, {clip!r}, '--json'])\n"
              "assert status == 0 and 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)[0]["top"][0]["probability"] > 0


def test_both_backbones_and_the_head_in_one_graph(combo_run, tiny_data):
    """YAMNet's own 8-bit graph, the aiSFX network, their window grid and the fold heads: one file, the same answers
    as the torch path for clips the synthetic data does not have (silence, a clipped burst) and one it has."""
    result = esclab("export", "--fold", "2", "--out", "exported", cwd=combo_run)
    assert result.returncode == 0, result.stderr
    exported = combo_run / "exported" / "model.onnx"
    meta = json.loads({p.key: p.value for p in onnx.load(str(exported)).metadata_props}["esclab"])
    assert meta["inputs"] == {"waveform_16000": 16000, "waveform_44100": 44100} and meta["folds"] == ["fold_2.ckpt"]
    rng = np.random.default_rng(3)
    sf.write(combo_run / "silence.wav", np.zeros(16000, dtype=np.float32), 16000)
    sf.write(combo_run / "clipped.wav", np.clip(rng.normal(0, 2, 12000), -1, 1).astype(np.float32), 16000)
    clips = [pd.read_csv(tiny_data["split"])["path"][5], "silence.wav", "clipped.wav"]
    torch_answer = probabilities(esclab("predict", "--fold", "2", *clips, "--json", "-k", "5", cwd=combo_run))
    onnx_answer = probabilities(esclab("predict", "--models", str(exported), *clips, "--json", "-k", "5",
                                       cwd=combo_run))
    for ours, theirs in zip(onnx_answer, torch_answer):
        assert ours == pytest.approx(theirs, abs=1e-4)


@pytest.fixture(scope="module")
def logistic_run(tiny_data, tmp_path_factory) -> Path:
    return embedding_run(tiny_data, tmp_path_factory.mktemp("export_logistic"), "features=yamnet",
                         "experiment=yamnet_svm", "model=logistic")


@pytest.mark.parametrize("head", ["svm", "logistic"])
def test_scikit_learn_heads_are_exported_as_their_arithmetic(head, head_run, logistic_run, tiny_data):
    """Pooling, standardising, the linear scores and softmax (logistic) or per-class Platt sigmoids (the SVM's
    calibration), in the graph: the probabilities scikit-learn gives."""
    run = head_run if head == "svm" else logistic_run
    result = esclab("export", "--out", "exported", cwd=run)
    assert result.returncode == 0, result.stderr
    clips = pd.read_csv(tiny_data["split"])["path"][[2, 8, 21]].tolist()
    torch_answer = probabilities(esclab("predict", *clips, "--json", "-k", "5", cwd=run))
    onnx_answer = probabilities(esclab("predict", "--models", str(run / "exported/model.onnx"), *clips, "--json",
                                       "-k", "5", cwd=run))
    for ours, theirs in zip(onnx_answer, torch_answer):
        assert ours == pytest.approx(theirs, abs=1e-4)


@pytest.mark.parametrize(("setup", "message"), [
    ("no models", "no fold models (fold_<k>.ckpt) in"),
    ("damaged export", "cannot load exported model"),
    ("missing export", "not found: write one with esclab export"),
    ("fold of an export", "--fold picks a fold of a cross-validation's folder"),
])
def test_bad_models_end_in_one_line(cnn4_export, tiny_data, tmp_path, setup, message):
    clip = pd.read_csv(tiny_data["split"])["path"][0]
    if setup == "no models":
        result = esclab("export", "--models", str(tmp_path), cwd=tmp_path)
    else:
        damaged = tmp_path / "model.onnx"
        damaged.write_bytes((cnn4_export / "model.onnx").read_bytes()[:20000])
        model = {"damaged export": damaged, "missing export": tmp_path / "none.onnx",
                 "fold of an export": cnn4_export / "model.onnx"}[setup]
        extra = ["--fold", "1"] if setup == "fold of an export" else []
        result = esclab("predict", "--models", str(model), *extra, clip, cwd=tmp_path)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith("esclab: error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "out").exists()  # nothing half-written
