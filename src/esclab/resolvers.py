"""esclab's OmegaConf resolvers; importing this module registers them.

A resolver must exist in every process that resolves a config using it. Hydra's
plugin scan imports `hydra_plugins.esclab_resolvers`, which imports this module, in
each process that composes conf/, DVC's included; a process that only receives a
composed config (a fold trained in a spawned process) imports it itself.
"""

from omegaconf import ListConfig, OmegaConf


def fold_numbers(n_folds) -> ListConfig:
    """[1, ..., n_folds]: the folds a dataset has, which dvc.yaml's train stage iterates over.

    A ListConfig, not a list: OmegaConf.resolve (how DVC writes params.yaml) can only put a container in place.
    """
    return OmegaConf.create(list(range(1, int(n_folds) + 1)))


OmegaConf.register_new_resolver("esclab.folds", fold_numbers, replace=True)
