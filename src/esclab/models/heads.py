"""scikit-learn heads on a frozen backbone's embeddings: logistic regression and a linear SVM (seed 002's).

A head is a pipeline from the cache's raw rows (clips x windows x dim) to class
probabilities: pool the windows (mean, max or both), standardise with the
training rows' statistics, then the classifier. Its regularisation strength C is
the one hyper-parameter, chosen per fold on the validation clips (never the test
fold) from `model.C`, a list.
"""

import inspect
from collections.abc import Sequence
from functools import partial

import numpy as np
from sklearn.calibration import CalibratedClassifierCV
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler
from sklearn.svm import LinearSVC

from esclab.errors import EsclabError
from esclab.models.ffn import check_pooling


def pool(rows: np.ndarray, how: str) -> np.ndarray:
    """(clips, windows, dim) -> (clips, dim), or (clips, 2 dim) for `both`."""
    rows = np.asarray(rows, dtype=np.float32)
    means, maxes = rows.mean(axis=1), rows.max(axis=1)
    return {"mean": means, "max": maxes, "both": np.concatenate([means, maxes], axis=1)}[how]


def logistic(C: float, seed: int, class_weight: str | None = None) -> LogisticRegression:
    return LogisticRegression(C=C, max_iter=2000, random_state=seed, class_weight=class_weight)


def svm(C: float, seed: int, class_weight: str | None = None) -> CalibratedClassifierCV:
    """A linear SVM, one class against the rest, with probabilities Platt-scaled on 3-fold cross-validated
    decision values of the training rows (then refitted on all of them). An SVC's one-against-one votes
    rank classes too coarsely for that: on real ESC-50 YAMNet embeddings it scored 71 % where this scores more."""
    return CalibratedClassifierCV(LinearSVC(C=C, random_state=seed, class_weight=class_weight), method="sigmoid",
                                  cv=3, ensemble=False)


HEADS = {"logistic": logistic, "svm": svm}


def candidates(name: str, *, C: Sequence[float], pooling: str, seed: int, balanced: bool = False,
               **options) -> list[Pipeline]:
    """One pipeline per value of C, in the order given; `balanced` weighs each class by how rare it is in the
    training rows (scikit-learn's class_weight="balanced")."""
    check_pooling(pooling)
    if not C or any(not isinstance(c, int | float) or c <= 0 for c in C):
        raise EsclabError(f"model.C={list(C)} must be a list of positive numbers, e.g. [0.1, 1, 10]")
    unknown = set(options) - set(inspect.signature(HEADS[name]).parameters) - {"class_weight"}
    if unknown:
        raise EsclabError(f"model={name} has no setting {', '.join(sorted(unknown))}: remove it (an experiment made "
                          f"for another head may have set it), see conf/model/{name}.yaml")
    return [make_pipeline(FunctionTransformer(partial(pool, how=pooling)), StandardScaler(),
                          HEADS[name](float(c), seed, class_weight="balanced" if balanced else None, **options))
            for c in C]


def class_probabilities(pipeline: Pipeline, rows: np.ndarray, n_classes: int) -> np.ndarray:
    """A fitted head's probabilities with every class's column, also one its training rows lacked; rows summing
    to 1 in float64."""
    full = np.zeros((len(rows), n_classes))
    full[:, pipeline.classes_] = pipeline.predict_proba(np.asarray(rows, dtype=np.float32))
    return full / full.sum(axis=1, keepdims=True)
