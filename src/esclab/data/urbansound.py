"""The split stage for UrbanSound8K: its metadata/UrbanSound8K.csv, checked, as the split table.

UrbanSound8K (Salamon, Jacoby & Bello, 2014) cuts Freesound recordings (fsID) into
slices of at most 4 s and files every slice of a recording under one of ten folds,
audio/fold<k>/<slice_file_name>. Its authors ask that results be 10-fold
cross-validation over exactly those folds: a random split puts slices of one
recording on both sides of the test fold and inflates the score. So the folds are
read here, never made, and checked, like ESC-50's (esclab.data.split): the table has
the columns the later stages read (path, filename, label, category, fold, src_file),
plus each slice's salience (1 foreground, 2 background).
"""

import logging
from pathlib import Path

import pandas as pd

from esclab.atomic import atomic_file
from esclab.data.split import RERUN
from esclab.errors import EsclabError, examples

log = logging.getLogger(__name__)

METADATA = "metadata/UrbanSound8K.csv"
META_COLUMNS = ["slice_file_name", "fsID", "start", "end", "salience", "fold", "classID", "class"]
TABLE_COLUMNS = ["path", "filename", "label", "category", "fold", "src_file", "salience"]


def read_metadata(raw: Path) -> pd.DataFrame:
    """Read metadata/UrbanSound8K.csv, refusing a file without UrbanSound8K's columns."""
    path = raw / METADATA
    if not path.is_file():
        raise EsclabError(f"{path} not found: an UrbanSound8K folder holds {METADATA} and audio/fold1..fold10/; "
                          f"{RERUN}")
    try:
        meta = pd.read_csv(path, dtype={"slice_file_name": str, "class": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise EsclabError(f"{path} is not a readable CSV ({err}); {RERUN}") from None
    missing = [c for c in META_COLUMNS if c not in meta.columns]
    if missing:
        raise EsclabError(f"{path} lacks the column(s) {', '.join(missing)}; expected {', '.join(META_COLUMNS)}")
    for column in ("fsID", "fold", "classID", "salience"):
        if not pd.api.types.is_integer_dtype(meta[column]):
            raise EsclabError(f"{path}: column {column} must hold whole numbers only; {RERUN}")
    return meta


def check_metadata(meta: pd.DataFrame, raw: Path, *, n_folds: int, n_classes: int | None) -> None:
    """Refuse metadata that disagrees with the audio folders or with UrbanSound8K's structure."""
    duplicated = meta.loc[meta["slice_file_name"].duplicated(), "slice_file_name"]
    if len(duplicated):
        raise EsclabError(f"{METADATA} lists {examples(set(duplicated))} more than once; each slice needs one row")
    bad_folds = sorted(set(meta["fold"]) - set(range(1, n_folds + 1)))
    if bad_folds:
        raise EsclabError(f"{METADATA} has fold(s) {examples(bad_folds)}; folds must be 1..{n_folds} (dataset.n_folds)"
                          f": UrbanSound8K's are 1..10, so set dataset.n_folds=10")
    if meta["fold"].nunique() != n_folds:
        raise EsclabError(f"{METADATA} uses {meta['fold'].nunique()} folds, expected all of 1..{n_folds} "
                          f"(dataset.n_folds); {RERUN}")
    missing = [f"fold{fold}/{name}" for fold, name in zip(meta["fold"], meta["slice_file_name"])
               if not (raw / "audio" / f"fold{fold}" / name).is_file()]
    if missing:
        raise EsclabError(f"{len(missing)} slice(s) in {METADATA} missing from {raw / 'audio'}: {examples(missing)}; "
                          f"{RERUN}")
    per_class = meta.groupby("classID")["class"].nunique()
    if (per_class > 1).any():
        raise EsclabError(f"{METADATA} gives classID(s) {examples(per_class[per_class > 1].index)} more than one "
                          f"class name; {RERUN}")
    found = meta["classID"].nunique()
    if n_classes is not None and found != n_classes:
        raise EsclabError(f"{METADATA} has {found} classes, expected {n_classes} (dataset.n_classes); {RERUN}")
    # A recording may hold sounds of several classes; what must not happen is one recording's
    # slices of one class in two folds, since neighbouring slices are near-duplicates.
    folds_per_source = meta.groupby(["fsID", "classID"])["fold"].nunique()
    leaking = folds_per_source[folds_per_source > 1]
    if len(leaking):
        sources = [f"fsID {s} (classID {c})" for s, c in leaking.index]
        raise EsclabError(f"{examples(sources)} appear in more than one fold of {METADATA}, which leaks training "
                          "slices into the test fold; keep each recording's slices in one fold")


def make_urbansound_table(raw: Path, *, n_folds: int, n_classes: int | None) -> pd.DataFrame:
    """The checked split table of an unpacked UrbanSound8K, with labels numbered 0..n_classes-1 by classID."""
    meta = read_metadata(raw)
    check_metadata(meta, raw, n_folds=n_folds, n_classes=n_classes)
    class_ids = sorted(meta["classID"].unique())
    filenames = "fold" + meta["fold"].astype(str) + "/" + meta["slice_file_name"]  # unique across folds
    table = meta.assign(filename=filenames, path=[(raw / "audio" / name).as_posix() for name in filenames],
                        label=meta["classID"].map({c: i for i, c in enumerate(class_ids)}),
                        category=meta["class"], src_file=meta["fsID"])
    return table.sort_values(["fold", "filename"])[TABLE_COLUMNS].reset_index(drop=True)


def write_urbansound_split(raw: Path, out: Path, *, n_folds: int, n_classes: int | None) -> pd.DataFrame:
    """The split stage for dataset=urbansound8k: check raw/metadata/UrbanSound8K.csv against raw/audio and write the
    table to `out`."""
    table = make_urbansound_table(raw, n_folds=n_folds, n_classes=n_classes)
    with atomic_file(out) as tmp:
        table.to_csv(tmp, index=False)
    log.info("split: %d slices, %d classes, slices per fold %s -> %s", len(table), table["label"].nunique(),
             table.groupby("fold").size().to_dict(), out)
    return table
