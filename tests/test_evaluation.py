"""The evaluate stage: metrics that match hand computations, every report written, bad folds refused."""

import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from esclab.errors import EsclabError
from esclab.evaluation.metrics import load_predictions, pooled_metrics, write_reports

NAMES = ["dog", "rain", "siren"]
# Folds 1-4 hold two clips per class, fold 5 three: unequal folds tell pooled from mean accuracy.
FOLD_LABELS = {k: [0, 0, 1, 1, 2, 2] for k in range(1, 5)} | {5: [0, 0, 0, 1, 1, 1, 2, 2, 2]}
# The misclassified clips, (fold, position) -> (predicted class, rank of the true class).
# Fold accuracies: 6/6, 5/6, 4/6, 3/6, 9/9; 3 of the 6 errors have the truth second.
WRONG = {
    (2, 0): (1, 2),
    (3, 2): (2, 2), (3, 4): (0, 3),
    (4, 1): (2, 3), (4, 3): (0, 2), (4, 5): (0, 3),
}
PLOTS = ["confusion", "roc", "pr", "training_curves"]


def ranked_probs(rng: np.random.Generator, order: list[int]) -> np.ndarray:
    """Random softmax-like probabilities whose descending order of classes is `order`."""
    probs = np.empty(len(order))
    probs[order] = np.sort(rng.dirichlet(np.ones(len(order))))[::-1]
    return probs


def prediction_rows(fold: int, labels: list[int], rng: np.random.Generator) -> pd.DataFrame:
    rows = []
    for pos, label in enumerate(labels):
        pred, true_rank = WRONG.get((fold, pos), (label, 1))
        rest = [c for c in range(len(NAMES)) if c not in (label, pred)]
        order = [label, *rest] if true_rank == 1 else [pred, label, *rest] if true_rank == 2 else [pred, *rest, label]
        rows.append({"filename": f"{fold}-{pos}-A-{label}.wav", "fold": fold, "label": label, "pred": pred}
                    | {f"prob_{c}": p for c, p in enumerate(ranked_probs(rng, order))})
    return pd.DataFrame(rows)


@pytest.fixture
def run(tmp_path):
    """reports/folds/<k>/{predictions,history}.csv and an index.csv, as training and features write them."""
    rng = np.random.default_rng(0)
    folds = tmp_path / "reports" / "folds"
    for fold, labels in FOLD_LABELS.items():
        (folds / str(fold)).mkdir(parents=True)
        prediction_rows(fold, labels, rng).to_csv(folds / str(fold) / "predictions.csv", index=False,
                                                  float_format="%.6g")
        epochs = np.arange(4)
        pd.DataFrame({"epoch": epochs, "train/loss": 1 / (epochs + 1), "train/acc": rng.random(4),
                      "val/loss": 1.2 / (epochs + 1), "val/acc": rng.random(4), "lr": 1e-3}).to_csv(
            folds / str(fold) / "history.csv", index=False)
    index = pd.DataFrame([{"filename": f"{f}-{p}-A-{label}.wav", "fold": f, "label": label, "category": NAMES[label]}
                          for f, labels in FOLD_LABELS.items() for p, label in enumerate(labels)])
    index.to_csv(tmp_path / "index.csv", index=False)
    return tmp_path


def evaluate(run, reports=None, top_k=2):
    return write_reports(run / "reports" / "folds", run / "index.csv", reports or run / "reports", top_k=top_k)


def metrics_of(run, top_k=2):
    """The metrics alone: pooled_metrics on the loaded folds, without the slower plots."""
    return pooled_metrics(load_predictions(run / "reports" / "folds", range(1, 6)), NAMES, top_k)[0]


def test_fold_mean_std_and_pooled_accuracy(run):
    metrics = metrics_of(run)
    assert metrics["fold_accuracy"] == {"1": 1.0, "2": round(5 / 6, 6), "3": round(4 / 6, 6), "4": 0.5, "5": 1.0}
    assert metrics["accuracy_mean"] == 0.8  # (6 + 5 + 4 + 3 + 6) / 30, fold 5's 9/9 counting as 6/6
    # Correct clips per fold in sixths: 6 5 4 3 6, mean 4.8, squared deviations sum 6.8 over 5 folds (ddof=0).
    assert metrics["accuracy_std"] == round(math.sqrt(6.8 / 5) / 6, 6)
    assert metrics["accuracy_pooled"] == round(27 / 33, 6)
    assert (metrics["n_clips"], metrics["n_classes"]) == (33, 3)


