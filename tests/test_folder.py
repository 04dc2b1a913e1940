"""dataset=folder: a folder per class becomes a split table with stratified (and grouped) folds; each bad tree is
refused in one line naming the folder or file and the fix."""

import shutil
from pathlib import Path

import pandas as pd
import pytest
import soundfile as sf
from conftest import FOLDER_GROUPS as GROUPS
from conftest import TINY_FEATURES, compose_config, esclab, folder_overrides

from esclab.data.folder import TABLE_COLUMNS, make_folder_table, write_folder_split
from esclab.data.representations import write_cache
from esclab.data.synthetic import FOLDER_CLASSES, write_folder_tree
from esclab.errors import EsclabError
from esclab.training.run import train


@pytest.fixture
def tree(folder_tree, tmp_path) -> Path:
    return Path(shutil.copytree(folder_tree, tmp_path / "tree"))


def audio_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_synthetic_tree_is_imbalanced_varied_and_the_same_byte_for_byte(folder_tree, tmp_path):
    files = audio_files(folder_tree)
    assert {c: sum(f.startswith(f"{c}/") for f in files) for c in FOLDER_CLASSES} == FOLDER_CLASSES
    assert any("/session_2/" in f for f in files)  # nested below the class folder
    infos = [sf.info(folder_tree / f) for f in files]
    assert {i.samplerate for i in infos} == {8000, 16000, 22050, 44100} and {i.channels for i in infos} == {1, 2}
    assert {(i.format, i.subtype) for i in infos} == {("WAV", "PCM_16"), ("WAV", "PCM_24"), ("FLAC", "PCM_16"),
                                                       ("OGG", "VORBIS")}
    assert 0.5 <= min(i.duration for i in infos) and max(i.duration for i in infos) <= 4.0
    again = write_folder_tree(tmp_path / "again")
    assert all((again / f).read_bytes() == (folder_tree / f).read_bytes() for f in files)


def test_table_has_every_file_with_its_class_and_stratified_folds(tree, tmp_path):
    table = write_folder_split(tree, tmp_path / "split.csv", n_folds=5)
    assert list(table.columns) == TABLE_COLUMNS
    assert sorted(table["filename"]) == audio_files(tree)
    assert all(Path(p).is_file() for p in table["path"])
    names = dict(zip(table["label"], table["category"]))
    assert names == {0: "crying", 1: "normal", 2: "screaming"}  # sorted folder names, label = index
    counts = pd.crosstab(table["category"], table["fold"])
    assert list(counts.columns) == [1, 2, 3, 4, 5] and (counts.max(axis=1) - counts.min(axis=1) <= 1).all()
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "split.csv"), table, check_dtype=False)
    assert table.equals(make_folder_table(tree, n_folds=5))  # seeded
    folds = {seed: make_folder_table(tree, n_folds=5, seed=seed).set_index("filename")["fold"] for seed in (0, 1)}
    assert not folds[0].equals(folds[1].loc[folds[0].index])  # dataset.folder.seed picks the folds


def test_grouped_folds_keep_each_source_in_one_fold(tree):
    table = make_folder_table(tree, n_folds=4, group_pattern=GROUPS)
    assert table["src_file"].str.match(r"^(crying|screaming|normal)\d{3}$").all()
    assert table.groupby("src_file")["fold"].nunique().max() == 1
    assert table["src_file"].nunique() < len(table)  # several takes per source: grouping changed something
    assert table.groupby("fold")["category"].nunique().min() == 3  # still stratified: every class in every fold


def test_skip_leaves_bad_files_out_and_names_them(tree, caplog):
    (tree / "crying" / "notes.txt").write_text("recorded on the 3rd floor")
    (tree / "normal" / "broken.wav").write_bytes(b"RIFF....WAVEfmt garbage")
    (tree / "normal" / ".DS_Store").write_bytes(b"\0\1")  # the system's, not data: left out silently
    with pytest.raises(EsclabError, match=r"2 file\(s\) .* crying/notes.txt, normal/broken.wav; .*bad_files=skip"):
        make_folder_table(tree, n_folds=5)
    table = make_folder_table(tree, n_folds=5, bad_files="skip")
    assert len(table) == sum(FOLDER_CLASSES.values())
    assert "crying/notes.txt" in caplog.text and "normal/broken.wav" in caplog.text


