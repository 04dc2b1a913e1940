"""What a trained model must do to audio before its network sees it, carried inside the model itself.

Training writes `preprocessing_of(data)` into every fold model (a Lightning checkpoint's
hyper-parameters, a scikit-learn head's joblib file): the representation, the exact
settings its feature cache was built with (its features.json), the training rows'
normalisation and the class names. Prediction rebuilds the front end from that record,
never from the current config, so a model is always fed features computed as in training.
"""

import json

import numpy as np
import torch

from esclab.data.features import fit
from esclab.data.representations import decoded_kinds
from esclab.errors import EsclabError


def preprocessing_of(data) -> dict:
    """The record for a model trained on `data` (a set-up FoldData)."""
    meta = json.loads((data.features_dir / "features.json").read_text())
    names = data.index.drop_duplicates("label").sort_values("label")["category"].tolist()
    return {"representation": meta.get("representation", "logmel"), "settings": meta["settings"],
            "weights": meta.get("weights", {}), "mean": float(data.mean), "std": float(data.std), "classes": names}


class Frontend:
    """Windows of decoded audio (mono, any rate) -> rows as the feature cache holds them (float16 values, as float32).

    Rows are rounded through float16 like the cache, so a window that is a training clip
    gives its cache row.
    """

    def __init__(self, preprocessing: dict):
        self.representation, self.settings = preprocessing["representation"], preprocessing["settings"]
        self.duration = float(self.settings["duration"])
        decoded = decoded_kinds()
        if self.representation == "embedding":
            self.backbones = matching_backbones(self.settings, preprocessing.get("weights", {}))
        elif self.representation in decoded:  # log-mel, or the waveform itself
            self.decoded = decoded[self.representation](**self.settings)
            self.transform = self.decoded.transform()
        else:
            raise EsclabError(f"no esclab model reads {self.representation} features yet; nothing to predict with")

    def rows(self, window: np.ndarray, rate: int) -> np.ndarray:
        if self.representation == "embedding":
            from esclab.data.embeddings import embed

            row = embed(window, rate, self.backbones, self.duration)
        else:
            s = self.decoded
            clip = torch.from_numpy(fit(window, rate, sample_rate=s.sample_rate, n_samples=s.n_samples))
            with torch.inference_mode():
                row = self.transform(clip[None, None])[0, 0].numpy()
        return row.astype(np.float16).astype(np.float32)


def matching_backbones(settings: dict, weights: dict) -> list:
    """The model's backbones, built from the weights its cache was made with (`weights`: each backbone's setting,
    null for its default copy), refused unless those are the very weights the model was trained on."""
    from esclab.models.backbones import build_backbone

    backbones = []
    for name in settings["backbones"]:
        backbone = build_backbone(name, weights.get(name))
        trained = settings["weights_sha256"][name]
        if backbone.sha256 != trained:
            raise EsclabError(f"the model was trained on {name} weights with sha256 {trained}, but this machine's "
                              f"copy {backbone.weights} has {backbone.sha256}: install the weights it was trained "
                              "with (make setup)")
        backbones.append(backbone)
    return backbones
