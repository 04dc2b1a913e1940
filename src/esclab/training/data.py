"""One fold's data: the memory-mapped feature cache cut into train, validation and test.

For test fold k the other folds train. Validation is carved out of them (grouped
by source recording, so two takes of one recording never sit on both sides) or
is a named other fold; the test fold never reaches the training or validation
loaders, and normalisation statistics come from the training rows only.

Batches reach the network one of two ways, with the same (x, label, row) triples
in the same order: a DataLoader over the memory-mapped cache (the CPU path), or
slices of one tensor that holds every row on the training device (`resident`,
the GPU path: no host-to-device copy and no loader overhead per step).
"""

import json
import math
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import StratifiedGroupKFold
from torch.utils.data import DataLoader, Dataset, Sampler

from esclab.data.clips import BEFORE_WINDOWS
from esclab.errors import EsclabError
from esclab.training.seeding import derived_seed, epoch_permutation


class CacheRows(Dataset):
    """Rows of the feature cache as (1 x mels x frames, or 1 x windows x dim, float32, label, row), normalised.

    The cache is opened lazily, so a DataLoader worker maps the file itself instead
    of receiving a pickled copy of it.
    """

    def __init__(self, path: Path, labels: np.ndarray, rows: np.ndarray, mean: float, std: float):
        self.path, self.labels, self.rows = path, labels, rows
        self.mean, self.std = mean, std
        self.array = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        if self.array is None:
            self.array = np.load(self.path, mmap_mode="r")
        row = int(self.rows[i])
        x = torch.from_numpy(self.array[row].astype(np.float32))
        return ((x - self.mean) / self.std).unsqueeze(0), int(self.labels[row]), row


class ResidentBatches:
    """Batches cut from rows that already live on the training device, in the order a DataLoader would give them.

    Lightning takes any iterable with a length as a loader and never rebuilds one
    that is not a DataLoader; it calls `set_epoch` on `sampler`, so an
    `EpochShuffle` there orders every epoch as the DataLoader path does.
    """

    batch_sampler = None  # Lightning's shuffle check reads `batch_sampler` wherever it finds `sampler`

    def __init__(self, x: torch.Tensor, labels: torch.Tensor, rows: np.ndarray, batch_size: int,
                 sampler: Sampler[int] | None = None):
        self.x, self.labels, self.batch_size, self.sampler = x, labels, batch_size, sampler
        self.rows = torch.as_tensor(rows, dtype=torch.int64, device=x.device)

    def __len__(self) -> int:
        return math.ceil(len(self.rows) / self.batch_size)

    def __iter__(self):
        """Read the sampler at the first batch, not at `iter`: Lightning sets the epoch in between.

        Unlike `iter(DataLoader)` this draws nothing from the global generator; dropout and
        augmentations still match the DataLoader path because BatchSeed re-seeds before every batch.
        """
        order = self.rows
        if self.sampler is not None:
            order = order[torch.tensor(list(self.sampler), device=order.device)]
        for rows in order.split(self.batch_size):
            yield self.x[rows], self.labels[rows], rows


