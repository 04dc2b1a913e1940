"""Training-time augmentation of log-mel or waveform batches: gain, time shift, mixup, then SpecAugment or noise.

`Classifier.training_step` applies it to each training batch after Lightning has
moved the batch to the module's device, so it runs where the network runs and
validation, test and prediction batches never pass through it. Each ingredient
acts on every example with its own probability `p`, and draws its random numbers
from torch's global generator on the batch's device: `BatchSeed` re-seeds that
generator before every training batch, so a resumed fold replays the same
augmentations as an uninterrupted one. With no ingredient, nothing is drawn.

What an ingredient does depends on the representation the feature cache holds,
which the Classifier passes in (never guessed from a tensor's shape):

- log-mel (and embedding rows, treated alike): spectrograms in dB, standardised
  with the training split's mean and std, so 0 is the training mean and one unit
  is `std` dB. A gain is an additive offset, and masks are filled with 0.
- waveform: the decoded audio (batch x 1 x samples), standardised the same way;
  its mean is ~0, so a gain is a factor of 10^(g/20), and `noise` adds white
  noise at a signal-to-noise ratio. Mixup of waveforms mixes the sounds themselves,
  Tokozume et al.'s between-class learning (EnvNet-v2, 84.9 % on ESC-50) without
  its weighting of each clip by its sound pressure level.

SpecAugment reads mel bands and `noise` reads samples, so each is refused on the
other representation (`check`) before training.
"""

from functools import partial

import torch
import torchaudio.transforms as T
from torch import Tensor

from esclab.errors import EsclabError


def _chosen(x: Tensor, p: float) -> Tensor:
    """True for each example of the batch with probability p, shaped to broadcast over x."""
    return (torch.rand(x.shape[0], device=x.device) < p).view(-1, *[1] * (x.dim() - 1))


