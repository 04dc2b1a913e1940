"""The split stage: one checked table of every clip, with ESC-50's own folds.

Everything later reads this table, so it is where bad metadata is stopped: a
listed clip that is missing, a WAV nobody listed, a fold out of range, or one
source recording spread over two folds (which would leak into the test fold).
"""

import logging
from pathlib import Path

import pandas as pd

from esclab.atomic import atomic_file
from esclab.errors import EsclabError, examples

log = logging.getLogger(__name__)

META_COLUMNS = ["filename", "fold", "target", "category", "esc10", "src_file", "take"]
TABLE_COLUMNS = ["path", "filename", "label", "category", "fold", "src_file", "take", "esc10", "target"]
RERUN = "fix the dataset (or delete data/raw and rerun `dvc repro download`)"


def read_metadata(raw: Path) -> pd.DataFrame:
    """Read meta/esc50.csv, refusing a file without ESC-50's columns."""
    meta_path = raw / "meta" / "esc50.csv"
    if not meta_path.is_file():
        raise EsclabError(f"{meta_path} not found: the dataset folder must hold meta/esc50.csv; {RERUN}")
    try:
        meta = pd.read_csv(meta_path, dtype={"filename": str, "category": str, "take": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise EsclabError(f"{meta_path} is not a readable CSV ({err}); {RERUN}") from None
    missing = [c for c in META_COLUMNS if c not in meta.columns]
    if missing:
        raise EsclabError(f"{meta_path} lacks the column(s) {', '.join(missing)}; expected {', '.join(META_COLUMNS)}")
    for column in ("fold", "target", "src_file"):
        if not pd.api.types.is_integer_dtype(meta[column]):
            raise EsclabError(f"{meta_path}: column {column} must hold whole numbers only; {RERUN}")
    meta["esc10"] = meta["esc10"].astype(str).str.lower().map({"true": True, "false": False})
    if meta["esc10"].isna().any():
        raise EsclabError(f"{meta_path}: column esc10 must be True or False in every row; {RERUN}")
    return meta


def check_metadata(meta: pd.DataFrame, audio: Path, *, n_folds: int) -> None:
    """Refuse metadata that disagrees with the audio folder or with ESC-50's structure."""
    duplicated = meta.loc[meta["filename"].duplicated(), "filename"]
    if len(duplicated):
        raise EsclabError(f"meta/esc50.csv lists {examples(set(duplicated))} more than once; each clip needs one row")
    bad_folds = sorted(set(meta["fold"]) - set(range(1, n_folds + 1)))
    if bad_folds:
        raise EsclabError(f"meta/esc50.csv has fold(s) {examples(bad_folds)}; folds must be 1..{n_folds} (dataset.n_folds)")
    listed = set(meta["filename"])
    on_disk = {p.name for p in audio.glob("*.wav")} if audio.is_dir() else set()
    if listed - on_disk:
        raise EsclabError(f"{len(listed - on_disk)} clip(s) in meta/esc50.csv missing from {audio}: {examples(listed - on_disk)}; {RERUN}")
    if on_disk - listed:
        raise EsclabError(f"{len(on_disk - listed)} WAV file(s) in {audio} not in meta/esc50.csv: {examples(on_disk - listed)}; remove them or add their rows")
    per_target = meta.groupby("target")["category"].nunique()
    if (per_target > 1).any():
        raise EsclabError(f"meta/esc50.csv gives target(s) {examples(per_target[per_target > 1].index)} more than one category name")
    if meta["fold"].nunique() != n_folds:
        raise EsclabError(f"meta/esc50.csv uses {meta['fold'].nunique()} folds, expected all of 1..{n_folds} (dataset.n_folds)")
    # A source recording may be cut into clips of different classes (ESC-50 has four such
    # src_file ids, in different folds); what must not happen is one recording of one class
    # in two folds, since its takes are near-duplicates.
    folds_per_source = meta.groupby(["src_file", "target"])["fold"].nunique()
    leaking = folds_per_source[folds_per_source > 1]
    if len(leaking):
        sources = [f"src_file {s} (target {t})" for s, t in leaking.index]
        raise EsclabError(f"{examples(sources)} appear in more than one fold, which leaks training clips into the test fold; keep each recording's takes in one fold")


def make_table(raw: Path, *, n_classes: int, n_folds: int, esc10_only: bool) -> pd.DataFrame:
    """Build the checked split table, with labels numbered 0..n_classes-1."""
    meta = read_metadata(raw)
    check_metadata(meta, raw / "audio", n_folds=n_folds)
    if esc10_only:
        meta = meta[meta["esc10"]]
    found = meta["target"].nunique()
    if found != n_classes:
        which = "ESC-10 classes" if esc10_only else "classes"
        raise EsclabError(f"meta/esc50.csv has {found} {which}, expected {n_classes} (dataset.n_classes); {RERUN}")
    targets = sorted(meta["target"].unique())
    table = meta.assign(
        path=[(raw / "audio" / name).as_posix() for name in meta["filename"]],
        label=meta["target"].map({t: i for i, t in enumerate(targets)}),
    )
    return table.sort_values(["fold", "filename"])[TABLE_COLUMNS].reset_index(drop=True)


def write_split(raw: Path, out: Path, *, n_classes: int, n_folds: int, esc10_only: bool) -> pd.DataFrame:
    """The split stage: check raw/meta/esc50.csv against raw/audio and write the table to `out`."""
    table = make_table(raw, n_classes=n_classes, n_folds=n_folds, esc10_only=esc10_only)
    with atomic_file(out) as tmp:
        table.to_csv(tmp, index=False)
    per_fold = table.groupby("fold").size().to_dict()
    log.info("split: %d clips, %d classes, clips per fold %s -> %s", len(table), table["label"].nunique(), per_fold, out)
    return table
