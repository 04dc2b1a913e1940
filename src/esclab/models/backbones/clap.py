"""CLAP's audio tower (LAION's contrastive language-audio pretraining), frozen, through `transformers`.

`features.weights.clap` names the checkpoint: a hub id (`laion/clap-htsat-unfused` by
default, or a sibling such as `laion/clap-htsat-fused`, `laion/larger_clap_general`) or
a folder written by `save_pretrained` (hub.py). The embedding is the projected audio
embedding scaled to unit length, `ClapModel.get_audio_features`: the space CLAP's text
tower puts its prompts in, so a head can train on it and `model=zeroshot` can compare
it with class names (models/zeroshot.py).

CLAP reads up to `max_length_s` of audio (10 s for LAION's checkpoints) at the feature
extractor's rate (48 kHz). A clip is cut into windows of that length from its start, the
last one shorter; each goes through the checkpoint's own feature extractor, which
repeats a short window until it fills the input ("repeatpad"). A 5-s ESC-50 clip is
one window, which is how CLAP's published zero-shot scores were measured. Windows never
exceed the input, so the extractor's random crop of long audio never happens.
"""

import functools
from pathlib import Path

import numpy as np
import torch

from esclab.models.backbones.hub import HubWeights, quiet_transformers

WEIGHTS = HubWeights(backbone="clap", default="laion/clap-htsat-unfused")


@functools.cache
def load_model(folder: Path, sha256: str):
    """The checkpoint's ClapModel (evaluation mode) and processor, loaded once per process (`sha256` keys the cache,
    so a folder whose weights changed is read again)."""
    from transformers import ClapModel, ClapProcessor

    quiet_transformers()
    return ClapModel.from_pretrained(folder).eval(), ClapProcessor.from_pretrained(folder)


class Clap:
    """The frozen audio tower: a waveform in, one unit-length embedding per window (n x projection dim) out."""

    name = "clap"
    sample_rate = 48000  # LAION's checkpoints'; an instance takes its checkpoint's own
    pinned = WEIGHTS

    def __init__(self, weights: Path | None = None):
        checkpoint = WEIGHTS.checkpoint(weights)
        self.weights, self.sha256, self.source = checkpoint.folder, checkpoint.sha256, checkpoint.exact_name
        self.model, processor = load_model(self.weights, self.sha256)
        self.extractor = processor.feature_extractor
        self.sample_rate = self.extractor.sampling_rate
        self.window = self.extractor.nb_max_samples

    def window_centres(self, n_windows: int) -> np.ndarray:
        """Seconds from the clip's start to the middle of each window (a shorter last one counted as whole)."""
        return (np.arange(n_windows) + 0.5) * self.window / self.sample_rate

    @torch.inference_mode()
    def __call__(self, waveform: np.ndarray) -> tuple[np.ndarray, None]:
        starts = range(0, len(waveform), self.window)
        # One window per extractor call: with a fused checkpoint's "fusion" truncation, the extractor marks one of
        # its batch's short inputs at random as long; alone, that is always the window itself.
        inputs = [self.extractor(waveform[s:s + self.window], sampling_rate=self.sample_rate, return_tensors="pt")
                  for s in starts]
        features = self.model.get_audio_features(input_features=torch.cat([i["input_features"] for i in inputs]),
                                                 is_longer=torch.cat([i["is_longer"] for i in inputs]))
        return features.pooler_output.numpy(), None
