"""Running an exported model (`esclab export`) with onnxruntime and numpy only: what a small device needs.

Nothing here imports torch. A recording is decoded with soundfile and mixed to mono,
resampled to each rate the model's inputs name with training's filter written in numpy
(data/audio.py), cut into windows of the training length (serving/predict.py), and each
window is one run of the graph, which holds everything else.
`esclab predict --models exported/model.int8.onnx recording.wav` takes this path.
"""

import json
from pathlib import Path

import numpy as np

from esclab.data.audio import pad_or_trim, resample
from esclab.errors import EsclabError

FORMAT = "esclab-onnx/1"


def fitted(mono: np.ndarray, rate: int, sample_rate: int, n_samples: int) -> np.ndarray:
    """`mono` at `sample_rate`, zero-padded or trimmed to `n_samples`, float32: data/features.py's `fit` without
    torch."""
    return pad_or_trim(resample(mono, rate, sample_rate), n_samples)


class ExportedModel:
    """An exported model file: windows of a recording (mono, any rate) -> class probabilities (windows x classes)."""

    def __init__(self, path: Path, threads: int | None = None):
        import onnxruntime

        if not path.is_file():
            raise EsclabError(f"exported model {path} not found: write one with esclab export --out {path.parent}")
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            meta = json.loads(self.session.get_modelmeta().custom_metadata_map["esclab"])
        except Exception as err:  # a truncated file or another program's model fails in many ways
            raise EsclabError(f"cannot load exported model {path} ({type(err).__name__}: {err}); export it again "
                              "with esclab export") from None
        if meta.get("format") != FORMAT:
            raise EsclabError(f"{path} is in format {meta.get('format')!r}, this esclab reads {FORMAT}: export it "
                              "again with this version's esclab export")
        self.path, self.inputs = path, meta["inputs"]
        self.classes, self.duration = meta["classes"], float(meta["duration"])
        self.preprocessing = {"representation": meta["representation"], "settings": meta["settings"]}
        self.description = f"exported from {', '.join(meta['folds'])}"

    def predict_windows(self, windows: list[np.ndarray], rate: int) -> np.ndarray:
        rows = []
        for window in windows:
            feed = {name: fitted(window, rate, r, round(self.duration * r)) for name, r in self.inputs.items()}
            rows.append(self.session.run(["probabilities"], feed)[0])
        return np.stack(rows)
