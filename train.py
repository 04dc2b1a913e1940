"""Train cnn4 (or any registered model) with cross-validation over ESC-50's folds.

    python train.py                                  # all five folds, then pooled metrics in reports/
    python train.py fold=3 lr=3e-4 trainer.max_epochs=5
    python train.py -m lr=1e-3,3e-4                  # a Hydra multirun sweep
    python train.py --config-dir . --config-name params fold=2   # what `dvc repro` runs
    python train.py -m hparams_search=cnn4_optuna    # an Optuna search, trials as separate processes

Every run lands in MLflow (`mlflow ui --backend-store-uri sqlite:///mlflow.db`).
"""

import hydra
from omegaconf import DictConfig

from esclab.cli import run_reporting_errors
from esclab.logs import silence_known_noise


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    """Returns the validation score (esclab.training.run.validation_score): a sweeper's objective; a single run
    ignores it."""
    from esclab.training.run import train  # here, not above: a sweep's own process never trains, nor imports Lightning

    return run_reporting_errors(train, cfg)


if __name__ == "__main__":
    silence_known_noise()  # in a sweep's own process too, which sets up the sweeper before any trial starts
    main()
