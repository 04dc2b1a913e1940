"""Registers esclab's OmegaConf resolvers wherever conf/ is composed.

A resolver must exist before a config that uses it is resolved, and conf/ is
composed in processes esclab does not start: `dvc exp run` composes it inside
DVC. Hydra imports every module of the `hydra_plugins` namespace package before
it composes anything (DVC's composition included), so importing esclab.resolvers
here reaches all of them: `python train.py`, the `esclab` stages, `python -m
esclab.params` and `dvc exp run -S dataset.n_folds=10`.
"""

import esclab.resolvers  # noqa: F401  (registers on import)
