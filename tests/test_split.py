"""The split stage: a correct table from good metadata, one clear error for each kind of bad metadata."""

import subprocess
import sys

import pandas as pd
import pytest

from esclab.data.split import TABLE_COLUMNS, write_split
from esclab.errors import EsclabError

ARGS = dict(n_classes=5, n_folds=5, esc10_only=False)


def meta_of(raw):
    return pd.read_csv(raw / "meta" / "esc50.csv", dtype={"take": str})


def save_meta(raw, meta):
    meta.to_csv(raw / "meta" / "esc50.csv", index=False)


def test_table_has_every_clip_with_its_fold_and_label(raw, tmp_path):
    table = write_split(raw, tmp_path / "split.csv", **ARGS)
    meta = meta_of(raw)
    assert list(table.columns) == TABLE_COLUMNS
    assert sorted(table["filename"]) == sorted(meta["filename"])
    assert set(table["fold"]) == {1, 2, 3, 4, 5}
    assert sorted(table["label"].unique()) == [0, 1, 2, 3, 4]
    row = table.iloc[0]
    assert (raw / "audio" / row["filename"]).as_posix() == row["path"]
    assert row["fold"] == int(row["filename"].split("-")[0])
    on_disk = pd.read_csv(tmp_path / "split.csv")
    pd.testing.assert_frame_equal(on_disk, table, check_dtype=False)


def test_missing_listed_clip_is_named(raw, tmp_path):
    victim = meta_of(raw)["filename"][3]
    (raw / "audio" / victim).unlink()
    with pytest.raises(EsclabError, match=f"missing from .*{victim}"):
        write_split(raw, tmp_path / "split.csv", **ARGS)
    assert not (tmp_path / "split.csv").exists()


def test_unlisted_wav_is_named(raw, tmp_path):
    (raw / "audio" / "9-999-A-0.wav").write_bytes((raw / "audio" / meta_of(raw)["filename"][0]).read_bytes())
    with pytest.raises(EsclabError, match="not in meta/esc50.csv: 9-999-A-0.wav"):
        write_split(raw, tmp_path / "split.csv", **ARGS)


def test_source_recording_in_two_folds_is_refused(raw, tmp_path):
    meta = meta_of(raw)
    first = meta.iloc[0]
    other_fold = meta[(meta["fold"] != first["fold"]) & (meta["target"] == first["target"])].index[0]
    meta.loc[other_fold, "src_file"] = first["src_file"]
    save_meta(raw, meta)
    with pytest.raises(EsclabError, match=f"src_file {first['src_file']} \\(target {first['target']}\\) appear in more than one fold"):
        write_split(raw, tmp_path / "split.csv", **ARGS)


def test_one_source_cut_into_two_classes_in_two_folds_passes(raw, tmp_path):
    # Real ESC-50 has such src_file ids (131943, 134049, ...): different sounds of one recording.
    meta = meta_of(raw)
    a = meta.iloc[0]
    b = meta[(meta["fold"] != a["fold"]) & (meta["target"] != a["target"])].index[0]
    meta.loc[meta["src_file"] == meta.loc[b, "src_file"], "src_file"] = a["src_file"]
    save_meta(raw, meta)
    table = write_split(raw, tmp_path / "split.csv", **ARGS)
    assert table["src_file"].value_counts()[a["src_file"]] >= 2


def test_wrong_class_count_is_refused(raw, tmp_path):
    with pytest.raises(EsclabError, match=r"has 5 classes, expected 50 \(dataset.n_classes\)"):
        write_split(raw, tmp_path / "split.csv", n_classes=50, n_folds=5, esc10_only=False)


@pytest.mark.parametrize("change, message", [
    (lambda m: m.drop(columns=["src_file"]), "lacks the column\\(s\\) src_file"),
    (lambda m: m.assign(fold=m["fold"].replace(5, 7)), "fold\\(s\\) 7; folds must be 1..5"),
    (lambda m: pd.concat([m, m.iloc[[0]]]), "lists .* more than once"),
])
def test_bad_metadata_gets_one_clear_error(raw, tmp_path, change, message):
    save_meta(raw, change(meta_of(raw)))
    with pytest.raises(EsclabError, match=message):
        write_split(raw, tmp_path / "split.csv", **ARGS)


def test_missing_metadata_file_is_named(raw, tmp_path):
    (raw / "meta" / "esc50.csv").unlink()
    with pytest.raises(EsclabError, match="meta/esc50.csv not found"):
        write_split(raw, tmp_path / "split.csv", **ARGS)


def test_esc10_keeps_only_its_classes_with_labels_from_zero(raw, tmp_path):
    meta = meta_of(raw)
    kept = sorted(meta["target"].unique())[1:3]
    meta["esc10"] = meta["target"].isin(kept)
    save_meta(raw, meta)
    table = write_split(raw, tmp_path / "split.csv", n_classes=2, n_folds=5, esc10_only=True)
    assert set(table["target"]) == set(kept)
    assert table.groupby("target")["label"].first().tolist() == [0, 1]
    assert len(table) == meta["esc10"].sum()


def test_cli_prints_one_line_without_traceback(raw, tmp_path):
    (raw / "meta" / "esc50.csv").unlink()
    result = subprocess.run(
        [sys.executable, "-m", "esclab", "split", f"paths.raw={raw}", f"paths.split={tmp_path / 's.csv'}"],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert errors == [f"esclab: error: {raw}/meta/esc50.csv not found: the dataset folder must hold meta/esc50.csv; "
                      "fix the dataset (or delete data/raw and rerun `dvc repro download`)"]
