"""Per-epoch training curves, kept in the run's own files (reports/folds/<k>/history.csv)."""

import lightning as L
import pandas as pd

COLUMNS = ["train/loss", "train/acc", "val/loss", "val/acc", "val/balanced_acc"]


class EpochHistory(L.Callback):
    """One row per epoch: the epoch's metrics and the learning rate it trained with."""

    def __init__(self):
        self.rows: list[dict] = []
        self._lr = float("nan")

    def on_train_epoch_start(self, trainer, pl_module):
        self._lr = trainer.optimizers[0].param_groups[0]["lr"]

    def on_train_epoch_end(self, trainer, pl_module):
        # Lightning runs the epoch's validation before this hook, so val/* are this epoch's.
        metrics = trainer.callback_metrics
        row = {"epoch": trainer.current_epoch} | {k: float(metrics[k]) for k in COLUMNS if k in metrics}
        self.rows.append(row | {"lr": self._lr})

    def state_dict(self) -> dict:
        """Saved in every checkpoint, so a resumed fold's history.csv still starts at epoch 0."""
        return {"rows": self.rows}

    def load_state_dict(self, state_dict: dict) -> None:
        self.rows = list(state_dict["rows"])

    def table(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=["epoch", *COLUMNS, "lr"])
