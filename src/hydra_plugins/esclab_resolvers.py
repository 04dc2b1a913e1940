"""esclab's OmegaConf resolvers, registered wherever conf/ is composed.

A resolver must exist before a config that uses it is resolved, and conf/ is
composed in processes esclab does not start: `dvc exp run` composes it inside
DVC. Hydra imports every module of the `hydra_plugins` namespace package before
it composes anything (DVC's composition included), so registering here reaches
all of them: `python train.py`, the `esclab` stages, `python -m esclab.params`
and `dvc exp run -S dataset.n_folds=10`.
"""

from omegaconf import ListConfig, OmegaConf


def fold_numbers(n_folds) -> ListConfig:
    """[1, ..., n_folds]: the folds a dataset has, which dvc.yaml's train stage iterates over.

    A ListConfig, not a list: OmegaConf.resolve (how DVC writes params.yaml) can only put a container in place.
    """
    return OmegaConf.create(list(range(1, int(n_folds) + 1)))


OmegaConf.register_new_resolver("esclab.folds", fold_numbers, replace=True)
