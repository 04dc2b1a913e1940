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


def local_source(source_dir: str | None, archive: str | None, stand_in: str) -> str:
    """What the download stage reads from this machine, for DVC to hash (dvc.yaml's download deps): the local folder
    or archive the dataset comes from, else `stand_in`, a file the stage already depends on (DVC needs a path; a
    downloaded archive's content is pinned by dataset.sha256, a synthetic one's by dataset.synthetic)."""
    return source_dir or archive or stand_in


def system_name(model: str, backbones, checkpoint: str | None) -> str:
    """What a cross-validation trains, for run and registry names: the learner after the frozen backbones it reads
    (yamnet_aisfx_ffn), a fine-tuned checkpoint (wav2vec2-base-finetuned), or the learner alone (cnn4)."""
    if checkpoint:
        return str(checkpoint).rstrip("/").rsplit("/", 1)[-1] + "-finetuned"
    return "_".join([*(backbones or []), model])


OmegaConf.register_new_resolver("esclab.folds", fold_numbers, replace=True)
OmegaConf.register_new_resolver("esclab.val_fold", validation_fold, replace=True)
OmegaConf.register_new_resolver("esclab.source", local_source, replace=True)
OmegaConf.register_new_resolver("esclab.system", system_name, replace=True)
