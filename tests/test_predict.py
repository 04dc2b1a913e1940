"""`esclab predict` on models trained here: the training preprocessing reproduced, any audio a user has, bad input."""

import json
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
from conftest import esclab


def predict(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return esclab("predict", *args, cwd=cwd)


def predicted_as_in_training(run: Path, split: Path, fold: int, row: int) -> dict:
    """`esclab predict --fold <fold>` of the clip in row `row` of that fold's predictions.csv, checked against the
    probabilities the pipeline wrote there, class by class; the JSON record, for further checks."""
    table = pd.read_csv(run / f"reports/folds/{fold}/predictions.csv")
    clips = pd.read_csv(split)
    clip = clips.set_index("filename").loc[table["filename"][row], "path"]
    result = predict(clip, "--fold", str(fold), "--json", "-k", "5", cwd=run)
    assert result.returncode == 0, result.stderr
    (record,) = json.loads(result.stdout)
    classes = clips.drop_duplicates("label").set_index("label")["category"]
    expected = {classes[label]: table.loc[row, f"prob_{label}"] for label in classes.index}
    assert {e["class"]: e["probability"] for e in record["top"]} == pytest.approx(expected, abs=1e-4)
    return record


def test_a_test_clip_gets_the_probabilities_its_fold_model_gave_it_in_training(cnn4_run, tiny_data):
    """The model's own preprocessing, not the current config: the same numbers as the pipeline's predictions.csv."""
    record = predicted_as_in_training(cnn4_run, tiny_data["split"], fold=3, row=0)
    assert len(record["windows"]) == 1 and record["seconds"] == 1.0


def test_any_rate_channels_and_format_give_the_same_answer(cnn4_run, tiny_data, tmp_path):
    path = pd.read_csv(tiny_data["split"])["path"][7]
    audio, rate = sf.read(path, dtype="float32")
    sf.write(tmp_path / "stereo24.flac", np.stack([audio, audio], axis=1), rate, subtype="PCM_24")
    sf.write(tmp_path / "mono.ogg", audio, rate)
    import librosa

    sf.write(tmp_path / "resampled.wav", librosa.resample(audio, orig_sr=rate, target_sr=44100), 44100,
             subtype="FLOAT")
    result = predict(path, str(tmp_path), "--json", "-k", "5", cwd=cnn4_run)
    assert result.returncode == 0, result.stderr
    records = {Path(r["file"]).name: {e["class"]: e["probability"] for e in r["top"]}
               for r in json.loads(result.stdout)}
    original = records[Path(path).name]
    assert records["stereo24.flac"] == pytest.approx(original, abs=1e-3)
    # Lossy or resampled copies change the quiet bins of the log-mel a little; the answer stays.
    for name in ("mono.ogg", "resampled.wav"):
        assert max(records[name], key=records[name].get) == max(original, key=original.get), (name, records)
        assert sum(records[name].values()) == pytest.approx(1, abs=1e-3)


def test_a_long_recording_is_cut_into_windows_and_averaged(cnn4_run, tiny_data, tmp_path):
    split = pd.read_csv(tiny_data["split"])
    first, rate = sf.read(split["path"][0], dtype="float32")
    second, _ = sf.read(split["path"][12], dtype="float32")
    sf.write(tmp_path / "long.wav", np.concatenate([first, second, first[: rate // 4]]), rate)
    result = predict(str(tmp_path / "long.wav"), split["path"][0], "--json", "-k", "5", cwd=cnn4_run)
    assert result.returncode == 0, result.stderr
    long, alone = json.loads(result.stdout)
    # 2.25 s in 1-s windows every 0.5 s: starts 0, 0.5, 1.0, 1.5 (the last padded) -> 4 windows.
    assert [w["start"] for w in long["windows"]] == [0.0, 0.5, 1.0, 1.5] and long["seconds"] == 2.25
    assert long["windows"][0]["top"] == alone["top"]  # the first window is exactly the first clip
    mean = {}
    for w in long["windows"]:
        for e in w["top"]:
            mean[e["class"]] = mean.get(e["class"], 0) + e["probability"] / 4
    assert {e["class"]: e["probability"] for e in long["top"]} == pytest.approx(mean, abs=1e-3)
    table = predict(str(tmp_path / "long.wav"), cwd=cnn4_run)
    assert table.returncode == 0 and "1.50-2.50 s" in table.stdout and "%" in table.stdout


def test_csv_for_scripts(cnn4_run, tiny_data):
    path = pd.read_csv(tiny_data["split"])["path"][3]
    result = predict(path, "--csv", cwd=cnn4_run)
    assert result.returncode == 0, result.stderr
    rows = list(csv_rows(result.stdout))
    assert [r["rank"] for r in rows] == ["1", "2"] and all(r["window"] == "all" for r in rows)
    assert float(rows[0]["probability"]) >= float(rows[1]["probability"])


def csv_rows(text: str):
    import csv
    import io

    return csv.DictReader(io.StringIO(text))


def test_a_frozen_backbone_and_head_predict_through_the_backbone(head_run, tiny_data):
    predicted_as_in_training(head_run, tiny_data["split"], fold=2, row=1)


def test_bad_files_are_reported_and_the_rest_predicted(cnn4_run, tiny_data, tmp_path):
    good = pd.read_csv(tiny_data["split"])["path"][0]
    (tmp_path / "notes.wav").write_text("not audio")
    sf.write(tmp_path / "empty.wav", np.zeros(0, dtype=np.float32), 16000)
    result = predict(good, str(tmp_path / "notes.wav"), str(tmp_path / "empty.wav"), "--json", cwd=cnn4_run)
    assert result.returncode == 1
    assert [Path(r["file"]).name for r in json.loads(result.stdout)] == [Path(good).name]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and "cannot decode" in lines[0] and "notes.wav" in lines[0]
    assert "empty.wav holds no audio samples" in lines[1]


@pytest.mark.parametrize(("setup", "message"), [
    ("no models", "no fold models (fold_<k>.ckpt) in"),
    ("damaged model", "cannot load model"),
    ("empty folder", "no audio files"),
    ("no match", "no file matches"),
    ("mixed runs", "were trained on different features or classes"),
    ("old model", "was trained before esclab kept the preprocessing in its models; retrain it: dvc repro"),
])
def test_bad_models_and_inputs_end_in_one_line(cnn4_run, tiny_data, tmp_path, setup, message):
    """Each ends the command in one line on stderr, before any prediction is printed."""
    good = pd.read_csv(tiny_data["split"])["path"][0]
    args = [good, "--models", str(cnn4_run / "models")]
    if setup == "no models":
        args = [good, "--models", str(tmp_path)]
    elif setup == "damaged model":
        (tmp_path / "fold_1.ckpt").write_bytes((cnn4_run / "models/fold_1.ckpt").read_bytes()[:5000])
        args = [good, "--models", str(tmp_path)]
    elif setup == "empty folder":
        (tmp_path / "empty").mkdir()
        args[0] = str(tmp_path / "empty")
    elif setup == "no match":
        args[0] = str(tmp_path / "*.flac")
    elif setup == "old model":  # a head saved as its bare pipeline, as before models carried their preprocessing
        import joblib
        from sklearn.linear_model import LogisticRegression

        joblib.dump(LogisticRegression(), tmp_path / "fold_1.ckpt")
        args = [good, "--models", str(tmp_path)]
    else:
        import shutil

        for fold in range(1, 6):
            shutil.copy(cnn4_run / f"models/fold_{fold}.ckpt", tmp_path / f"fold_{fold}.ckpt")
        model = torch.load(tmp_path / "fold_2.ckpt", weights_only=False)
        model["hyper_parameters"]["preprocessing"]["settings"]["n_mels"] = 64
        torch.save(model, tmp_path / "fold_2.ckpt")
        args = [good, "--models", str(tmp_path)]
    result = predict(*args, cwd=tmp_path)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith("esclab: error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_models_from_mlflow_a_registered_version_and_a_fold_run(cnn4_run, tiny_data):
    """A finished cross-validation registers itself (tracking.register_as, here cnn4-synthetic); models:/ and runs:/
    give what the workspace's folder gives."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{cnn4_run / 'mlflow.db'}"
    client = MlflowClient(uri)
    (version,) = client.search_model_versions("name = 'cnn4-synthetic'")
    clip = pd.read_csv(tiny_data["split"])["path"][11]

    def answer(*args: str) -> dict:
        result = predict(clip, "--json", "-k", "5", "--tracking-uri", uri, *args, cwd=cnn4_run)
        assert result.returncode == 0, result.stderr
        return {e["class"]: e["probability"] for e in json.loads(result.stdout)[0]["top"]}

    folder = answer()
    assert answer("--models", f"models:/cnn4-synthetic/{version.version}") == folder
    assert answer("--models", "models:/cnn4-synthetic/latest") == folder
    (fold_run,) = client.search_runs([client.get_run(version.run_id).info.experiment_id],
                                     "tags.`esclab.fold` = '3'")
    assert answer("--models", f"runs:/{fold_run.info.run_id}") == answer("--fold", "3")


@pytest.mark.parametrize(("models", "message"), [
    ("models:/no-such-model/1", "is not in the model registry at sqlite:///"),
    ("models:/no-such-model/latest", "no registered model 'no-such-model' at sqlite:///"),
    ("runs:/0123456789abcdef0123456789abcdef", "cannot read runs:/0123456789abcdef0123456789abcdef from MLflow"),
])
def test_unknown_mlflow_models_end_in_one_line(cnn4_run, tiny_data, models, message):
    clip = pd.read_csv(tiny_data["split"])["path"][0]
    result = predict(clip, "--models", models, "--tracking-uri", f"sqlite:///{cnn4_run / 'mlflow.db'}", cwd=cnn4_run)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith("esclab: error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
