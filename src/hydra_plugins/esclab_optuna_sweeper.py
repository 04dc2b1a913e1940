"""hydra-optuna-sweeper's sweeper, made resumable: `hydra/sweeper=esclab_optuna` (conf/hydra/sweeper/).

Two changes to hydra-optuna-sweeper 1.3.0, whose sweep loop it otherwise runs as it is:

- `n_trials` is the number of completed trials the study should have, as the plugin's
  own config documents it ("total number of function evaluations"), not the number to
  run in this invocation, which is what the plugin does. Rerunning a command therefore
  resumes its study from the storage: a sweep stopped after 7 of 20 trials runs the 13
  missing ones, a finished one runs none, and a higher `n_trials` runs only the new ones.
  Failed trials, and trials left RUNNING by a killed sweep, do not count.
- Each trial's overrides carry `tracking.trial=<Optuna trial number>`, so the trial's
  MLflow run and output folder are named for the trial Optuna records.

It subclasses the plugin's implementation class (`_impl`), which the pinned version fixes.
"""

import logging
from pathlib import Path

import optuna

from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl

log = logging.getLogger(__name__)

TRIAL_KEY = "tracking.trial"


def completed_trials(storage: str | None, study_name: str | None) -> int:
    """How many trials of the stored study completed (0 for a new study, or one kept in memory)."""
    if storage is None or study_name not in optuna.get_all_study_names(storage):
        return 0
    study = optuna.load_study(study_name=study_name, storage=storage)
    return len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))


class ResumableOptunaSweeper(OptunaSweeperImpl):
    def sweep(self, arguments: list[str]) -> None:
        done = completed_trials(self.storage, self.study_name)
        wanted, self.n_trials = self.n_trials, max(0, self.n_trials - done)
        log.info("Study %s has %d of %d completed trials: running %d", self.study_name, done, wanted, self.n_trials)
        # The sweeper writes optimization_results.yaml there, also when no trial (so no launcher) ran.
        Path(self.config.hydra.sweep.dir).mkdir(parents=True, exist_ok=True)
        super().sweep(arguments)

    def _configure_trials(self, trials, search_space_distributions, fixed_params):
        overrides = super()._configure_trials(trials, search_space_distributions, fixed_params)
        return [(*trial_overrides, f"{TRIAL_KEY}={trial.number}") for trial, trial_overrides in zip(trials, overrides)]