def bad_tree(tree: Path, case: str) -> tuple[Path, dict]:
    """Break a copy of the tree in one way; returns the root to split and the settings."""
    if case == "missing root":
        return tree / "nowhere", {}
    if case == "one class":
        for name in ("crying", "screaming"):
            shutil.rmtree(tree / name)
    if case == "class without audio":
        (tree / "silence").mkdir()
        (tree / "silence" / "README.txt").write_text("todo")
    if case == "too few files":
        for extra in sorted((tree / "crying").rglob("*.*"))[3:]:
            extra.unlink()
    settings = {"too few sources": {"group_pattern": GROUPS, "n_folds": 6}, "unmatched names": {"group_pattern": "^x"},
                "bad pattern": {"group_pattern": "(unclosed"}, "class count": {"n_classes": 4},
                "bad_files value": {"bad_files": "ignore"}, "one fold": {"n_folds": 1}}
    return tree, settings.get(case, {})


BAD_TREES = {
    "missing root": r"nowhere is not a folder: run the download stage first",
    "one class": r"tree has only one class folder \(normal\): a classifier needs at least two",
    "class without audio": r"silence holds no audio files soundfile can read: add the class's recordings, or remove",
    "too few files": r"class\(es\) crying \(3\) have fewer files than dataset.n_folds=5, so .*: add recordings",
    "too few sources": r"crying \(5\) have fewer source recordings \(dataset.folder.group_pattern\) than .*n_folds=6",
    "unmatched names": r"78 file name\(s\) do not match dataset.folder.group_pattern='\^x': crying/crying001_1.flac",
    "bad pattern": r"group_pattern='\(unclosed' is not a regular expression",
    "class count": r"has 3 class folders \(crying, normal, screaming\), expected 4 \(dataset.n_classes\)",
    "bad_files value": r"dataset.folder.bad_files must be one of refuse, skip; got 'ignore'",
    "one fold": r"dataset.n_folds=1: a cross-validation needs at least 2 folds",
}


@pytest.mark.parametrize("case", BAD_TREES)
def test_each_bad_tree_gets_its_line(tree, case):
    root, settings = bad_tree(tree, case)
    with pytest.raises(EsclabError, match=BAD_TREES[case]):
        make_folder_table(root, **{"n_folds": 5, **settings})


def test_split_stage_prints_one_line_for_a_bad_tree(tree, tmp_path):
    (tree / "crying" / "notes.txt").write_text("not audio")
    raw = f"paths.raw={tree}"
    result = esclab("split", "dataset=folder", f"dataset.source_dir={tree}", raw, cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"esclab: error: 1 file(s) under {tree} are not audio soundfile can read: crying/notes.txt; remove or "
        "convert them, or set dataset.folder.bad_files=skip to leave them out"]
    skipped = esclab("split", "dataset=folder", f"dataset.source_dir={tree}", raw, "dataset.folder.bad_files=skip",
                     cwd=tmp_path)
    assert skipped.returncode == 0, skipped.stderr
    assert len(pd.read_csv(tmp_path / "data/splits/folder.csv")) == sum(FOLDER_CLASSES.values())
    unset = esclab("download", "dataset=folder", cwd=tmp_path)
    assert unset.returncode == 1, unset.stderr
    assert unset.stderr.startswith("esclab: error: dataset.source_dir must be set"), unset.stderr


