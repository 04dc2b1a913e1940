"""The Lightning classifier: any registered network, cross-entropy on logits, per-epoch metrics.

Its hyper-parameters are plain dicts saved in every checkpoint, so a checkpoint
alone rebuilds the exact model (`Classifier.load_from_checkpoint(path)`).
Training batches are augmented (training/augment.py) inside `training_step` only,
and trained against probability targets, so mixup's soft targets and label
smoothing combine in one cross-entropy, weighted per class with `train.class_weights`;
validation keeps the plain loss, comparable across recipes. Under DDP the losses are
averaged over the processes (sync_dist); the accuracies are torchmetrics, which gather their counts themselves.
"""

import lightning as L
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torchmetrics.classification import MulticlassAccuracy

from esclab.errors import EsclabError
from esclab.models import build_model, model_settings
from esclab.training.augment import Augment


class Classifier(L.LightningModule):
    """`feature_std` is the training split's log-mel std in dB (FoldData.std): augment.gain's unit.
    `preprocessing` is what a prediction must do to audio before this network sees it (serving/preprocessing.py),
    kept in the checkpoint's hyper-parameters; its `representation` (what the feature cache holds: logmel, waveform
    or embedding; log-mel when absent) decides how augmentations act. `class_weights` weigh each class's term of the
    training loss (training/data.py's balanced_class_weights); None weighs them all 1. `identity` is the run that
    trains it (training/run.py's stamp), kept so that serving never averages the folds of different runs."""

    def __init__(self, *, model: dict, n_classes: int, input_shape: tuple[int, int], optimizer: dict,
                 scheduler: dict | None = None, augment: dict | None = None, label_smoothing: float = 0.0,
                 feature_std: float = 1.0, preprocessing: dict | None = None, class_weights: list[float] | None = None,
                 identity: dict | None = None):
        super().__init__()
        # Into the checkpoint only: the Tracker already logs the whole config to the fold's run, and Lightning's
        # copy would add every model/optimizer/augment key a second time, spelt with '/'.
        self.save_hyperparameters(logger=False)
        layers = model_settings(model)
        self.model = build_model(model["name"], n_classes=n_classes, input_shape=tuple(input_shape), **layers)
        # A network built from files that may be gone when this checkpoint is loaded (a pretrained model's folder)
        # names the constructor arguments that rebuild it without them (models/pretrained.py).
        self.hparams.model = model | getattr(self.model, "self_contained", {})
        self.augment = Augment(augment or {}, std=feature_std,
                               representation=(preprocessing or {}).get("representation", "logmel"))
        self.train_acc = MulticlassAccuracy(n_classes, average="micro")
        self.val_acc = MulticlassAccuracy(n_classes, average="micro")
        self.val_balanced_acc = MulticlassAccuracy(n_classes, average="macro")  # the mean of per-class recalls
        # Not in the state dict: the checkpoint's hyper-parameters already hold them.
        self.register_buffer("class_weights", torch.tensor(class_weights) if class_weights else None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        x, targets = self.augment(x, F.one_hot(y, self.hparams.n_classes).to(x.dtype))
        logits = self(x)
        # torch smooths probability targets as (1 - e) * targets + e / n_classes: mixup first, then smoothing.
        loss = F.cross_entropy(logits, targets, weight=self.class_weights, label_smoothing=self.hparams.label_smoothing)
        self.train_acc(logits, targets.argmax(dim=1))  # a mixed clip counts as its larger share's class
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y, _ = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.val_balanced_acc(logits, y)
        self.log("val/loss", F.cross_entropy(logits, y), on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
        self.log("val/acc", self.val_acc, on_step=False, on_epoch=True, prog_bar=True)
        self.log("val/balanced_acc", self.val_balanced_acc, on_step=False, on_epoch=True)

    def predict_step(self, batch, batch_idx):
        """Softmax probabilities (only here: training works on logits) with each clip's row."""
        x, _, rows = batch
        return rows, torch.softmax(self(x).float(), dim=1)

    def configure_optimizers(self):
        """The optimizer, and the scheduler stepped per `scheduler.interval`: epoch (when absent) or step.

        A per-step scheduler is built with `total_steps`, the optimizer steps of the whole run.
        """
        # A network may train its parts at different rates (a pretrained backbone slower than its new head): its
        # `parameter_groups`, each group without an "lr" at the optimizer's.
        groups = getattr(self.model, "parameter_groups", self.parameters)()
        optimizer = instantiate(self.hparams.optimizer)(groups)
        if not self.hparams.scheduler:
            return optimizer
        settings = dict(self.hparams.scheduler)
        interval = settings.pop("interval", "epoch")
        if interval == "epoch":
            scheduler = instantiate(settings)(optimizer)
        elif interval == "step":
            scheduler = instantiate(settings)(optimizer, total_steps=self.trainer.estimated_stepping_batches)
        else:
            raise EsclabError(f"scheduler.interval must be one of epoch, step; got {interval!r}")
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}
