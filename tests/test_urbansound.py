"""dataset=urbansound8k: the synthetic look-alike's archive is UrbanSound8K's shape; the split stage reads its folds
into the table and refuses each kind of bad metadata in one line."""

import hashlib
import shutil
import tarfile
from pathlib import Path

import pandas as pd
import pytest
import soundfile as sf
from conftest import esclab

from esclab.data.download import unpack
from esclab.data.synthetic import URBANSOUND_CLASSES, URBANSOUND_HEADER, write_urbansound_archive
from esclab.data.urbansound import METADATA, TABLE_COLUMNS, write_urbansound_split
from esclab.errors import EsclabError

SMALL = dict(duration=[0.5, 1.5], seed=0)  # 200 slices, as the default, but shorter
ARGS = dict(n_folds=10, n_classes=10)


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    return write_urbansound_archive(tmp_path_factory.mktemp("us8k") / "UrbanSound8K.tar.gz", **SMALL)


@pytest.fixture(scope="module")
def us8k_tree(archive, tmp_path_factory) -> Path:
    """The archive unpacked by the download stage's own unpack; copy it before changing it."""
    return unpack(archive, tmp_path_factory.mktemp("us8k_raw") / "raw")


@pytest.fixture
def raw(us8k_tree, tmp_path) -> Path:
    return Path(shutil.copytree(us8k_tree, tmp_path / "raw"))


def meta_of(raw: Path) -> pd.DataFrame:
    return pd.read_csv(raw / METADATA)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_synthetic_archive_has_urbansound8ks_layout_and_varied_slices(archive, us8k_tree):
    with tarfile.open(archive) as tf:
        names = tf.getnames()
    assert names[:3] == ["UrbanSound8K", "UrbanSound8K/audio", "UrbanSound8K/audio/fold1"]
    assert "UrbanSound8K/metadata/UrbanSound8K.csv" in names
    assert sorted(p.name for p in (us8k_tree / "audio").iterdir()) == sorted(f"fold{k}" for k in range(1, 11))
    assert (us8k_tree / METADATA).read_text().splitlines()[0] == URBANSOUND_HEADER
    meta = meta_of(us8k_tree)
    assert len(meta) == 200 and set(meta["fold"]) == set(range(1, 11))
    assert dict(zip(meta["classID"], meta["class"])) == dict(enumerate(URBANSOUND_CLASSES))
    assert (meta.groupby(["fold", "classID"]).size() == 2).all()
    assert (meta.groupby("fsID")["fold"].nunique() == 1).all()
    assert meta.groupby("fsID").size().max() > 1  # several slices of one recording
    for row in meta.itertuples():  # [fsID]-[classID]-[occurrenceID]-[sliceID].wav
        fs_id, class_id, _, _ = row.slice_file_name.removesuffix(".wav").split("-")
        assert (int(fs_id), int(class_id)) == (row.fsID, row.classID) and row.start < row.end
    infos = [sf.info(us8k_tree / "audio" / f"fold{r.fold}" / r.slice_file_name) for r in meta.itertuples()]
    assert {i.samplerate for i in infos} == {22050, 44100, 48000} and {i.channels for i in infos} == {1, 2}
    assert {i.subtype for i in infos} == {"PCM_16", "PCM_24"}
    assert 0.5 <= min(i.duration for i in infos) < max(i.duration for i in infos) <= 1.5


def test_synthetic_archive_is_the_same_byte_for_byte(archive, tmp_path):
    assert sha256(write_urbansound_archive(tmp_path / "again.tar.gz", **SMALL)) == sha256(archive)
    other = write_urbansound_archive(tmp_path / "other.tar.gz", slices_per_fold=1, duration=[0.5, 0.5], seed=1)
    assert sha256(other) != sha256(archive)


def test_slices_longer_than_four_seconds_are_refused(tmp_path):
    with pytest.raises(EsclabError, match=r"dataset.synthetic.duration .* at most 4"):
        write_urbansound_archive(tmp_path / "a.tar.gz", duration=[1.0, 5.0])
    assert not (tmp_path / "a.tar.gz").exists()