@pytest.mark.parametrize("settings, message", [
    ({"classes": {"a": 3, "b": 0}}, r"dataset.synthetic.classes must map at most 50 class names to positive"),
    ({"duration": [2.0, 1.0]}, r"dataset.synthetic.duration must be \[shortest, longest\] seconds"),
])
def test_synthetic_tree_refuses_settings_it_cannot_make(settings, message, tmp_path):
    with pytest.raises(EsclabError, match=message):
        write_folder_tree(tmp_path / "tree", **settings)
    assert not (tmp_path / "tree").exists()


def test_holdout_split_gives_each_class_its_shares_whole_sources_at_a_time(tree, tmp_path):
    table = write_folder_split(tree, tmp_path / "split.csv", n_folds=5, group_pattern=GROUPS, split="holdout")
    assert sorted(table["filename"]) == audio_files(tree)
    parts = pd.crosstab(table["category"], table["fold"])  # folds 1 test, 2 validation, 3 training
    assert list(parts.columns) == [1, 2, 3] and (parts > 0).all().all()
    shares = parts.div(parts.sum(axis=1), axis=0)
    assert shares[3].between(0.5, 0.9).all() and shares[1].between(0.05, 0.35).all()
    assert table.groupby("src_file")["fold"].nunique().max() == 1, "a source recording spans two parts"
    normal = parts.loc["normal"]  # 50 files: the test and validation parts hold close to 15 % each
    assert 6 <= normal[1] <= 10 and 6 <= normal[2] <= 10
    again = make_folder_table(tree, n_folds=5, group_pattern=GROUPS, split="holdout")
    assert table.equals(again)
    other = make_folder_table(tree, n_folds=5, group_pattern=GROUPS, split="holdout", seed=1)
    assert not table["fold"].equals(other.set_index("filename").loc[table["filename"], "fold"].reset_index(drop=True))


@pytest.mark.parametrize(("settings", "message"), [
    ({"split": "random"}, "dataset.folder.split must be one of kfold, holdout; got 'random'"),
    ({"split": "holdout", "holdout": [0.8, 0.15, 0.15]}, r"dataset.folder.holdout=\[0.8, 0.15, 0.15\] must be three "
                                                         "positive shares"),
    ({"split": "holdout", "holdout": [0.7, 0.3]}, "must be three positive shares"),
])
def test_bad_holdout_settings_are_named(tree, settings, message):
    with pytest.raises(EsclabError, match=message):
        make_folder_table(tree, n_folds=5, **settings)


def test_holdout_refuses_a_class_with_too_few_sources_for_three_parts(tree):
    for extra in sorted((tree / "crying").rglob("*.*"))[2:]:
        extra.unlink()
    with pytest.raises(EsclabError, match="class crying has 2 source recording.*too few for a training, validation "
                                          "and test part.*dataset.folder.split=kfold"):
        make_folder_table(tree, n_folds=2, split="holdout")


FAMILIES = {  # tiny sizes of each learner family's recipe
    "cnn4_strong": [*(f"features.{k}={v}" for k, v in TINY_FEATURES.items()), "features.num_workers=1",
                    "model.channels=[8,8,8,8]", "model.fc_dim=16"],
    "yamnet_svm": ["features.duration=2.0", "model.C=[0.01]"],
}


@pytest.mark.parametrize("experiment", FAMILIES)
def test_every_learner_family_trains_on_a_folder_dataset(folder_split, tmp_path, experiment):
    """The strong CNN recipe and a frozen backbone's embeddings with a scikit-learn head, each on files of every
    rate, length and channel count: one test fold of the grouped split. (An ffn head trains through the same
    Lightning code as cnn4.)"""
    cfg = compose_config(*folder_overrides(folder_split, tmp_path, f"experiment={experiment}", *FAMILIES[experiment]))
    cfg.paths.features = str(write_cache(folder_split["split"], tmp_path / "features", cfg.features))
    train(cfg)
    split = pd.read_csv(folder_split["split"])
    predictions = pd.read_csv(tmp_path / "reports/folds/1/predictions.csv")
    assert sorted(predictions["filename"]) == sorted(split.loc[split["fold"] == 1, "filename"])
    assert (tmp_path / "models/fold_1.ckpt").is_file()