class EpochShuffle(Sampler[int]):
    """A new order every epoch, fixed by (seed, epoch); Lightning calls `set_epoch` before each."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return iter(epoch_permutation(self.n, self.seed, self.epoch).tolist())


class EpochBalanced(EpochShuffle):
    """`train.sampler=balanced`: each epoch draws as many rows as there are, with replacement, every class equally
    likely, so a rare class's clips repeat and a common class's are subsampled; fixed by (seed, epoch)."""

    def __init__(self, labels: np.ndarray, seed: int):
        super().__init__(len(labels), seed)
        self.weights = torch.as_tensor(1.0 / np.bincount(labels)[labels], dtype=torch.float64)

    def __iter__(self):
        generator = torch.Generator().manual_seed(derived_seed(self.seed, self.epoch))
        return iter(torch.multinomial(self.weights, self.n, replacement=True, generator=generator).tolist())


SAMPLERS = ("shuffle", "balanced")


def balanced_class_weights(labels: np.ndarray, n_classes: int) -> list[float]:
    """`train.class_weights=balanced`: n / (n_classes x count) per class, scikit-learn's "balanced" rule, so every
    class adds the same total weight to the loss; a class without training rows gets 0 (it never occurs there)."""
    counts = np.bincount(labels, minlength=n_classes)
    return [len(labels) / (n_classes * c) if c else 0.0 for c in counts.tolist()]


def check_cache(features_dir: Path, representation: str, settings: dict) -> None:
    """Refuse a feature cache of another representation, or built with other settings than the config's."""
    meta_path = features_dir / "features.json"
    if not meta_path.is_file():
        raise EsclabError(f"{meta_path} not found: build the feature cache with `dvc repro features`")
    meta = json.loads(meta_path.read_text())
    cached = meta.get("representation", "logmel")
    if cached != representation:
        raise EsclabError(f"{features_dir} holds {cached} features, but features.representation={representation}: "
                          "rebuild it with `dvc repro features`")
    built = BEFORE_WINDOWS | meta["settings"]
    changed = {k: (built.get(k), v) for k, v in settings.items() if k in built and built[k] != v}
    if changed:
        diff = ", ".join(f"features.{k}={now} (cache has {was})" for k, (was, now) in changed.items())
        raise EsclabError(f"{features_dir} was built with other settings: {diff}; rebuild it with `dvc repro features`")


def cache_array(features_dir: Path) -> Path:
    """The cache's array file: logmel.npy, or the one its features.json names (waveform.npy, embedding.npy)."""
    return features_dir / json.loads((features_dir / "features.json").read_text()).get("array", "logmel.npy")


