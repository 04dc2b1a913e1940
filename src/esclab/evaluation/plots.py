"""The evaluate stage's plots: PNGs to look at, and CSVs that `dvc plots` renders and diffs.

Figures are drawn on matplotlib's Agg canvas directly, without pyplot: no
display is needed, no global figure state is kept between plots, and a fixed
size, dpi and empty "Software" PNG field make the same inputs give the same bytes.
Curve CSVs are thinned to at most MAX_POINTS rows so `dvc plots diff` stays quick
and the files stay small enough to keep in git.
"""

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import auc, average_precision_score, confusion_matrix, precision_recall_curve, roc_curve

from esclab.atomic import atomic_dir

DPI = 100
MAX_POINTS = 200
# Beyond this many classes a per-class legend hides the curves it explains.
MAX_LEGEND_CLASSES = 10


def _figure(width: float, height: float, ncols: int = 1) -> tuple[Figure, list]:
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure, list(np.atleast_1d(figure.subplots(1, ncols)))


def _save(figure: Figure, path: Path) -> None:
    figure.savefig(path, dpi=DPI, metadata={"Software": None})


def _csv(table: pd.DataFrame, path: Path) -> None:
    table.to_csv(path, index=False, float_format="%.6g")


def thin(curve: pd.DataFrame, max_points: int = MAX_POINTS) -> pd.DataFrame:
    """At most `max_points` evenly spaced rows of a curve, always keeping both ends."""
    keep = np.unique(np.linspace(0, len(curve) - 1, min(len(curve), max_points)).round().astype(int))
    return curve.iloc[keep]


def _one_hot(labels: np.ndarray, n_classes: int) -> np.ndarray:
    return np.eye(n_classes, dtype=int)[labels]


def ovr_classes(labels: np.ndarray, n_classes: int) -> list[int]:
    """Classes with both positives and negatives: the only ones with a one-vs-rest ROC curve."""
    return [c for c in range(n_classes) if 0 < (labels == c).sum() < len(labels)]


def confusion(labels: np.ndarray, predicted: np.ndarray, names: list[str], out: Path) -> None:
    """confusion.png (counts, true class down, predicted across) and confusion.csv (one row per clip)."""
    n = len(names)
    counts = confusion_matrix(labels, predicted, labels=range(n))
    side = 3 + 0.25 * n  # 50 classes: ~15 inches, so every name and count stays readable
    font = 9 if n <= 20 else 6
    figure, (ax,) = _figure(side + 1, side)
    image = ax.imshow(counts, cmap="Blues")
    figure.colorbar(image, ax=ax, shrink=0.6, label="clips")
    ax.set_xticks(range(n), names, rotation=90, fontsize=font)
    ax.set_yticks(range(n), names, fontsize=font)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    for i, j in zip(*np.nonzero(counts)):
        dark = counts[i, j] > counts.max() / 2
        ax.text(j, i, counts[i, j], ha="center", va="center", fontsize=font, color="white" if dark else "black")
    ax.set_title(f"Confusion matrix ({counts.sum()} clips, all test folds)")
    _save(figure, out / "confusion.png")
    names = np.asarray(names)
    _csv(pd.DataFrame({"actual": names[labels], "predicted": names[predicted]}), out / "confusion.csv")


