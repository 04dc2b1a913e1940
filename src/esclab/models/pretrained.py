"""A pretrained Hugging Face audio model fine-tuned end to end on the waveform cache (seed 000's wav2vec2).

One class for every checkpoint that `transformers.AutoModelForAudioClassification` loads:
wav2vec2, HuBERT, WavLM, the Whisper encoder, AST. It is the library's own audio
classifier (its pooling over frames and a new linear head for `n_classes`, built with
`ignore_mismatched_sizes`, so a checkpoint fine-tuned on other classes, AST's AudioSet
one, gets a fresh head), and the checkpoint's own feature extractor turns each batch of
waveforms into the model's inputs inside `forward`, after augmentation, as the Hugging
Face audio-classification example does it in its data collator.

`model.checkpoint` is a hub id or a folder (models/backbones/hub.py resolves it). A
checkpoint of a fine-tuned fold must load where that folder is gone, so the network
names `self_contained`: the constructor arguments that rebuild it without the folder (the
model's config and the extractor's settings; the fine-tuned weights are in the state
dict). Classifier keeps them in its hyper-parameters.
"""

import numpy as np
import torch
from torch import nn

from esclab.errors import EsclabError
from esclab.models.backbones.hub import local_folder, quiet_transformers, resolve


class Pretrained(nn.Module):
    """Waveforms (batch, 1, samples) at `sample_rate` -> class logits (batch, n_classes).

    `backbone_lr` is the learning rate of the parameters the checkpoint provided; those it did not (the new head)
    train at the optimizer's `lr`. None trains everything at `lr`.
    """

    traceable = False  # its feature extractor runs in numpy: no MLflow model of it (training/run.py), its checkpoint

    def __init__(self, *, n_classes: int, input_shape: tuple[int, ...], checkpoint: str, sample_rate: int,
                 freeze_feature_encoder: bool = False, backbone_lr: float | None = None, config: dict | None = None,
                 extractor: dict | None = None):
        super().__init__()
        import transformers
        from transformers import AutoFeatureExtractor, AutoModelForAudioClassification

        quiet_transformers()
        if config is None:  # training: the checkpoint's weights, a new head
            folder = local_folder(checkpoint, "model.checkpoint")
            self.network, loading = AutoModelForAudioClassification.from_pretrained(
                folder, num_labels=n_classes, ignore_mismatched_sizes=True, output_loading_info=True)
            self.extractor = AutoFeatureExtractor.from_pretrained(folder)
            new = set(loading["missing_keys"]) | {key for key, *_ in loading["mismatched_keys"]}
        else:  # a saved fold: the architecture only; its weights come from the checkpoint's state dict
            self.network = AutoModelForAudioClassification.from_config(
                transformers.CONFIG_MAPPING[config["model_type"]].from_dict(config))
            self.extractor = getattr(transformers, extractor["feature_extractor_type"]).from_dict(extractor)
            new = {name for name, _ in self.network.named_parameters()}
        if self.extractor.sampling_rate != sample_rate:
            raise EsclabError(f"model.checkpoint={checkpoint} reads {self.extractor.sampling_rate} Hz audio, but the "
                              f"waveform cache is at {sample_rate} Hz: set features.sample_rate="
                              f"{self.extractor.sampling_rate}")
        if freeze_feature_encoder:
            if not hasattr(self.network, "freeze_feature_encoder"):
                raise EsclabError(f"model.freeze_feature_encoder=true, but {type(self.network).__name__} "
                                  f"(model.checkpoint={checkpoint}) has no convolutional feature encoder: set it false")
            self.network.freeze_feature_encoder()
        self.network.train()  # from_pretrained leaves it in eval mode, dropout off; Lightning keeps modules' modes
        self.sample_rate, self.backbone_lr = sample_rate, backbone_lr
        self.head = sorted(new)
        self.self_contained = {"config": self.network.config.to_dict(), "extractor": self.extractor.to_dict()}

    @staticmethod
    def weights_sha256(*, checkpoint: str, **_) -> str:
        return resolve(checkpoint, "model.checkpoint").sha256

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        waveforms = list(x.detach().squeeze(1).float().cpu().numpy().astype(np.float32))
        inputs = self.extractor(waveforms, sampling_rate=self.sample_rate, return_tensors="pt")
        return self.network(**{k: v.to(x.device) for k, v in inputs.items()}).logits

    def parameter_groups(self) -> list[dict]:
        """The optimizer's groups: the new head at the optimizer's lr, the pretrained rest at `backbone_lr`.

        Frozen parameters are left out."""
        trained = [(name, p) for name, p in self.network.named_parameters() if p.requires_grad]
        if self.backbone_lr is None:
            return [{"params": [p for _, p in trained]}]
        head = [p for name, p in trained if name in self.head]
        backbone = [p for name, p in trained if name not in self.head]
        return [group for group in ({"params": head}, {"params": backbone, "lr": self.backbone_lr}) if group["params"]]
