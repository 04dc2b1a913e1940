"""Hugging Face speech encoders used frozen (seed 001's wav2vec2 embeddings): wav2vec2, HuBERT, WavLM, Whisper.

One class, one registry entry per key (`SPEECH_BACKBONES`), each with its default hub id;
`features.weights.<key>` names another hub id or a folder written by `save_pretrained`
(models/backbones/hub.py). The checkpoint's own feature extractor makes its input, and
the encoder runs once over each clip on the CPU; its last hidden state (a frame every
20 ms in all four) is averaged over windows of 0.96 s every 0.48 s, YAMNet's grid, so a
clip has as many windows as YAMNet gives it and the two can be cached side by side
(data/embeddings.py). Whisper's extractor pads every clip to 30 s: its attention mask
says which share of the input is audio, and only the frames of that share are used.
AST is not here: its tokens are patches of time and frequency, not frames in time
(`model=ast` fine-tunes it).
"""

import numpy as np
import torch

from esclab.models.backbones.hub import HubWeights, quiet_transformers

WINDOW, HOP = 0.96, 0.48  # seconds, YAMNet's patches
DEFAULTS = {"wav2vec2": "facebook/wav2vec2-base", "hubert": "facebook/hubert-base-ls960",
            "wavlm": "microsoft/wavlm-base-plus", "whisper": "openai/whisper-base"}


class SpeechEncoder:
    """A waveform in, the mean of the last hidden state over each window (n x hidden size) out, no class scores."""

    name: str
    pinned: HubWeights
    sample_rate = 16000  # until the checkpoint's extractor says otherwise

    def __init__(self, weights=None):
        from transformers import AutoFeatureExtractor, AutoModelForAudioClassification

        quiet_transformers()
        checkpoint = self.pinned.checkpoint(weights)
        self.weights, self.sha256, self.source = checkpoint.folder, checkpoint.sha256, checkpoint.exact_name
        self.extractor = AutoFeatureExtractor.from_pretrained(self.weights)
        # The audio-classification class is the one Auto class that gives every family's encoder alone (Whisper's
        # AutoModel is the whole encoder-decoder); its head is never used.
        self.network = AutoModelForAudioClassification.from_pretrained(self.weights).eval()
        self.sample_rate = self.extractor.sampling_rate

    @staticmethod
    def window_centres(n_windows: int) -> np.ndarray:
        return np.arange(n_windows) * HOP + WINDOW / 2

    @torch.inference_mode()
    def __call__(self, waveform: np.ndarray) -> tuple[np.ndarray, None]:
        inputs = self.extractor(np.asarray(waveform, dtype=np.float32), sampling_rate=self.sample_rate,
                                return_tensors="pt", return_attention_mask=True)
        audio_share = float(inputs["attention_mask"].float().mean())
        del inputs["attention_mask"]  # one unpadded clip: wav2vec2-base was trained without one
        hidden = self.network(**inputs, output_hidden_states=True).hidden_states[-1][0].float().numpy()
        frames = hidden[:max(1, round(len(hidden) * audio_share))]
        return window_means(frames, len(waveform) / self.sample_rate), None


def window_means(frames: np.ndarray, seconds: float) -> np.ndarray:
    """(frames x dim) spread evenly over `seconds` -> (windows x dim): the mean of the frames centred in each window
    (the nearest frame for a window that has none), windows every HOP until one reaches the end."""
    n_windows = 1 + int(np.ceil(max(0.0, seconds - WINDOW) / HOP - 1e-9))
    centres = (np.arange(len(frames)) + 0.5) * seconds / len(frames)
    starts = np.arange(n_windows)[:, None] * HOP
    inside = (centres >= starts) & (centres < starts + WINDOW)
    nearest = np.abs(centres - (starts + WINDOW / 2)).argmin(axis=1)
    inside[np.arange(n_windows), nearest] |= ~inside.any(axis=1)
    return (inside @ frames) / inside.sum(axis=1, keepdims=True)


SPEECH_BACKBONES = {key: type(f"SpeechEncoder_{key}", (SpeechEncoder,), {"name": key, "pinned": HubWeights(key, hub)})
                    for key, hub in DEFAULTS.items()}
