"""esclab's OmegaConf resolvers; importing this module registers them.

A resolver must exist in every process that resolves a config using it. Hydra's
plugin scan imports `hydra_plugins.esclab_resolvers`, which imports this module, in
each process that composes conf/, DVC's included; a process that only receives a
composed config (a fold trained in a spawned process) imports it itself.
"""

from omegaconf import ListConfig, OmegaConf

# A holdout split (dataset.folder.split=holdout) is written as three "folds": its test part is the one test fold,
# its validation part the validation fold, the rest trains.
HOLDOUT_FOLDS = {"test": 1, "validation": 2, "training": 3}


def fold_numbers(n_folds, split: str = "kfold") -> ListConfig:
    """The test folds a dataset has, which dvc.yaml's train stage iterates over: [1, ..., n_folds], or a holdout
    split's one test part.

    A ListConfig, not a list: OmegaConf.resolve (how DVC writes params.yaml) can only put a container in place.
    """
    if split == "holdout":
        return OmegaConf.create([HOLDOUT_FOLDS["test"]])
    return OmegaConf.create(list(range(1, int(n_folds) + 1)))


def validation_fold(split: str = "kfold") -> int | None:
    """The fold a dataset sets aside for validation (a holdout split's validation part); None: carve it from the
    training folds."""
    return HOLDOUT_FOLDS["validation"] if split == "holdout" else None


OmegaConf.register_new_resolver("esclab.folds", fold_numbers, replace=True)
OmegaConf.register_new_resolver("esclab.val_fold", validation_fold, replace=True)
