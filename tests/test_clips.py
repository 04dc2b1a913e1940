"""features.clips=windows: files of any length cut into windows of features.duration, a cache row each, labelled
with the file's class and kept in its fold; predictions one row per file, its windows' probabilities averaged."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
from conftest import compose_config

from esclab.data.clips import window_starts, windows
from esclab.data.representations import cache_settings, write_cache
from esclab.errors import EsclabError
from esclab.training.data import check_cache
from esclab.training.run import prediction_table

# (seconds, rate, channels) of each file; 16 kHz is the caches' rate, so a window of those is an exact cut.
FILES = {"long.wav": (2.6, 16000, 1), "short.wav": (0.4, 16000, 1), "odd.wav": (1.7, 22050, 2)}
# 1-s windows every 0.5 s: long 0, .5, 1, 1.5, 2 (2.5 holds 0.1 s); short one padded window; odd 0, .5, 1 (1.5: 0.2 s)
STARTS = {"long.wav": [0.0, 0.5, 1.0, 1.5, 2.0], "short.wav": [0.0], "odd.wav": [0.0, 0.5, 1.0]}
DECODED = ("features.sample_rate=16000", "features.duration=1.0", "features.num_workers=0", "features.device=cpu")
SMALL = {"features=logmel": ("features=logmel", *DECODED, "features.n_fft=256", "features.hop_length=128",
                             "features.n_mels=16"),
         "features=waveform": ("features=waveform", *DECODED)}
WINDOWS = ("features.clips=windows", "features.hop=0.5")


@pytest.mark.parametrize(("seconds", "duration", "hop", "starts"), [
    (0.3, 1.0, 1.0, [0.0]),                  # shorter than a window: one window, zero-padded
    (1.0, 1.0, 1.0, [0.0]),                  # exactly one window
    (1.49, 1.0, 1.0, [0.0]),                 # the rest holds less than half a window: left out
    (1.5, 1.0, 1.0, [0.0, 1.0]),             # half a window: kept, zero-padded
    (3.0, 1.0, 0.5, [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]),  # overlapping windows; the last one half audio
    (5.0, 2.0, 2.0, [0.0, 2.0, 4.0]),
    (2.0, 1.0, 0.3, [0.0, 0.3, 0.6, 0.9, 1.2, 1.5]),  # starts are k * hop, however the floats round
])
def test_window_starts(seconds, duration, hop, starts):
    assert window_starts(seconds, duration, hop) == starts


@pytest.fixture(scope="module")
def split_csv(tmp_path_factory) -> Path:
    """A split table of three real files of different lengths, rates and channel counts."""
    root = tmp_path_factory.mktemp("clips")
    rng = np.random.default_rng(0)
    rows = []
    for label, (name, (seconds, rate, channels)) in enumerate(FILES.items()):
        sf.write(root / name, 0.3 * rng.uniform(-1, 1, (round(seconds * rate), channels)), rate, subtype="FLOAT")
        rows.append({"path": str(root / name), "filename": name, "label": label, "category": name[:-4],
                     "fold": label + 1, "src_file": name})
    pd.DataFrame(rows).to_csv(root / "split.csv", index=False)
    return root / "split.csv"


def test_the_window_table_repeats_each_files_row_with_its_starts(split_csv):
    table = pd.read_csv(split_csv)
    rows = windows(table, duration=1.0, hop=0.5)
    assert list(rows.columns) == [*table.columns, "start"]
    assert rows.groupby("filename", sort=False)["start"].apply(list).to_dict() == STARTS
    pd.testing.assert_frame_equal(rows.drop(columns="start").drop_duplicates().reset_index(drop=True), table)
    assert windows(table, duration=1.0)["start"].tolist() == [0.0, 1.0, 2.0, 0.0, 0.0, 1.0]  # hop null: duration


def cut_file(path: str, start: float, duration: float, out: Path) -> Path:
    """The part of a 16-kHz file a window covers, written as a file of its own."""
    audio, rate = sf.read(path, dtype="float32")
    sf.write(out, audio[round(start * rate):round((start + duration) * rate)], rate, subtype="FLOAT")
    return out


def padded_cache(files: list[Path], out: Path, *overrides: str) -> np.ndarray:
    """The clips=pad cache of `files`, one row each."""
    table = pd.DataFrame({"path": [str(f) for f in files], "filename": [f.name for f in files], "label": 0,
                          "category": "x", "fold": 1, "src_file": [f.name for f in files]})
    table.to_csv(out.with_suffix(".csv"), index=False)
    cache = write_cache(out.with_suffix(".csv"), out, compose_config(*overrides).features)
    return np.load(cache / json.loads((cache / "features.json").read_text()).get("array", "logmel.npy"))


@pytest.mark.parametrize("features", SMALL)
def test_each_window_row_is_the_padded_row_of_the_file_cut_to_that_window(split_csv, tmp_path, features):
    cache = write_cache(split_csv, tmp_path / "windows", compose_config(*SMALL[features], *WINDOWS).features)
    index = pd.read_csv(cache / "index.csv")
    array = np.load(cache / ("logmel.npy" if features.endswith("logmel") else "waveform.npy"))
    assert len(array) == len(index) == sum(len(s) for s in STARTS.values())
    settings = json.loads((cache / "features.json").read_text())["settings"]
    assert (settings["clips"], settings["hop"]) == ("windows", 0.5)
    at_16k = index[index["filename"] != "odd.wav"]
    cuts = [cut_file(row.path, row.start, 1.0, tmp_path / f"cut{i}.wav") for i, row in enumerate(at_16k.itertuples())]
    expected = padded_cache(cuts, tmp_path / "cuts", *SMALL[features])
    assert array[at_16k.index].tobytes() == expected.tobytes()
    if features.endswith("waveform"):  # a resampled file: each window is a slice of the whole file's resampled decode
        whole = padded_cache([Path(index["path"][index["filename"] == "odd.wav"].iloc[0])], tmp_path / "whole",
                             *SMALL[features], "features.duration=2.0")[0]
        for row in index[index["filename"] == "odd.wav"].itertuples():
            start = round(row.start * 16000)
            expected = np.pad(whole[start:start + 16000], (0, max(0, start + 16000 - len(whole))))
            assert np.array_equal(array[row.Index], expected)


def test_embedding_windows_are_the_padded_embeddings_of_the_cut_files(split_csv, tmp_path):
    yamnet = ("features=yamnet", "features.duration=1.0")
    cache = write_cache(split_csv, tmp_path / "windows", compose_config(*yamnet, *WINDOWS).features)
    index = pd.read_csv(cache / "index.csv")
    array = np.load(cache / "embedding.npy")
    assert array.shape[:2] == (len(index), 2)  # 1-s windows: two 0.96-s YAMNet windows each
    long = index[index["filename"] == "long.wav"]
    cuts = [cut_file(row.path, row.start, 1.0, tmp_path / f"cut{i}.wav") for i, row in enumerate(long.itertuples())]
    assert array[long.index].tobytes() == padded_cache(cuts, tmp_path / "cuts", *yamnet).tobytes()


def test_a_cache_built_one_way_is_refused_when_the_config_says_the_other(split_csv, tmp_path):
    small = SMALL["features=logmel"]
    padded = write_cache(split_csv, tmp_path / "pad", compose_config(*small).features)
    with pytest.raises(EsclabError, match=r"built with other settings: features.clips=windows \(cache has pad\), "
                                          r"features.hop=0.5 \(cache has None\); rebuild it with `dvc repro features`"):
        check_cache(padded, "logmel", cache_settings(compose_config(*small, *WINDOWS).features))
    # A padded cache's features.json is what it was before features.clips existed; it names no clips.
    assert not {"clips", "hop"} & set(json.loads((padded / "features.json").read_text())["settings"])
    check_cache(padded, "logmel", cache_settings(compose_config(*small).features))
    with pytest.raises(EsclabError, match=r"features.clips=windows \(cache has pad\)"):
        check_cache(padded, "logmel", cache_settings(compose_config(*small, *WINDOWS).features))


@pytest.mark.parametrize(("overrides", "message"), [
    (("features.clips=crop",), r"^features.clips must be one of pad, windows; got 'crop'$"),
    (("features.clips=windows", "features.hop=0"), r"^features.hop must be positive seconds or null, got 0$"),
    (("features.hop=0.5",), r"^features.hop=0.5 only applies to features.clips=windows: set features.clips=windows, "
                            r"or features.hop=null$"),
])
@pytest.mark.parametrize("features", SMALL)
def test_bad_clip_settings_are_refused_by_name(features, overrides, message):
    with pytest.raises(EsclabError, match=message):
        cache_settings(compose_config(features, *overrides).features)


def test_a_files_probability_is_the_mean_of_its_windows():
    index = pd.DataFrame({"filename": ["a", "a", "a", "b", "c", "c"], "fold": 2, "label": [0, 0, 0, 1, 1, 1],
                          "start": [0.0, 0.5, 1.0, 0.0, 0.0, 0.5]})
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.1, 0.9], [0.3, 0.7], [0.6, 0.4], [0.8, 0.2]], dtype=np.float32)
    table = prediction_table(index, np.array([3, 0, 1, 2, 4, 5]), probs[[3, 0, 1, 2, 4, 5]])
    assert list(table["filename"]) == ["b", "a", "c"] and list(table["label"]) == [1, 0, 1]
    assert np.allclose(table[["prob_0", "prob_1"]], [[0.3, 0.7], [0.4, 0.6], [0.7, 0.3]])
    assert list(table["pred"]) == [1, 1, 0]


def test_train_on_windows_predicts_each_file_once_from_its_own_fold(folder_tree, tmp_path):
    """dataset=synthetic_folder (files of 0.5-4 s) in 1-s windows every 0.5 s, every file its own source (src_file
    is the file name): a file's windows share its fold, never straddle training and validation, and each fold's
    predictions.csv has one row per file; the trained model predicts a long file by its windows."""
    from esclab.data.folder import write_folder_split
    from esclab.serving.predict import predict_file
    from esclab.serving.sources import load_model
    from esclab.training.run import fold_data, train

    tree = folder_tree  # read only
    table = write_folder_split(tree, tmp_path / "split.csv", n_folds=3)
    paths = [f"paths.raw={tree}", f"paths.split={tmp_path / 'split.csv'}", f"paths.features={tmp_path / 'features'}",
             f"paths.models={tmp_path / 'models'}", f"paths.reports={tmp_path / 'reports'}"]
    cfg = compose_config("dataset=synthetic_folder", "dataset.n_folds=3", "dataset.folder.group_pattern=null",
                         *SMALL["features=logmel"],
                         *WINDOWS, *paths, "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
                         "train.batch_size=32", "tracking.log_model=false", "tracking.register_as=null",
                         f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}")
    write_cache(tmp_path / "split.csv", tmp_path / "features", cfg.features)
    index = pd.read_csv(tmp_path / "features/index.csv")
    assert len(index) > 2 * len(table) and index.groupby("filename")["fold"].nunique().max() == 1
    assert (index["src_file"] == index["filename"]).all()

    train(cfg)
    assert json.loads((tmp_path / "reports/metrics.json").read_text())["n_clips"] == len(table) == 78
    for fold in (1, 2, 3):
        predictions = pd.read_csv(tmp_path / f"reports/folds/{fold}/predictions.csv")
        assert sorted(predictions["filename"]) == sorted(table["filename"][table["fold"] == fold])
        data = fold_data(cfg, fold)
        sides = [set(data.index["filename"][rows]) for rows in (data.train_rows, data.val_rows, data.test_rows)]
        assert all(sides) and not (sides[0] & sides[1] or sides[0] & sides[2] or sides[1] & sides[2])

    model = load_model(tmp_path / "models")
    assert model.duration == 1.0
    longest = max(table["path"], key=lambda p: sf.info(p).duration)  # about 4 s: windows every 0.5 s
    assert len(predict_file(Path(longest), model, hop=0.5)["windows"]) > 4
