"""What the features stage caches, chosen by `features.representation`, and which learners read it.

- `logmel` (data/features.py): clips x mels x frames, for the CNNs (`model=cnn4`, `resnet`).
- `waveform` (data/waveforms.py): clips x samples, the decoded audio, for learners that
  read audio themselves (`features=waveform`): the fine-tuned pretrained models (`model=wav2vec2`, `whisper`, `ast`).
- `embedding` (data/embeddings.py): clips x windows x dim of frozen pretrained
  backbones (`features=yamnet`, `aisfx`, `yamnet_aisfx`, `clap`), for the heads (`model=ffn`, `svm`, `logistic`;
  `zeroshot` on `clap`).

Each cuts files into rows the same way (`features.clips`: a row per file padded or
trimmed, or a row per window; data/clips.py).

A learner names what it reads in `conf/model/<name>.yaml` (`input:`); training
refuses a mismatch, or a cache built with other settings, before it starts.
"""

from dataclasses import asdict
from pathlib import Path

from omegaconf import DictConfig

from esclab.errors import EsclabError

REPRESENTATIONS = ("logmel", "waveform", "embedding")
READERS = {"logmel": "model=cnn4 or resnet", "waveform": "model=wav2vec2, whisper or ast",
           "embedding": "model=ffn, svm, logistic, or zeroshot on clap"}
CHOICES = {"logmel": "features=logmel", "waveform": "features=waveform",
           "embedding": "features=yamnet (or aisfx, yamnet_aisfx, clap)"}


def representation(features: DictConfig) -> str:
    name = features.representation
    if name not in REPRESENTATIONS:
        raise EsclabError(f"features.representation={name} is not one of {', '.join(REPRESENTATIONS)}")
    return name


def decoded_kinds() -> dict[str, type]:
    """The representations the decoding workers write from each clip's audio, and their settings classes."""
    from esclab.data.features import LogMelSettings
    from esclab.data.waveforms import WaveformSettings

    return {"logmel": LogMelSettings, "waveform": WaveformSettings}


def decoded_settings(features: DictConfig):
    """LogMelSettings or WaveformSettings: the settings of a representation the decoding workers write."""
    return decoded_kinds()[representation(features)].from_config(features)


def cache_settings(features: DictConfig) -> dict:
    """The settings a cache for `features` must have been built with (its features.json says)."""
    from esclab.data.embeddings import embedding_settings

    if representation(features) == "embedding":
        return asdict(embedding_settings(features))
    return asdict(decoded_settings(features))


def write_cache(split_csv: Path, out_dir: Path, features: DictConfig) -> Path:
    """The features stage: the cache of `features.representation` for every clip of the split table."""
    from esclab.data.embeddings import write_embeddings
    from esclab.data.features import write_features

    if representation(features) == "embedding":
        return write_embeddings(split_csv, out_dir, features)
    return write_features(split_csv, out_dir, decoded_settings(features), device=features.device,
                          batch_size=features.batch_size, num_workers=features.num_workers)


def check_learner(model: DictConfig, features: DictConfig) -> None:
    """Refuse a learner that cannot read the representation the features stage caches."""
    cached, reads = representation(features), model.input
    if reads != cached:
        raise EsclabError(f"model={model.name} reads {reads} features, but features.representation={cached}: "
                          f"choose {CHOICES[reads]}, or a learner of {cached} features ({READERS[cached]})")
