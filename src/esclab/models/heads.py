"""scikit-learn heads on a frozen backbone's embeddings: logistic regression and a linear SVM (seed 002's).

A head is a pipeline from the cache's raw rows (clips x windows x dim) to class
probabilities: pool the windows (mean, max or both), standardise with the
training rows' statistics, then the classifier. Its regularisation strength C is
the one hyper-parameter, chosen per fold on the validation clips (never the test
fold) from `model.C`, a list. A head with no C to choose (`zeroshot`, CLAP's text
prompts: models/zeroshot.py) is one pipeline that compares the pooled rows as they are.

Each head's maker names what it needs by its parameters: its settings from
`conf/model/<name>.yaml`, and any of `CONTEXT`, which training supplies.
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
from esclab.models.zeroshot import zeroshot


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


HEADS = {"logistic": logistic, "svm": svm, "zeroshot": zeroshot}
CONTEXT = {"C", "seed", "class_weight", "classes", "features"}  # what candidates() passes, not a setting


def candidates(name: str, *, pooling: str, seed: int, C: Sequence[float] = (), balanced: bool = False,
               classes: Sequence[str] = (), features: dict | None = None, **options) -> list[tuple[dict, Pipeline]]:
    """(what it chose, pipeline) for each value of C, in the order given, or the one pipeline of a head without C;
    `balanced` weighs each class by how rare it is in the training rows (scikit-learn's class_weight="balanced"),
    `classes` are the class names in label order and `features` the features config (plain), for heads that read
    them."""
    check_pooling(pooling)
    takes = set(inspect.signature(HEADS[name]).parameters)
    unknown = set(options) - (takes - CONTEXT) | ({"C"} if C and "C" not in takes else set())
    if unknown:
        raise EsclabError(f"model={name} has no setting {', '.join(sorted(unknown))}: remove it (an experiment made "
                          f"for another head may have set it), see conf/model/{name}.yaml")
    if balanced and "class_weight" not in takes:
        raise EsclabError(f"model={name} trains nothing, so train.class_weights=balanced has nothing to weigh: set "
                          "train.class_weights=none")
    context = {"seed": seed, "class_weight": "balanced" if balanced else None, "classes": list(classes),
               "features": features}
    make = partial(HEADS[name], **{k: v for k, v in context.items() if k in takes}, **options)

    def pooled() -> FunctionTransformer:
        return FunctionTransformer(partial(pool, how=pooling))

    if "C" not in takes:  # nothing to choose on validation, and rows compared as they are (cosines: not standardised)
        return [({}, make_pipeline(pooled(), make()))]
    if not C or any(not isinstance(c, int | float) or c <= 0 for c in C):
        raise EsclabError(f"model.C={list(C)} must be a list of positive numbers, e.g. [0.1, 1, 10]")
    return [({"C": float(c)}, make_pipeline(pooled(), StandardScaler(), make(C=float(c)))) for c in C]


def class_probabilities(pipeline: Pipeline, rows: np.ndarray, n_classes: int) -> np.ndarray:
    """A fitted head's probabilities with every class's column, also one its training rows lacked; rows summing
    to 1 in float64."""
    full = np.zeros((len(rows), n_classes))
    full[:, pipeline.classes_] = pipeline.predict_proba(np.asarray(rows, dtype=np.float32))
    return full / full.sum(axis=1, keepdims=True)
