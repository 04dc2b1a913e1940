"""The split stage for your own recordings: a folder per class, folds made here.

`<root>/<class>/.../<file>`: each folder directly under the root is a class (sorted
names, label = index), every file below it, at any depth, one of its clips, in any
format soundfile reads. Without predefined folds, the folds are a seeded stratified
K-fold; with a `group_pattern` naming each file's source recording, a grouped one,
so the takes of one recording never sit on both sides of a test fold. The seeds'
70 / 15 / 15 training / validation / test split is the other choice (`split:
holdout`), written as three folds (resolvers.HOLDOUT_FOLDS) and grouped the same way. The table has
the columns the later stages read from ESC-50's (path, filename, label, category,
fold, src_file), so features, training and evaluation run unchanged.

A bad tree is stopped here with one line naming the folder or file and the fix.
Hidden files and folders (.DS_Store, .git) are the system's, not data, and are left
out; every other file must be audio, or is listed and refused or, with
bad_files=skip, listed and left out.
"""

import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from esclab.atomic import atomic_file
from esclab.errors import EsclabError, examples
from esclab.resolvers import HOLDOUT_FOLDS

log = logging.getLogger(__name__)

TABLE_COLUMNS = ["path", "filename", "label", "category", "fold", "src_file"]
BAD_FILES = ("refuse", "skip")
SPLITS = ("kfold", "holdout")


def _visible(path: Path, root: Path) -> bool:
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def _is_audio(path: Path) -> bool:
    """Whether soundfile can open `path` and finds samples in it: the header only, so a large tree is checked fast."""
    try:
        return sf.info(path).frames > 0
    except (sf.LibsndfileError, RuntimeError, OSError):
        return False


def check_root(root: Path, fix: str = "point dataset.source_dir at a folder holding one folder per class") -> None:
    if not root.is_dir():
        raise EsclabError(f"{root} is not a folder: {fix}")


def find_clips(root: Path, *, bad_files: str = "refuse") -> pd.DataFrame:
    """Every audio file under `root`'s class folders: filename (relative to root), category; sorted by filename."""
    if bad_files not in BAD_FILES:
        raise EsclabError(f"dataset.folder.bad_files must be one of {', '.join(BAD_FILES)}; got {bad_files!r}")
    check_root(root, "run the download stage first (`dvc repro download`), which copies dataset.source_dir there")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    loose = sorted(p.name for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
    if loose:
        log.warning("%s: %d file(s) outside any class folder, left out: %s", root, len(loose), examples(loose))
    if len(classes) < 2:
        found = f"only one class folder ({classes[0]})" if classes else "no class folders"
        raise EsclabError(f"{root} has {found}: a classifier needs at least two, so put each class's recordings in "
                          f"a folder named for the class directly under {root}")
    rows, bad = [], []
    for category in classes:
        files = sorted(p for p in (root / category).rglob("*") if p.is_file() and _visible(p, root))
        readable = {p: _is_audio(p) for p in files}
        audio = [p for p in files if readable[p]]
        bad += [p.relative_to(root).as_posix() for p in files if not readable[p]]
        if not audio:
            raise EsclabError(f"{root / category} holds no audio files soundfile can read: add the class's recordings, "
                              "or remove the folder")
        rows += [(p.relative_to(root).as_posix(), category) for p in audio]
    if bad and bad_files == "refuse":
        raise EsclabError(f"{len(bad)} file(s) under {root} are not audio soundfile can read: {examples(bad)}; "
                          "remove or convert them, or set dataset.folder.bad_files=skip to leave them out")
    if bad:
        log.warning("%s: %d file(s) that are not audio, left out (bad_files=skip): %s", root, len(bad), examples(bad))
    return pd.DataFrame(rows, columns=["filename", "category"])


def sources(filenames: pd.Series, group_pattern: str | None) -> pd.Series:
    """Each file's source recording: the pattern's first group (or whole match) in the file's name; without a
    pattern every file is its own source."""
    if group_pattern is None:
        return filenames
    try:
        pattern = re.compile(group_pattern)
    except re.error as err:
        raise EsclabError(f"dataset.folder.group_pattern={group_pattern!r} is not a regular expression ({err}); "
                          "fix it, e.g. '^(.+)_\\d+' for files named <source>_<take>.wav") from None
    matches = [pattern.search(name.rsplit("/", 1)[-1]) for name in filenames]
    unmatched = [name for name, match in zip(filenames, matches) if match is None]
    if unmatched:
        raise EsclabError(f"{len(unmatched)} file name(s) do not match dataset.folder.group_pattern={group_pattern!r}: "
                          f"{examples(unmatched)}; change the pattern so it finds every file's source, or set it "
                          "to null to split files independently")
    return pd.Series([m.group(1) if pattern.groups else m.group(0) for m in matches], index=filenames.index)


def assign_folds(table: pd.DataFrame, *, n_folds: int, seed: int, grouped: bool) -> np.ndarray:
    """Fold numbers 1..n_folds: stratified by class, and grouped by src_file if `grouped`."""
    if n_folds < 2:
        raise EsclabError(f"dataset.n_folds={n_folds}: a cross-validation needs at least 2 folds; set it to 5")
    what = "source recordings (dataset.folder.group_pattern)" if grouped else "files"
    per_class = table.groupby("category")["src_file"].nunique() if grouped else table.groupby("category").size()
    few = per_class[per_class < n_folds]
    if len(few):
        counts = ", ".join(f"{name} ({count})" for name, count in few.items())
        raise EsclabError(f"class(es) {counts} have fewer {what} than dataset.n_folds={n_folds}, so some test folds "
                          f"would lack them: add recordings, or lower dataset.n_folds")
    labels = table["label"].to_numpy()
    if grouped:
        splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        splits = splitter.split(table, labels, table["src_file"])
    else:
        splits = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed).split(table, labels)
    folds = np.zeros(len(table), dtype=int)
    for fold, (_, test) in enumerate(splits, start=1):
        folds[test] = fold
    return folds