def test_top_k_counts_the_true_class_ranked_second(run):
    metrics = metrics_of(run, top_k=2)
    assert metrics["top2_accuracy"] == round(30 / 33, 6)  # 27 right + 3 errors with the truth second
    assert "top5_accuracy" not in metrics
    one_row = pd.DataFrame({"fold": [1], "label": [1], "pred": [0], "prob_0": [0.5], "prob_1": [0.3], "prob_2": [0.2]})
    assert pooled_metrics(one_row, NAMES, top_k=2)[0]["top2_accuracy"] == 1.0
    assert pooled_metrics(one_row, NAMES, top_k=1)[0]["top1_accuracy"] == 0.0


def test_top_k_covering_every_class_is_null_not_a_meaningless_perfect_score(run):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # sklearn warned that k >= n_classes "will result in a perfect score"
        assert metrics_of(run, top_k=3)["top3_accuracy"] is None


def tiny(labels, preds):
    """One fold whose probabilities put all but 0.1 of the mass on the predicted class."""
    probs = np.full((len(labels), 3), 0.05)
    probs[np.arange(len(labels)), preds] = 0.9
    probs[:, 2] += np.linspace(0, 0.04, len(labels))  # distinct scores, so ROC AUC is not all ties
    probs /= probs.sum(axis=1, keepdims=True)
    return pd.DataFrame({"fold": 1, "label": labels, "pred": preds} | {f"prob_{c}": probs[:, c] for c in range(3)})


def test_macro_f1_and_per_class_scores_by_hand():
    metrics, per_class = pooled_metrics(tiny([0, 0, 1, 2], [0, 1, 1, 1]), NAMES, top_k=2)
    # dog: P 1/1, R 1/2, F1 2/3; rain: P 1/3, R 1/1, F1 1/2; siren: never right, F1 0.
    assert per_class["precision"].tolist() == [1.0, round(1 / 3, 6), 0.0]
    assert per_class["recall"].tolist() == [0.5, 1.0, 0.0]
    assert per_class["f1"].tolist() == [round(2 / 3, 6), 0.5, 0.0]
    assert metrics["macro_f1"] == round((2 / 3 + 1 / 2 + 0) / 3, 6)


def test_macro_roc_auc_is_sklearn_ovr_and_skips_absent_classes():
    pred = tiny([0, 0, 1, 2, 2, 1], [0, 1, 1, 2, 1, 1])
    probs = pred[["prob_0", "prob_1", "prob_2"]].to_numpy()
    expected = roc_auc_score(pred["label"], probs, multi_class="ovr", average="macro")
    assert pooled_metrics(pred, NAMES, top_k=2)[0]["macro_roc_auc"] == round(expected, 6)
    no_siren = tiny([0, 0, 1, 1], [0, 1, 1, 0])
    labels, probs = no_siren["label"].to_numpy(), no_siren[["prob_0", "prob_1", "prob_2"]].to_numpy()
    present = np.mean([roc_auc_score(labels == c, probs[:, c]) for c in (0, 1)])
    assert pooled_metrics(no_siren, NAMES, top_k=2)[0]["macro_roc_auc"] == round(present, 6)


def test_per_class_csv(run):
    evaluate(run)
    table = pd.read_csv(run / "reports" / "per_class.csv")
    assert list(table.columns) == ["class", "label", "precision", "recall", "f1", "support"]
    assert table["class"].tolist() == NAMES and table["label"].tolist() == [0, 1, 2]
    assert table["support"].tolist() == [11, 11, 11]
    # Each class loses 2 clips; dog is wrongly predicted 3 times, rain once, siren twice.
    assert table["recall"].tolist() == [round(9 / 11, 6)] * 3
    assert table["precision"].tolist() == [0.75, 0.9, round(9 / 11, 6)]
    p, r = np.array([0.75, 0.9, 9 / 11]), 9 / 11
    assert table["f1"].tolist() == pytest.approx(2 * p * r / (p + r), abs=1e-6)


