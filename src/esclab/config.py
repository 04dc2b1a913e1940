"""Types and ranges of the config values esclab reads, checked before any stage starts work.

Hydra already refuses an override of a key that does not exist (`lrr=1`) or of
an option a group does not have (`model=nonexistent`, listing the options)
while it composes. It cannot know that `lr` is a positive number: a command-line
value takes the type of what was typed, so `lr=abc` composes fine and would
only fail deep inside the optimizer. These rules catch that first, naming the
key and what it must be.
"""

from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

from esclab.errors import EsclabError


def minimised(monitor: str) -> bool:
    """Whether `train.monitor` is best at its lowest (a loss) or, like an accuracy, at its highest: the one rule for
    the checkpoint a fold keeps, the C a head picks, its best value and a search's direction."""
    return monitor.endswith("loss")


@dataclass(frozen=True)
class Rule:
    """A number of type `kind` above `low` (or at it, if `at_low`) and below `high`; null if `nullable`."""

    kind: type
    low: float = 0
    at_low: bool = False
    high: float | None = None
    nullable: bool = False

    def accepts(self, value) -> bool:
        if value is None:
            return self.nullable
        if isinstance(value, bool) or not isinstance(value, int if self.kind is int else int | float):
            return False
        above = value >= self.low if self.at_low else value > self.low
        return above and (self.high is None or value < self.high)

    def describe(self) -> str:
        what = "an integer" if self.kind is int else "a number"
        bounds = f"{'>=' if self.at_low else '>'} {self.low:g}" + (f" and < {self.high:g}" if self.high else "")
        return f"{what} {bounds}" + (" or null" if self.nullable else "")


POSITIVE_INT, COUNT, POSITIVE = Rule(int), Rule(int, at_low=True), Rule(float)
RULES: dict[str, Rule] = {
    "seed": COUNT,
    "lr": POSITIVE,
    "fold": Rule(int, nullable=True),
    "dataset.n_classes": Rule(int, nullable=True),  # null: dataset=folder takes its class folders as they are
    "dataset.n_folds": POSITIVE_INT,
    "features.sample_rate": POSITIVE_INT,
    "features.duration": POSITIVE,
    "features.n_fft": POSITIVE_INT,
    "features.hop_length": POSITIVE_INT,
    "features.n_mels": POSITIVE_INT,
    "features.f_min": Rule(float, at_low=True),
    "features.f_max": Rule(float, nullable=True),
    "features.top_db": Rule(float, nullable=True),
    "features.batch_size": Rule(int, nullable=True),
    "features.num_workers": Rule(int, at_low=True, nullable=True),
    "train.batch_size": POSITIVE_INT,
    "train.num_workers": COUNT,
    "train.val_fraction": Rule(float, high=1),
    "train.val_fold": Rule(int, nullable=True),
    "train.early_stopping_patience": Rule(int, nullable=True),
    "train.label_smoothing": Rule(float, at_low=True, high=1),
    "train.parallel_folds": POSITIVE_INT,
    "trainer.max_epochs": POSITIVE_INT,
    "trainer.gradient_clip_val": Rule(float, nullable=True),
    "trainer.accumulate_grad_batches": POSITIVE_INT,
    "model.backbone_lr": Rule(float, nullable=True),
    "evaluate.top_k": POSITIVE_INT,
    "download.retries": COUNT,
    "download.backoff_s": Rule(float, at_low=True),
    "download.timeout_s": POSITIVE,
}
CHOICES: dict[str, tuple[str, ...]] = {
    "dataset.layout": ("esc50", "urbansound8k", "folder"),  # how the split stage reads the unpacked dataset
}
_MISSING = object()


def check_config(cfg: DictConfig) -> None:
    """Raise EsclabError for a value the user must supply (`???`) and for the first value that breaks its rule or
    is not one of its choices (keys absent from `cfg` are skipped)."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise EsclabError(f"{', '.join(missing)} must be set (??? in conf/): pass it on the command line, e.g. "
                          f"{missing[0]}=..., or run `python -m esclab.params ... {missing[0]}=...` for dvc repro")
    for key, rule in RULES.items():
        value = OmegaConf.select(cfg, key, default=_MISSING)
        if value is not _MISSING and not rule.accepts(value):
            raise EsclabError(f"{key}={value!r} is not valid: it must be {rule.describe()}; fix the override, "
                              "or the value in conf/ (params.yaml under dvc repro)")
    for key, choices in CHOICES.items():
        value = OmegaConf.select(cfg, key, default=_MISSING)
        if value is not _MISSING and value not in choices:
            raise EsclabError(f"{key}={value!r} is not valid: it must be one of {', '.join(choices)}; fix the "
                              "override, or the value in conf/ (params.yaml under dvc repro)")
