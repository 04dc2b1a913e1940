"""The synthetic ESC-50 look-alike: ESC-50's layout and rules, the same bytes every time, learnable classes."""

import hashlib
import re
import zipfile

import librosa
import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from esclab.data.synthetic import CATEGORIES, ESC10, write_archive, write_tree
from esclab.errors import EsclabError

SMALL = dict(n_classes=5, clips_per_class=5, duration=1.0, sample_rate=16000, seed=0)
COLUMNS = ["filename", "fold", "target", "category", "esc10", "src_file", "take"]
NAME = re.compile(r"(\d+)-(\d+)-([ABC])-(\d+)\.wav")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return write_tree(tmp_path_factory.mktemp("synthetic"), **SMALL)


@pytest.fixture(scope="module")
def meta(tree):
    return pd.read_csv(tree / "meta" / "esc50.csv", dtype={"take": str, "esc10": str})


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_class_names_are_esc50s():
    assert len(CATEGORIES) == len(set(CATEGORIES)) == 50
    assert CATEGORIES[:3] == ("dog", "rooster", "pig") and CATEGORIES[-1] == "hand_saw"
    assert len(ESC10) == 10 and ESC10 <= set(CATEGORIES)


def test_layout_and_metadata_match_esc50(tree, meta):
    assert tree.name == "ESC-50-master"
    assert sorted(p.name for p in tree.iterdir()) == ["audio", "meta"]
    assert (tree / "meta" / "esc50.csv").read_text().splitlines()[0] == ",".join(COLUMNS)
    assert list(meta.columns) == COLUMNS
    assert len(meta) == 25 and meta["filename"].is_unique
    assert set(meta["filename"]) == {p.name for p in (tree / "audio").iterdir()}
    for row in meta.itertuples():
        fold, src_file, take, target = NAME.fullmatch(row.filename).groups()
        assert (int(fold), int(src_file), take, int(target)) == (row.fold, row.src_file, row.take, row.target)
        assert row.category == CATEGORIES[row.target]
        assert row.esc10 == str(row.category in ESC10)  # the strings True/False, as in the real CSV
    assert set(meta["fold"]) == {1, 2, 3, 4, 5}
    assert set(meta["target"]) == {0, 1, 2, 3, 4}


def test_every_class_in_every_fold_and_recordings_stay_in_one(meta):
    assert (meta.groupby(["target", "fold"]).size() == 1).all()
    assert (meta.groupby(["src_file", "target"])["fold"].nunique() == 1).all()
    for _, takes in meta.groupby(["src_file", "target"]):
        assert sorted(takes["take"]) == list("ABC"[: len(takes)])


def test_uneven_clip_counts_spread_over_folds(tmp_path):
    tree = write_tree(tmp_path, n_classes=5, clips_per_class=12, duration=0.1, sample_rate=8000, n_folds=5)
    meta = pd.read_csv(tree / "meta" / "esc50.csv")
    per_class_fold = meta.groupby(["target", "fold"]).size()
    assert set(per_class_fold) == {2, 3} and len(per_class_fold) == 25
    assert set(meta.groupby("fold").size()) == {12}  # the remainder rotates, so folds stay even overall
    assert meta.groupby(["src_file", "target"]).size().max() > 1  # some recordings do have several takes
    assert (meta.groupby(["src_file", "target"])["fold"].nunique() == 1).all()


def test_wavs_are_16_bit_mono_at_the_requested_rate(tree, meta):
    clips = []
    for name in meta["filename"]:
        info = sf.info(tree / "audio" / name)
        assert (info.samplerate, info.frames, info.channels, info.subtype) == (16000, 16000, 1, "PCM_16")
        audio, _ = sf.read(tree / "audio" / name, dtype="float32")
        assert np.isfinite(audio).all() and audio.std() > 0
        clips.append(audio)
    assert len({clip.tobytes() for clip in clips}) == len(clips)


def test_archive_holds_the_tree_under_one_top_folder(tree, tmp_path):
    path = write_archive(tmp_path / "esc50.zip", **SMALL)
    assert path == tmp_path / "esc50.zip" and sorted(tmp_path.iterdir()) == [path]  # no temp file left
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        assert names == sorted(names)
        assert {"ESC-50-master/", "ESC-50-master/audio/", "ESC-50-master/meta/"} <= set(names)
        files = [n for n in names if not n.endswith("/")]
        assert all(n.startswith("ESC-50-master/") for n in names)
        assert len(files) == 26
        for name in files:
            assert archive.read(name) == (tree.parent / name).read_bytes()


def test_same_arguments_same_bytes_other_seed_other_bytes(tmp_path):
    first = write_archive(tmp_path / "a" / "esc50.zip", **SMALL)
    again = write_archive(tmp_path / "b" / "esc50.zip", **SMALL)
    other = write_archive(tmp_path / "c" / "esc50.zip", **{**SMALL, "seed": 1})
    assert sha256(first) == sha256(again)
    assert sha256(other) != sha256(first)


def nearest_centroid_accuracy(tree) -> float:
    """Leave-one-out nearest centroid on each clip's mean log-mel: identical classes would score ~1/n_classes.

    Each clip's own mean is taken off, so its random gain does not count as a difference.
    """
    meta = pd.read_csv(tree / "meta" / "esc50.csv")
    features = []
    for name in meta["filename"]:
        audio, rate = sf.read(tree / "audio" / name, dtype="float32")
        mean_db = librosa.power_to_db(librosa.feature.melspectrogram(y=audio, sr=rate, n_mels=64)).mean(axis=1)
        features.append(mean_db - mean_db.mean())
    features, labels = np.stack(features), meta["target"].to_numpy()
    correct = 0
    for i in range(len(labels)):
        rest = np.arange(len(labels)) != i
        centroids = {c: features[rest & (labels == c)].mean(axis=0) for c in np.unique(labels)}
        guess = min(centroids, key=lambda c: np.linalg.norm(features[i] - centroids[c]))
        correct += guess == labels[i]
    return correct / len(labels)


def test_classes_are_separable_by_mean_log_mel(tree):
    assert nearest_centroid_accuracy(tree) >= 0.8


def test_low_separation_and_snr_make_classes_hard_to_tell_apart(tmp_path):
    """experiment=synthetic_hard's knobs: the easy set scores >= 0.95 here, the hard one about 0.5."""
    more = {**SMALL, "clips_per_class": 10}
    easy = nearest_centroid_accuracy(write_tree(tmp_path / "easy", **more))
    hard = nearest_centroid_accuracy(write_tree(tmp_path / "hard", **more, separation=0.05, snr_db=[-5, 5]))
    assert easy >= 0.95 and 0.2 < hard <= 0.7


@pytest.mark.parametrize("override, setting", [
    (dict(n_classes=0), "n_classes"),
    (dict(n_classes=60), "n_classes"),
    (dict(clips_per_class=4), "clips_per_class"),
    (dict(duration=0.0), "duration"),
    (dict(sample_rate=4000), "sample_rate"),
    (dict(n_folds=0), "n_folds"),
    (dict(separation=0.0), "separation"),
    (dict(separation=1.5), "separation"),
    (dict(snr_db=[20, 10]), "snr_db"),
    (dict(snr_db=[10]), "snr_db"),
])
def test_bad_settings_are_refused_by_name_and_write_nothing(tmp_path, override, setting):
    with pytest.raises(EsclabError, match=rf"dataset\.synthetic\.{setting} must be"):
        write_archive(tmp_path / "esc50.zip", **{**SMALL, **override})
    assert list(tmp_path.iterdir()) == []