def test_every_plot_and_its_data_is_written(run):
    evaluate(run)
    plots = run / "reports" / "plots"
    for name in PLOTS:
        assert (plots / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (plots / f"{name}.csv").stat().st_size > 0
    confusion = pd.read_csv(plots / "confusion.csv")
    assert list(confusion.columns) == ["actual", "predicted"] and len(confusion) == 33
    assert sorted(confusion["actual"].value_counts().items()) == [("dog", 11), ("rain", 11), ("siren", 11)]
    assert (confusion["actual"] != confusion["predicted"]).sum() == len(WRONG)
    assert list(pd.read_csv(plots / "roc.csv").columns) == ["fpr", "tpr"]
    assert list(pd.read_csv(plots / "pr.csv").columns) == ["recall", "precision"]
    curves = pd.read_csv(plots / "training_curves.csv")
    assert list(curves.columns) == ["step", "fold", "train_loss", "val_loss", "val_acc"]
    assert len(curves) == 5 * 4 and curves.groupby("fold")["step"].apply(list).tolist() == [[0, 1, 2, 3]] * 5


def test_curve_csvs_are_thinned_and_keep_their_ends(run):
    rng = np.random.default_rng(1)
    folds = run / "reports" / "folds"
    for fold in FOLD_LABELS:  # 3 x 300 noisy clips per fold: thousands of distinct thresholds
        labels = rng.integers(0, 3, 300)
        probs = rng.dirichlet(np.ones(3), 300) + np.eye(3)[labels] * 0.5
        probs /= probs.sum(axis=1, keepdims=True)
        table = pd.DataFrame({"filename": [f"{fold}-{i}.wav" for i in range(300)], "fold": fold, "label": labels,
                              "pred": probs.argmax(axis=1)} | {f"prob_{c}": probs[:, c] for c in range(3)})
        table.to_csv(folds / str(fold) / "predictions.csv", index=False)
    evaluate(run)
    roc = pd.read_csv(run / "reports" / "plots" / "roc.csv")
    pr = pd.read_csv(run / "reports" / "plots" / "pr.csv")
    assert 100 < len(roc) <= 200 and 100 < len(pr) <= 200
    assert roc.iloc[0].tolist() == [0.0, 0.0] and roc.iloc[-1].tolist() == [1.0, 1.0]
    assert roc["fpr"].is_monotonic_increasing and pr["recall"].is_monotonic_increasing
    assert pr.iloc[0]["recall"] == 0.0 and pr.iloc[-1]["recall"] == 1.0


def test_reports_are_byte_identical_across_runs(run):
    first = evaluate(run, run / "a")
    evaluate(run, run / "b")
    evaluate(run, run / "b")  # over its own previous output
    text = (run / "a" / "metrics.json").read_text()
    assert text == json.dumps(first, sort_keys=True, indent=2) + "\n"
    for name in ["metrics.json", "per_class.csv", *(f"plots/{p}.{ext}" for p in PLOTS for ext in ("csv", "png"))]:
        assert (run / "a" / name).read_bytes() == (run / "b" / name).read_bytes(), name


def test_missing_fold_is_named_with_the_command_that_makes_it(run):
    (run / "reports" / "folds" / "3" / "predictions.csv").unlink()
    with pytest.raises(EsclabError, match=r"folds/3/predictions.csv not found.*dvc repro train.*fold=3"):
        evaluate(run)
    assert not (run / "reports" / "metrics.json").exists()


@pytest.mark.parametrize("damage", ["not_summing", "nan"])
def test_bad_probabilities_are_refused(run, damage):
    path = run / "reports" / "folds" / "4" / "predictions.csv"
    table = pd.read_csv(path)
    table.loc[2, "prob_1"] = table.loc[2, "prob_1"] + 0.3 if damage == "not_summing" else np.nan
    table.to_csv(path, index=False)
    with pytest.raises(EsclabError, match=r"folds/4/predictions.csv"):
        load_predictions(run / "reports" / "folds", range(1, 6))
    with pytest.raises(EsclabError, match="sum to 1" if damage == "not_summing" else "NaN"):
        evaluate(run)
    assert not (run / "reports" / "metrics.json").exists()
