"""The cross-validation's fold models, loaded for prediction and averaged (the Kaggle way), or one fold of them.

`models/fold_<k>.ckpt` is a Lightning checkpoint (networks: cnn4, ffn) or a joblib
file (scikit-learn heads); either carries its preprocessing (serving/preprocessing.py).
"""

import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from esclab.errors import EsclabError
from esclab.serving.preprocessing import Frontend

RETRAIN = "retrain it: dvc repro, or delete the fold models and run python train.py again"


@dataclass
class FoldModel:
    """One fold's model: raw cache-like rows (n x row shape) -> class probabilities (n x classes)."""

    path: Path
    preprocessing: dict
    predict: object  # rows (np.ndarray) -> probabilities (np.ndarray)
    network: torch.nn.Module | None = None  # a network's torch module (rows -> probabilities)
    pipeline: object = None  # a scikit-learn head's fitted pipeline
    identity: dict | None = None  # the run that trained it: run_key, fold, folds (training/run.py's stamp)


def load_fold(path: Path) -> FoldModel:
    """A fold model from its file; one line naming the file when it is missing, damaged or too old."""
    if not path.is_file():
        raise EsclabError(f"model {path} not found: train one first (dvc repro, or python train.py), or pass "
                          "--models with the folder that holds fold_<k>.ckpt")
    try:
        return load_network(path) if zipfile.is_zipfile(path) else load_head(path)
    except EsclabError:
        raise
    except Exception as err:  # a truncated or foreign file fails in torch or pickle in many ways
        raise EsclabError(f"cannot load model {path} ({type(err).__name__}: {err}); {RETRAIN}") from None


def load_network(path: Path) -> FoldModel:
    from esclab.training.module import Classifier
    from esclab.training.run import Probabilities

    module = Classifier.load_from_checkpoint(path, map_location="cpu")
    preprocessing = module.hparams.get("preprocessing")
    if not preprocessing:
        raise EsclabError(f"model {path} was trained before esclab kept the preprocessing in its models; {RETRAIN}")
    network = Probabilities(module.model, preprocessing["mean"], preprocessing["std"]).eval()

    def predict(rows: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return network(torch.from_numpy(np.asarray(rows, dtype=np.float32))).numpy()

    return FoldModel(path, preprocessing, predict, network, identity=module.hparams.get("identity"))


def load_head(path: Path) -> FoldModel:
    import joblib

    from esclab.models.heads import class_probabilities

    saved = joblib.load(path)
    if not isinstance(saved, dict) or "preprocessing" not in saved:
        raise EsclabError(f"model {path} was trained before esclab kept the preprocessing in its models; {RETRAIN}")
    pipeline, preprocessing = saved["pipeline"], saved["preprocessing"]

    def predict(rows: np.ndarray) -> np.ndarray:
        return class_probabilities(pipeline, rows, len(preprocessing["classes"]))

    return FoldModel(path, preprocessing, predict, pipeline=pipeline, identity=saved.get("identity"))


class FoldEnsemble:
    """Fold models that share one preprocessing; their probabilities averaged."""

    def __init__(self, models: list[FoldModel]):
        first = models[0].preprocessing

        def inputs_and_outputs(preprocessing: dict) -> tuple:
            return preprocessing["representation"], preprocessing["settings"], preprocessing["classes"]

        for other in models[1:]:
            if inputs_and_outputs(other.preprocessing) != inputs_and_outputs(first):
                raise EsclabError(f"{other.path} and {models[0].path} were trained on different features or classes: "
                                  "they come from different runs; rerun the cross-validation, or pick one with --fold")
        self.models, self.preprocessing = models, first
        self.classes = first["classes"]
        self.frontend = Frontend(first)
        self.duration = self.frontend.duration
        self.description = ", ".join(model.path.name for model in models)

    def predict(self, rows: np.ndarray) -> np.ndarray:
        return np.mean([model.predict(rows) for model in self.models], axis=0)

    def predict_windows(self, windows: list[np.ndarray], rate: int) -> np.ndarray:
        """Windows of a recording (mono, any rate) -> class probabilities (windows x classes)."""
        return self.predict(np.stack([self.frontend.rows(window, rate) for window in windows]))


def load_cross_validation(models_dir: Path, fold: int | None = None) -> FoldEnsemble:
    """Every `fold_<k>.ckpt` in `models_dir` (or fold `fold` only)."""
    if fold is not None:
        return FoldEnsemble([load_fold(models_dir / f"fold_{fold}.ckpt")])
    found = ((re.fullmatch(r"fold_(\d+)", p.stem), p) for p in models_dir.glob("fold_*.ckpt"))
    numbered = {int(match.group(1)): p for match, p in found if match}
    paths = [numbered[k] for k in sorted(numbered)]
    if not paths:
        raise EsclabError(f"no fold models (fold_<k>.ckpt) in {models_dir}: train a cross-validation first "
                          "(dvc repro, or python train.py), or pass --models with the folder that holds them")
    models = [load_fold(path) for path in paths]
    check_one_run(models, models_dir)
    return FoldEnsemble(models)


def check_one_run(models: list[FoldModel], models_dir: Path) -> None:
    """Average only the complete fold models of one cross-validation: one run key, and exactly its folds."""
    unstamped = [m.path.name for m in models if not m.identity]
    if unstamped:
        raise EsclabError(f"{', '.join(unstamped)} in {models_dir} do not say which run trained them (made before "
                          f"esclab recorded it); {RETRAIN}")
    keys = [m.identity["run_key"] for m in models]
    most = max(set(keys), key=keys.count)
    if len(set(keys)) > 1:
        odd = [m.path.name for m, key in zip(models, keys) if key != most]
        same = [m.path.name for m, key in zip(models, keys) if key == most]
        raise EsclabError(f"{', '.join(odd)} in {models_dir} come from another run than {', '.join(same)} (other "
                          "code, config or data): retrain them (dvc repro), or pick one model with --fold")
    found = sorted(m.identity["fold"] for m in models)
    expected = sorted(models[0].identity["folds"])
    if found != expected:
        missing = sorted(set(expected) - set(found))
        raise EsclabError(f"the cross-validation in {models_dir} has folds {', '.join(map(str, found))} of "
                          f"{', '.join(map(str, expected))}" + (f" (fold {', '.join(map(str, missing))} missing: it "
                          "failed or was never trained)" if missing else "") +
                          ": finish it (dvc repro, or python train.py), or pick one model with --fold")