class FoldData(L.LightningDataModule):
    """Train/validation/test loaders for one test fold of the cross-validation."""

    def __init__(self, features_dir: str | Path, *, test_fold: int, batch_size: int = 16, num_workers: int = 0,
                 val_fraction: float = 0.2, val_fold: int | None = None, normalize: str = "global", seed: int = 0,
                 resident: bool | str = "auto", sampler: str = "shuffle"):
        super().__init__()
        self.features_dir = Path(features_dir)
        self.test_fold, self.val_fold, self.val_fraction = test_fold, val_fold, val_fraction
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        if normalize not in ("global", "none"):
            raise EsclabError(f"train.normalize must be one of global, none; got {normalize!r}")
        if batch_size <= 0:
            raise EsclabError(f"train.batch_size must be a positive integer, got {batch_size}")
        if not (isinstance(resident, bool) or resident == "auto"):
            raise EsclabError(f"train.resident must be one of auto, true, false; got {resident!r}")
        if sampler not in SAMPLERS:
            raise EsclabError(f"train.sampler must be one of {', '.join(SAMPLERS)}; got {sampler!r}")
        self.normalize, self.resident, self.sampler = normalize, resident, sampler
        self._on_device: tuple[torch.Tensor, torch.Tensor] | None = None

    def setup(self, stage: str | None = None) -> None:
        self.index = pd.read_csv(self.features_dir / "index.csv")
        self.array = np.load(cache_array(self.features_dir), mmap_mode="r")
        folds = self.index["fold"].to_numpy()
        if self.test_fold not in set(folds):
            raise EsclabError(f"fold={self.test_fold} is not a fold of {self.features_dir}; "
                              f"choose one of {sorted(set(folds))}")
        self.test_rows = np.flatnonzero(folds == self.test_fold)
        self.train_rows, self.val_rows = self._carve_validation(np.flatnonzero(folds != self.test_fold))
        self.mean, self.std = self._statistics()

    def _carve_validation(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.val_fold is not None:
            if self.val_fold == self.test_fold:
                raise EsclabError(f"train.val_fold={self.val_fold} is the test fold; pick another fold or null")
            is_val = self.index["fold"].to_numpy()[rows] == self.val_fold
            return rows[~is_val], rows[is_val]
        if not 0 < self.val_fraction < 1:
            raise EsclabError(f"train.val_fraction must be between 0 and 1, got {self.val_fraction}")
        labels = self.index["label"].to_numpy()[rows]
        # One of n_splits folds is the validation share; a class needs a file in each of them (a file cut into
        # windows is many rows, but one group below: its windows stay on one side).
        files = self.index.loc[rows].drop_duplicates("filename")
        n_splits = min(round(1 / self.val_fraction), np.bincount(files["label"]).min())
        if n_splits < 2:
            raise EsclabError(f"a class has fewer than 2 training files outside fold {self.test_fold}, too few to "
                              "carve a validation set: set train.val_fold to a fold number instead")
        splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=self.seed)
        groups = self.index["src_file"].astype(str).to_numpy()[rows] + "/" + labels.astype(str)
        train, val = next(splitter.split(rows, labels, groups))
        return rows[np.sort(train)], rows[np.sort(val)]

    def _statistics(self) -> tuple[float, float]:
        """Mean and std of the training rows only, accumulated in float64 over chunks of the memmap."""
        if self.normalize == "none":
            return 0.0, 1.0
        total = total_sq = count = 0.0
        for start in range(0, len(self.train_rows), 256):
            chunk = self.array[self.train_rows[start:start + 256]].astype(np.float64)
            total, total_sq, count = total + chunk.sum(), total_sq + (chunk**2).sum(), count + chunk.size
        mean = total / count
        return float(mean), float(max(np.sqrt(total_sq / count - mean**2), 1e-5))

    @property
    def n_classes(self) -> int:
        return int(self.index["label"].max()) + 1

    @property
    def input_shape(self) -> tuple[int, int]:
        return tuple(self.array.shape[1:])

    @property
    def device(self) -> torch.device:
        """Where the attached trainer trains; the CPU when no trainer holds this data."""
        return self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")

    def resident_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every row of the cache, normalised as `CacheRows` does it, and every label, on `device`; loaded once.

        The float16 cache is read into memory as it is (torch refuses to wrap the read-only
        memory map) and widened on the device, which halves the copy.
        """
        device = self.device
        if self._on_device is None or self._on_device[0].device != device:
            self._on_device = None  # let the old copy go before the new one is made
            x = torch.from_numpy(np.array(self.array)).to(device).float()
            x.sub_(self.mean).div_(self.std)
            labels = torch.as_tensor(self.index["label"].to_numpy(copy=True), dtype=torch.int64, device=device)
            self._on_device = x.unsqueeze(1), labels
        return self._on_device

    @property
    def train_labels(self) -> np.ndarray:
        return self.index["label"].to_numpy()[self.train_rows]

    def resident_batches(self) -> bool:
        """`train.resident`: auto keeps the rows on a GPU that trains alone. Under DDP batches come from DataLoaders,
        which Lightning's distributed sampler shares out among the processes; resident rows would reach them all."""
        distributed = self.trainer is not None and self.trainer.world_size > 1
        if distributed and self.resident is True:
            raise EsclabError(f"train.resident=true keeps every row on each of {self.trainer.world_size} processes, "
                              "which would all train on all of them: set train.resident=auto (or false) under DDP")
        return self.resident is True or (self.resident == "auto" and self.device.type != "cpu" and not distributed)

    def _loader(self, rows: np.ndarray, shuffle: bool) -> DataLoader | ResidentBatches:
        sampler = None
        if shuffle and self.sampler == "balanced":
            sampler = EpochBalanced(self.index["label"].to_numpy()[rows], self.seed)
        elif shuffle:
            sampler = EpochShuffle(len(rows), self.seed)
        if self.resident_batches():
            return ResidentBatches(*self.resident_rows(), rows, self.batch_size, sampler)
        dataset = CacheRows(cache_array(self.features_dir), self.index["label"].to_numpy(), rows, self.mean, self.std)
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader | ResidentBatches:
        return self._loader(self.train_rows, shuffle=True)

    def val_dataloader(self) -> DataLoader | ResidentBatches:
        return self._loader(self.val_rows, shuffle=False)

    def test_dataloader(self) -> DataLoader | ResidentBatches:
        return self._loader(self.test_rows, shuffle=False)

    predict_dataloader = test_dataloader
