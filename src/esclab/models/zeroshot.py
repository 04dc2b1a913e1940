"""Zero-shot classification with CLAP: every class name becomes a text prompt, a clip goes to its nearest prompt.

Nothing is trained. A fold's "model" is its prompt set: `fit` embeds one prompt per
class (`model.template` with the class name, underscores as spaces) with the text tower
of the checkpoint that made the embedding cache, and looks at neither the rows nor the
labels it is given. A clip's probabilities are CLAP's own: softmax(logit_scale x cosine
similarity) of its pooled audio embedding with each prompt, the scale being the
checkpoint's `logit_scale_a`. The fitted head holds plain arrays, so predicting needs
neither torch nor the checkpoint.
"""

import functools
from pathlib import Path

import numpy as np
from scipy.special import softmax
from sklearn.base import BaseEstimator, ClassifierMixin

from esclab.errors import EsclabError
from esclab.models.backbones.clap import WEIGHTS, load_model


def prompts(template: str, classes: list[str]) -> list[str]:
    """`template` with each class name (underscores as spaces) in place of {label}."""
    if "{label}" not in template:
        raise EsclabError(f"model.template={template!r} has no {{label}} for the class name: write it like "
                          f"'This is a sound of {{label}}.'")
    return [template.replace("{label}", name.replace("_", " ")) for name in classes]


@functools.cache
def embedded_prompts(folder: Path, sha256: str, texts: tuple[str, ...]) -> tuple[np.ndarray, float]:
    """The prompts' unit-length text embeddings (prompts x dim, float32) and the audio-to-text logit scale."""
    import torch

    model, processor = load_model(folder, sha256)
    tokens = processor.tokenizer(list(texts), padding=True, return_tensors="pt")
    with torch.inference_mode():
        embeddings = model.get_text_features(**tokens).pooler_output.numpy()
        scale = float(model.logit_scale_a.exp())
    embeddings.setflags(write=False)  # shared by every fold's head
    return embeddings, scale


class PromptClassifier(ClassifierMixin, BaseEstimator):
    """A scikit-learn classifier over pooled CLAP audio embeddings whose classes are text prompts."""

    def __init__(self, folder: str = "", sha256: str = "", texts: tuple[str, ...] = ()):
        self.folder, self.sha256, self.texts = folder, sha256, texts

    def fit(self, X: np.ndarray, y: np.ndarray | None = None) -> "PromptClassifier":
        """Embed the prompts; X is looked at for its width only, y not at all."""
        prompt_embeddings, self.logit_scale_ = embedded_prompts(Path(self.folder), self.sha256, tuple(self.texts))
        if X.shape[1] != prompt_embeddings.shape[1]:
            raise EsclabError(f"the pooled embeddings are {X.shape[1]}-d but CLAP's prompts "
                              f"{prompt_embeddings.shape[1]}-d: set model.pooling to mean or max (both puts two side "
                              "by side)")
        self.prompt_embeddings_ = np.array(prompt_embeddings)
        self.classes_ = np.arange(len(self.texts))
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        audio = np.asarray(X, dtype=np.float64)
        audio = audio / np.linalg.norm(audio, axis=1, keepdims=True)
        return softmax(self.logit_scale_ * audio @ self.prompt_embeddings_.T.astype(np.float64), axis=1)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.classes_[self.predict_proba(X).argmax(axis=1)]


def zeroshot(template: str, classes: list[str], features: dict) -> PromptClassifier:
    """The zero-shot head for `classes` (names in label order), prompting the text tower of the checkpoint that the
    features config (`features`, a plain dict) names, which must be a CLAP cache alone."""
    backbones = list(features["backbones"])
    if backbones != ["clap"]:
        raise EsclabError(f"model=zeroshot compares clips with CLAP's text prompts, so it reads CLAP embeddings "
                          f"alone, but features.backbones={backbones}: set features=clap")
    folder, sha256 = WEIGHTS.checked((features.get("weights") or {}).get("clap"))
    return PromptClassifier(folder=str(folder), sha256=sha256, texts=tuple(prompts(template, classes)))