def _curves(ax, per_class: dict, names: list[str], micro: tuple, legend_at: str) -> None:
    """Thin per-class lines under the bold micro-average, the one summary worth reading off."""
    palette = colormaps["tab20"]
    for c, (x, y) in per_class.items():
        label = names[c] if len(names) <= MAX_LEGEND_CLASSES else None
        ax.plot(x, y, linewidth=0.6, alpha=0.7, color=palette(c % 20), label=label)
    x, y, label = micro
    ax.plot(x, y, linewidth=2.5, color="black", label=label)
    ax.set(xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(loc=legend_at, fontsize=7)
    ax.grid(alpha=0.3)


def roc(labels: np.ndarray, probs: np.ndarray, names: list[str], out: Path) -> None:
    """roc.png (one-vs-rest per class + micro-average) and roc.csv (the micro-average, `fpr,tpr`)."""
    per_class = {c: roc_curve(labels == c, probs[:, c])[:2] for c in ovr_classes(labels, len(names))}
    fpr, tpr, _ = roc_curve(_one_hot(labels, len(names)).ravel(), probs.ravel())
    figure, (ax,) = _figure(7, 6)
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey", linewidth=0.8)
    _curves(ax, per_class, names, (fpr, tpr, f"micro-average (AUC {auc(fpr, tpr):.3f})"), "lower right")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC, one class vs the rest")
    _save(figure, out / "roc.png")
    _csv(thin(pd.DataFrame({"fpr": fpr, "tpr": tpr})), out / "roc.csv")


def pr(labels: np.ndarray, probs: np.ndarray, names: list[str], out: Path) -> None:
    """pr.png (per class + micro-average) and pr.csv (the micro-average, `recall,precision`, recall rising)."""
    per_class = {}
    for c in ovr_classes(labels, len(names)):
        precision, recall, _ = precision_recall_curve(labels == c, probs[:, c])
        per_class[c] = (recall, precision)
    truth = _one_hot(labels, len(names)).ravel()
    precision, recall, _ = precision_recall_curve(truth, probs.ravel())
    recall, precision = recall[::-1], precision[::-1]  # sklearn lists recall falling; plots read left to right
    summary = f"micro-average (AP {average_precision_score(truth, probs.ravel()):.3f})"
    figure, (ax,) = _figure(7, 6)
    _curves(ax, per_class, names, (recall, precision, summary), "lower left")
    ax.set(xlabel="recall", ylabel="precision", title="Precision-recall, one class vs the rest")
    _save(figure, out / "pr.png")
    _csv(thin(pd.DataFrame({"recall": recall, "precision": precision})), out / "pr.csv")


def training_curves(history: pd.DataFrame, out: Path) -> None:
    """training_curves.png (loss and validation accuracy per epoch, a line per fold) and its long-format CSV."""
    table = pd.DataFrame({"step": history["epoch"], "fold": history["fold"], "train_loss": history["train/loss"],
                          "val_loss": history["val/loss"], "val_acc": history["val/acc"]})
    figure, (loss, acc) = _figure(12, 4.5, ncols=2)
    palette = colormaps["tab10"]
    for i, (fold, rows) in enumerate(table.groupby("fold")):
        loss.plot(rows["step"], rows["train_loss"], color=palette(i % 10), label=f"fold {fold} train")
        loss.plot(rows["step"], rows["val_loss"], color=palette(i % 10), linestyle="--", label=f"fold {fold} val")
        acc.plot(rows["step"], rows["val_acc"], color=palette(i % 10), label=f"fold {fold}")
    loss.set(xlabel="epoch", ylabel="loss", title="Loss (solid: train, dashed: validation)")
    acc.set(xlabel="epoch", ylabel="accuracy", title="Validation accuracy")
    for ax in (loss, acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7, ncols=2)
        ax.grid(alpha=0.3)
    _save(figure, out / "training_curves.png")
    _csv(table, out / "training_curves.csv")


def write_plots(pred: pd.DataFrame, names: list[str], history: pd.DataFrame, plots_dir: Path) -> None:
    """Every plot and its CSV into `plots_dir`, which is replaced as a whole (it is one DVC output)."""
    labels = pred["label"].to_numpy()
    probs = pred[[f"prob_{i}" for i in range(len(names))]].to_numpy()
    with atomic_dir(plots_dir) as tmp:
        confusion(labels, pred["pred"].to_numpy(), names, tmp)
        roc(labels, probs, names, tmp)
        pr(labels, probs, names, tmp)
        training_curves(history, tmp)