class Gain:
    """Louder or quieter clips by g dB, uniform in [-max_db, max_db]: on a waveform a factor of 10^(g / 20), on a
    standardised log-mel an offset of g / std units.

    `std` is the training split's log-mel std in dB (1.0 when inputs are not
    standardised, which leaves them in dB); a waveform's level does not need it.
    """

    def __init__(self, *, p: float, max_db: float, std: float, representation: str):
        self.p, self.max_db, self.std, self.representation = p, max_db, std, representation

    def __call__(self, x: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        chosen = _chosen(x, self.p)
        db = (torch.rand(chosen.shape, device=x.device, dtype=x.dtype) * 2 - 1) * self.max_db * chosen
        if self.representation == "waveform":
            return x * 10 ** (db / 20), targets
        return x + db / self.std, targets


class TimeShift:
    """Roll each clip along time (frames, or samples) by up to max_fraction of its length either way.

    What leaves one end re-enters at the other, so nothing is lost or padded.
    """

    def __init__(self, *, p: float, max_fraction: float):
        self.p, self.max_fraction = p, max_fraction

    def __call__(self, x: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        batch, frames = x.shape[0], x.shape[-1]
        limit = int(self.max_fraction * frames)
        shift = torch.randint(-limit, limit + 1, (batch,), device=x.device) * _chosen(x, self.p).view(batch)
        source = (torch.arange(frames, device=x.device) - shift[:, None]) % frames  # as torch.roll, per example
        return x.gather(-1, source.view(batch, *[1] * (x.dim() - 2), frames).expand_as(x)), targets


class Mixup:
    """Zhang et al. (2018): a chosen clip becomes lam * itself + (1 - lam) * another clip of the batch.

    lam ~ Beta(alpha, alpha) per example, and the target is the same mix of the two
    targets, so targets stay probability vectors. Mixing waveforms mixes the sounds;
    mixing log-mels does not (the log of a sum is not a sum of logs): there it is
    mixup as done on images.
    """

    def __init__(self, *, p: float, alpha: float):
        if alpha <= 0:
            raise EsclabError(f"augment.mixup.alpha must be positive, got {alpha}")
        self.p, self.alpha = p, alpha

    def __call__(self, x: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        batch = x.shape[0]
        alpha = torch.tensor(float(self.alpha), device=x.device)
        lam = torch.distributions.Beta(alpha, alpha).sample((batch,))
        lam = torch.where(_chosen(lam, self.p), lam, 1.0)
        partner = torch.randperm(batch, device=x.device)
        weight = lam.to(x.dtype).view(-1, *[1] * (x.dim() - 1))
        mixed = weight * x + (1 - weight) * x[partner]
        weight = lam.to(targets.dtype)[:, None]
        return mixed, weight * targets + (1 - weight) * targets[partner]


class Noise:
    """White noise at a signal-to-noise ratio uniform in [min_snr_db, max_snr_db] dB per clip.

    The signal's power is the clip's own mean square, so a quiet clip gets quiet
    noise and a silent one stays silent.
    """

    def __init__(self, *, p: float, min_snr_db: float, max_snr_db: float):
        if min_snr_db > max_snr_db:
            raise EsclabError(f"augment.noise.min_snr_db={min_snr_db} is above max_snr_db={max_snr_db}: swap them")
        self.p, self.min_snr_db, self.max_snr_db = p, min_snr_db, max_snr_db

    def __call__(self, x: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        chosen = _chosen(x, self.p)
        snr = self.min_snr_db + torch.rand(chosen.shape, device=x.device, dtype=x.dtype) * (
            self.max_snr_db - self.min_snr_db)
        power = x.pow(2).mean(dim=tuple(range(1, x.dim())), keepdim=True)
        noise = torch.randn_like(x) * torch.sqrt(power / 10 ** (snr / 10))
        return x + noise * chosen, targets


class SpecAugment:
    """Park et al. (2019): n_masks mel bands and n_masks time spans per clip, filled with 0, the training mean.

    The widest band and span are fractions of the input (freq_mask of its mel bins,
    time_mask of its frames), so one setting means the same share of a clip at any
    n_mels, hop or clip length: in frames, 48 hides up to 11 % of a 431-frame clip
    but 31 % of a 157-frame one. Every clip gets its own masks (iid).
    """

    def __init__(self, *, p: float, freq_mask: float, time_mask: float, n_masks: int):
        for name, value in (("freq_mask", freq_mask), ("time_mask", time_mask)):
            if not 0 <= value <= 1:
                raise EsclabError(f"augment.specaugment.{name} is a fraction of the input between 0 and 1, got {value}")
        self.p, self.freq_mask, self.time_mask, self.n_masks = p, freq_mask, time_mask, n_masks

    def __call__(self, x: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        mels, frames = x.shape[-2:]
        masks = ([T.FrequencyMasking(int(self.freq_mask * mels), iid_masks=True)] * self.n_masks
                 + [T.TimeMasking(int(self.time_mask * frames), iid_masks=True)] * self.n_masks)
        masked = x
        for mask in masks:
            masked = mask(masked)
        return torch.where(_chosen(x, self.p), masked, x), targets


# What each ingredient reads; in Augment's order: gain and shift change each clip, mixup then mixes the changed
# clips, noise is added to the clip the network hears (its SNR is that clip's), and SpecAugment masks last, so a
# mask hides the same region of both mixed clips.
READS = {"gain": ("logmel", "waveform", "embedding"), "shift": ("logmel", "waveform", "embedding"),
         "mixup": ("logmel", "waveform", "embedding"), "noise": ("waveform",), "specaugment": ("logmel", "embedding")}


def check(settings: dict, representation: str) -> None:
    """Refuse an unknown ingredient, one that cannot act on `representation`, or a probability outside [0, 1]."""
    for name, values in settings.items():
        if name not in READS:
            raise EsclabError(f"augment.{name} is not an augmentation: must be one of {', '.join(READS)}")
        if representation not in READS[name]:
            usable = ", ".join(n for n, reads in READS.items() if representation in reads)
            raise EsclabError(f"augment.{name} does not act on {representation} features (features.representation="
                              f"{representation}): leave it out, with augment ingredients among {usable}")
        if not 0 <= values["p"] <= 1:
            raise EsclabError(f"augment.{name}.p must be a probability between 0 and 1, got {values['p']}")


class Augment:
    """The configured ingredients (augment.<name>: its settings) in READS' order; with none, batches pass untouched.

    `representation` is what the batches are (logmel, waveform or embedding): it
    decides what a gain is, and which ingredients apply at all.
    """

    def __init__(self, settings: dict, *, std: float = 1.0, representation: str = "logmel"):
        check(settings, representation)
        ingredients = {"gain": partial(Gain, std=std, representation=representation), "shift": TimeShift,
                       "mixup": Mixup, "noise": Noise, "specaugment": SpecAugment}
        self.steps = [make(**settings[name]) for name, make in ingredients.items() if name in settings]

    def __call__(self, x: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """A batch (B x 1 x mels x frames, or B x 1 x samples) and its targets (B x classes, probabilities),
        augmented."""
        for step in self.steps:
            x, targets = step(x, targets)
        return x, targets
