"""The evaluate stage: pool the test folds (`dataset.folds`) into one set of metrics and reports.

Each clip of ESC-50 (or of any dataset's folds) is predicted exactly once, by the
model that did not train on its fold, so concatenating the folds' predictions gives
an honest test set of all clips; a holdout split has one test fold, its test part.
The stage reports both the per-fold spread (the usual "mean +- std" of ESC-50
papers) and the pooled view (per-class scores, ROC/PR, confusion matrix).
Floats are rounded and no timestamps are written, so the same predictions give
byte-identical metrics.json, which is what `dvc metrics diff` compares.
"""

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import precision_recall_fscore_support, recall_score, roc_auc_score

from esclab.atomic import atomic_file
from esclab.errors import EsclabError
from esclab.evaluation import plots

log = logging.getLogger(__name__)

PREDICTION_COLUMNS = ["filename", "fold", "label", "pred"]
HISTORY_COLUMNS = ["epoch", "train/loss", "val/loss", "val/acc"]
DECIMALS = 6
# The training stage writes probabilities with 6 significant digits; 50 of them may
# then sum to 1 +- a few 1e-5, far inside this.
SUM_TOLERANCE = 1e-3


def _retrain(fold: int) -> str:
    return f"run `dvc repro train` (or `python train.py fold={fold}`)"


def _read_fold_csv(path: Path, fold: int, required: list[str]) -> pd.DataFrame:
    """Read one fold's CSV written by the training stage, refusing a missing, empty or foreign file."""
    if not path.is_file():
        raise EsclabError(f"{path} not found: fold {fold} has not been trained; {_retrain(fold)}")
    try:
        table = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise EsclabError(f"{path} is not a readable CSV ({err}); {_retrain(fold)}") from None
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise EsclabError(f"{path} lacks the column(s) {', '.join(missing)}; {_retrain(fold)}")
    if table.empty:
        raise EsclabError(f"{path} has no rows; {_retrain(fold)}")
    return table


def prob_columns(table: pd.DataFrame) -> list[str]:
    """prob_0..prob_{C-1}, in class order (a CSV may hold them in any order)."""
    count = sum(c.startswith("prob_") for c in table.columns)
    return [f"prob_{i}" for i in range(count)]


def _check_predictions(table: pd.DataFrame, path: Path, fold: int) -> None:
    """Stop predictions that would give silently wrong metrics: NaN, non-distributions, stray labels."""
    probs = prob_columns(table)
    if not probs or any(c not in table.columns for c in probs):
        raise EsclabError(f"{path} must have probability columns prob_0..prob_<C-1>; {_retrain(fold)}")
    values = table[[*probs, "label", "pred"]]
    if values.isna().any().any():
        raise EsclabError(f"{path} has empty or NaN values in {values.isna().any(axis=1).sum()} row(s); {_retrain(fold)}")
    sums = table[probs].sum(axis=1)
    bad = (sums - 1).abs() > SUM_TOLERANCE
    if bad.any():
        raise EsclabError(f"{path}: probabilities in {bad.sum()} row(s) do not sum to 1 (e.g. {sums[bad].iloc[0]:.4f}); "
                          f"they must be softmax outputs; {_retrain(fold)}")
    for column in ("label", "pred"):
        if not table[column].isin(range(len(probs))).all():
            raise EsclabError(f"{path}: column {column} must hold class indices 0..{len(probs) - 1}; {_retrain(fold)}")
    if not (table["fold"] == fold).all():
        raise EsclabError(f"{path} holds rows of fold(s) {sorted(set(table['fold']) - {fold})}, not only fold {fold}; "
                          f"{_retrain(fold)}")


def load_predictions(folds_dir: Path, folds: Sequence[int]) -> pd.DataFrame:
    """Every test fold's predictions (folds_dir/<k>/predictions.csv, k in `folds`) in one table."""
    tables = []
    for fold in folds:
        path = folds_dir / str(fold) / "predictions.csv"
        table = _read_fold_csv(path, fold, PREDICTION_COLUMNS)
        _check_predictions(table, path, fold)
        if tables and prob_columns(table) != prob_columns(tables[0]):
            counts = len(prob_columns(table)), len(prob_columns(tables[0]))
            raise EsclabError(f"{path} has {counts[0]} classes but fold {folds[0]} has {counts[1]}: the folds come "
                              "from different datasets; run `dvc repro train` for all folds")
        tables.append(table)
    return pd.concat(tables, ignore_index=True)


def load_histories(folds_dir: Path, folds: Sequence[int]) -> pd.DataFrame:
    """Every test fold's per-epoch history (folds_dir/<k>/history.csv) in one table with a `fold` column."""
    tables = []
    for fold in folds:
        table = _read_fold_csv(folds_dir / str(fold) / "history.csv", fold, HISTORY_COLUMNS)
        tables.append(table.assign(fold=fold))
    return pd.concat(tables, ignore_index=True)


def class_names(index_csv: Path, n_classes: int) -> list[str]:
    """Class i's name is the `category` of the rows labelled i in the split table / feature index."""
    if not index_csv.is_file():
        raise EsclabError(f"{index_csv} not found: it names the classes; run `dvc repro features`")
    index = pd.read_csv(index_csv)
    if not {"label", "category"} <= set(index.columns):
        raise EsclabError(f"{index_csv} needs the columns label and category; run `dvc repro split features`")
    names = index[["label", "category"]].drop_duplicates().sort_values("label")
    if list(names["label"]) != list(range(n_classes)):
        raise EsclabError(f"{index_csv} does not give each of the predictions' {n_classes} classes (labels "
                          f"0..{n_classes - 1}) exactly one category: the predictions and the features come from "
                          "different runs; run `dvc repro train`")
    return list(names["category"])