def assign_holdout(table: pd.DataFrame, *, shares: list[float], seed: int) -> np.ndarray:
    """Fold numbers of a holdout split (resolvers.HOLDOUT_FOLDS: 1 test, 2 validation, 3 training), `shares` of each
    class's files in (training, validation, test) order, whole source recordings at a time.

    Per class (sorted), its sources are shuffled (seeded) and dealt out: to the test part until it holds its share
    of the class's files (rounded, at least one source), then to validation likewise, the rest to training. A
    source whose files span several classes goes with the class of its first file.
    """
    if len(shares) != 3 or any(not isinstance(s, int | float) or s <= 0 for s in shares) or abs(sum(shares) - 1) > 1e-6:
        raise EsclabError(f"dataset.folder.holdout={list(shares)} must be three positive shares of the files, "
                          "training, validation and test, summing to 1: e.g. [0.70, 0.15, 0.15]")
    rng = np.random.default_rng(seed)
    sizes = table.groupby("src_file", sort=True).size()
    owner = table.drop_duplicates("src_file").set_index("src_file")["category"].loc[sizes.index]
    fold_of: dict[str, int] = {}
    for category in sorted(owner.unique()):
        sources = sizes[owner == category]
        if len(sources) < 3:
            raise EsclabError(f"class {category} has {len(sources)} source recording(s), too few for a training, "
                              "validation and test part: add recordings, or use dataset.folder.split=kfold")
        wanted = [max(1, round(share * sources.sum())) for share in (shares[2], shares[1])]
        held = [0, 0]
        for source in rng.permutation(sources.index.to_numpy()):
            part = next((i for i in (0, 1) if held[i] < wanted[i]), 2)
            fold_of[source] = (HOLDOUT_FOLDS["test"], HOLDOUT_FOLDS["validation"], HOLDOUT_FOLDS["training"])[part]
            if part < 2:
                held[part] += sources[source]
        if HOLDOUT_FOLDS["training"] not in {fold_of[s] for s in sources.index}:
            raise EsclabError(f"class {category}'s test and validation shares took all its files: add recordings, "
                              "or lower the test and validation shares in dataset.folder.holdout")
    return table["src_file"].map(fold_of).to_numpy()


def make_folder_table(root: Path, *, n_folds: int, n_classes: int | None = None, group_pattern: str | None = None,
                      bad_files: str = "refuse", seed: int = 0, split: str = "kfold",
                      holdout: list[float] = (0.70, 0.15, 0.15)) -> pd.DataFrame:
    """The checked split table of a folder-per-class tree, with its folds: `n_folds` stratified (grouped) folds, or
    with split=holdout one training / validation / test split in the `holdout` shares."""
    if split not in SPLITS:
        raise EsclabError(f"dataset.folder.split must be one of {', '.join(SPLITS)}; got {split!r}")
    table = find_clips(root, bad_files=bad_files)
    names = sorted(table["category"].unique())
    if n_classes is not None and len(names) != n_classes:
        raise EsclabError(f"{root} has {len(names)} class folders ({examples(names)}), expected {n_classes} "
                          "(dataset.n_classes): fix the tree, or set dataset.n_classes=null to take what is there")
    table = table.assign(path=[(root / name).as_posix() for name in table["filename"]],
                         label=table["category"].map({name: i for i, name in enumerate(names)}),
                         src_file=sources(table["filename"], group_pattern))
    if split == "holdout":
        table["fold"] = assign_holdout(table, shares=list(holdout), seed=seed)
    else:
        table["fold"] = assign_folds(table, n_folds=n_folds, seed=seed, grouped=group_pattern is not None)
    return table.sort_values(["fold", "filename"])[TABLE_COLUMNS].reset_index(drop=True)


def write_folder_split(root: Path, out: Path, **settings) -> pd.DataFrame:
    """The split stage for dataset=folder: the table of `root`'s tree written to `out` (make_folder_table's
    settings)."""
    table = make_folder_table(root, **settings)
    with atomic_file(out) as tmp:
        table.to_csv(tmp, index=False)
    per_class = table.groupby("category").size().to_dict()
    log.info("split: %d files, clips per class %s, per fold %s -> %s", len(table), per_class,
             table.groupby("fold").size().to_dict(), out)
    return table