def test_table_has_every_slice_in_its_own_fold_with_its_class(raw, tmp_path):
    table = write_urbansound_split(raw, tmp_path / "split.csv", **ARGS)
    meta = meta_of(raw)
    assert list(table.columns) == TABLE_COLUMNS and len(table) == len(meta) == 200
    assert table["filename"].is_unique and all(Path(p).is_file() for p in table["path"])
    assert sorted(table["filename"]) == sorted(f"fold{r.fold}/{r.slice_file_name}" for r in meta.itertuples())
    assert sorted(table["fold"].unique()) == list(range(1, 11))
    assert table["filename"].str.split("/").str[0].eq("fold" + table["fold"].astype(str)).all()
    assert dict(zip(table["label"], table["category"])) == dict(enumerate(URBANSOUND_CLASSES))
    assert (table.groupby("src_file")["fold"].nunique() == 1).all()
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "split.csv"), table, check_dtype=False)


@pytest.mark.parametrize("change, message", [
    (lambda m: m.drop(columns=["fsID"]), r"lacks the column\(s\) fsID"),
    (lambda m: m.assign(fold=m["fold"].replace(10, 11)), r"fold\(s\) 11; folds must be 1..10"),
    (lambda m: m.assign(**{"class": m["class"].where(m.index != 0, "dog")}), r"classID\(s\) .* more than one class"),
    (lambda m: m[m["classID"] != 9], r"has 9 classes, expected 10 \(dataset.n_classes\)"),
    (lambda m: m.assign(slice_file_name=m["slice_file_name"].where(m.index != 0, "1-0-0-0.wav")),
     r"1 slice\(s\) in metadata/UrbanSound8K.csv missing from .*: fold\d+/1-0-0-0.wav"),
])
def test_bad_metadata_gets_one_clear_error(raw, tmp_path, change, message):
    change(meta_of(raw)).to_csv(raw / METADATA, index=False)
    with pytest.raises(EsclabError, match=message) as err:
        write_urbansound_split(raw, tmp_path / "split.csv", **ARGS)
    assert "\n" not in str(err.value) and not (tmp_path / "split.csv").exists()


def test_recording_in_two_folds_is_refused(raw, tmp_path):
    meta = meta_of(raw)
    moved = meta.iloc[0]
    other = meta[(meta["fold"] != moved["fold"]) & (meta["classID"] == moved["classID"])].iloc[0]
    meta.loc[meta["fsID"] == other["fsID"], "fsID"] = moved["fsID"]  # a recording now in two folds
    meta.to_csv(raw / METADATA, index=False)
    with pytest.raises(EsclabError, match=f"fsID {moved['fsID']} \\(classID {moved['classID']}\\) appear in more "
                                          "than one fold"):
        write_urbansound_split(raw, tmp_path / "split.csv", **ARGS)


def test_missing_metadata_is_one_line_from_the_cli(raw, tmp_path):
    (raw / METADATA).unlink()
    result = esclab("split", "dataset=urbansound8k", f"paths.raw={raw}", f"paths.split={tmp_path / 's.csv'}",
                    cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.strip()] == [
        f"esclab: error: {raw / METADATA} not found: an UrbanSound8K folder holds {METADATA} and audio/fold1..fold10/; "
        "fix the dataset (or delete data/raw and rerun `dvc repro download`)"]


def test_a_pretrained_backbone_and_head_train_on_its_folds(us8k_tree, tmp_path):
    """Frozen YAMNet + a linear SVM on the synthetic UrbanSound8K's folds (cnn4 runs on them in
    test_pipeline_datasets.py): fold 3 held out, every one of its slices predicted."""
    from conftest import compose_config

    from esclab.data.representations import write_cache
    from esclab.training.run import train

    table = write_urbansound_split(us8k_tree, tmp_path / "split.csv", **ARGS)
    cfg = compose_config("experiment=yamnet_svm", "dataset=synthetic_urbansound8k", "fold=3", "features.duration=1.5",
                         "model.C=[0.01]", "tracking.log_model=false", f"paths.raw={us8k_tree}",
                         f"paths.split={tmp_path / 'split.csv'}", f"paths.features={tmp_path / 'features'}",
                         f"paths.models={tmp_path / 'models'}", f"paths.reports={tmp_path / 'reports'}",
                         f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}")
    write_cache(tmp_path / "split.csv", tmp_path / "features", cfg.features)
    train(cfg)
    predictions = pd.read_csv(tmp_path / "reports/folds/3/predictions.csv")
    assert sorted(predictions["filename"]) == sorted(table.loc[table["fold"] == 3, "filename"])
    assert predictions.filter(like="prob_").shape[1] == len(URBANSOUND_CLASSES)