def _round(value: float) -> float:
    return round(float(value), DECIMALS)


def ovr_macro_roc_auc(labels: np.ndarray, probs: np.ndarray) -> float | None:
    """One-vs-rest ROC AUC averaged over the classes present in `labels`.

    This is sklearn's roc_auc_score(multi_class="ovr", average="macro") when every
    class occurs. A class with no clip has no positives, so its AUC is undefined and
    sklearn would return NaN for the whole average; it is left out instead, so a
    reduced dataset (or an unlucky fold set) still gets a score. None (null in the
    JSON) when no class has both positives and negatives.
    """
    scores = [roc_auc_score(labels == c, probs[:, c]) for c in plots.ovr_classes(labels, probs.shape[1])]
    return _round(np.mean(scores)) if scores else None


def balanced_accuracy(labels: np.ndarray, predicted: np.ndarray) -> float:
    """The mean of per-class recalls over the classes present in `labels` (scikit-learn's balanced accuracy, without
    its warning when a prediction names a class absent here): what a model that ignores a rare class cannot fake."""
    return _round(recall_score(labels, predicted, labels=np.unique(labels), average="macro", zero_division=0))


def top_k_accuracy(labels: np.ndarray, probs: np.ndarray, k: int) -> float | None:
    """The share of clips whose class is among the k most probable; None (null) when k covers
    every class, where any model would score 1.

    Ranked as scikit-learn's top_k_accuracy_score ranks (a stable sort, reversed: of tied
    classes the higher index counts first), which refuses a two-class dataset's two columns."""
    n_classes = probs.shape[1]
    if k >= n_classes:
        log.info("evaluate: top-%d accuracy left out: there are only %d classes (set evaluate.top_k lower)",
                 k, n_classes)
        return None
    ranked = np.argsort(probs, axis=1, kind="mergesort")[:, ::-1][:, :k]
    return _round((ranked == labels[:, None]).any(axis=1).mean())


def pooled_metrics(pred: pd.DataFrame, class_names: list[str], top_k: int = 5) -> tuple[dict, pd.DataFrame]:
    """The metrics dict written to metrics.json and the per-class table written to per_class.csv.

    Accuracy is given per fold (and their mean and population std, ddof=0, the
    usual ESC-50 figure) and pooled over all clips; the other scores are pooled.
    balanced_accuracy is the mean of per_class.csv's recall column (over the classes
    that occur), the figure to read beside accuracy when the classes are imbalanced.
    macro_f1 averages per-class F1 over all classes, 0 for a class never predicted
    correctly, so it equals the mean of per_class.csv's f1 column.
    """
    if top_k < 1:
        raise EsclabError(f"evaluate.top_k must be at least 1, got {top_k}; set it in conf/config.yaml")
    n_classes = len(class_names)
    labels = pred["label"].to_numpy()
    predicted = pred["pred"].to_numpy()
    probs = pred[[f"prob_{i}" for i in range(n_classes)]].to_numpy()
    correct = pd.Series(labels == predicted, index=pred.index)
    fold_accuracy = correct.groupby(pred["fold"]).mean()
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predicted, labels=range(n_classes), zero_division=0)
    per_class = pd.DataFrame({"class": class_names, "label": range(n_classes), "precision": precision,
                              "recall": recall, "f1": f1, "support": support}).round(DECIMALS)
    metrics = {
        "accuracy_mean": _round(fold_accuracy.mean()),
        "accuracy_std": _round(np.std(fold_accuracy.to_numpy(), ddof=0)),
        "fold_accuracy": {str(fold): _round(acc) for fold, acc in fold_accuracy.items()},
        "accuracy_pooled": _round(correct.mean()),
        "balanced_accuracy": balanced_accuracy(labels, predicted),
        "macro_f1": _round(f1.mean()),
        "macro_roc_auc": ovr_macro_roc_auc(labels, probs),
        f"top{top_k}_accuracy": top_k_accuracy(labels, probs, top_k),
        "n_clips": len(pred),
        "n_classes": n_classes,
    }
    return metrics, per_class


def write_reports(folds_dir: Path, index_csv: Path, reports_dir: Path, *, folds: Sequence[int] = range(1, 6),
                  top_k: int = 5) -> dict:
    """The evaluate stage: metrics.json, per_class.csv and plots/ under `reports_dir`; returns the metrics.

    Every input is read and checked before anything is written, so a bad fold
    leaves the previous reports as they were.
    """
    pred = load_predictions(folds_dir, folds)
    names = class_names(index_csv, len(prob_columns(pred)))
    history = load_histories(folds_dir, folds)
    metrics, per_class = pooled_metrics(pred, names, top_k)
    with atomic_file(reports_dir / "metrics.json") as tmp:
        tmp.write_text(json.dumps(metrics, sort_keys=True, indent=2) + "\n")
    with atomic_file(reports_dir / "per_class.csv") as tmp:
        per_class.to_csv(tmp, index=False)
    plots.write_plots(pred, names, history, reports_dir / "plots")
    log.info("evaluate: %d clips, %d classes, accuracy %.4f +- %.4f -> %s", metrics["n_clips"], metrics["n_classes"],
             metrics["accuracy_mean"], metrics["accuracy_std"], reports_dir)
    return metrics
