"""Hyper-parameter search (issue 16): `python train.py -m hparams_search=cnn4_optuna` for real, its trials run by
submitit's local launcher as separate processes, scored on validation rows only, nested in MLflow, resumable."""

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from conftest import REPO, printed_warnings, tiny_overrides
from mlflow import MlflowClient
from mlflow.entities import Run

from esclab.errors import EsclabError
from esclab.tracking import StudyRun

STUDY = "cnn4_optuna"


def sweep(tiny_data: dict[str, Path], out: Path, n_trials: int, n_jobs: int) -> int:
    """The search on the tiny data's fold 1 (one epoch of a small cnn4), run from `out`; the sweep's own PID."""
    overrides = [o for o in tiny_overrides(tiny_data, out, "fold=1", "trainer.max_epochs=1", "tracking.log_model=false",
                                           "model.channels=[8,16]", "model.fc_dim=32")
                 # each trial writes in its own folder; the sweeper draws lr and the batch size
                 if not o.startswith(("paths.models", "paths.reports", "lr=", "train.batch_size="))]
    command = [sys.executable, str(REPO / "train.py"), "-m", f"hparams_search={STUDY}", *overrides,
               f"hydra.sweeper.n_trials={n_trials}", f"hydra.sweeper.n_jobs={n_jobs}"]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    process = subprocess.Popen(command, cwd=out, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-4000:]
    assert printed_warnings(output) == []  # the sweep's own log is quiet too (esclab/logs.py)
    return process.pid


def jobs(out: Path) -> dict[str, tuple[str, str]]:
    """submitit's job folders (named by the job's process id): when each job started and ended, as its log says."""
    def stamp(log: list[str], event: str) -> str:  # submitit INFO (2026-11-24 18:58:02,799) - Starting with ...
        return next(line for line in log if event in line).split("(")[1].split(")")[0]

    logs = {f.name: (f / f"{f.name}_0_log.out").read_text().splitlines()
            for f in (out / "sweeps" / STUDY / ".submitit").iterdir() if f.name.isdigit()}
    return {pid: (stamp(log, "Starting"), stamp(log, "Job completed successfully")) for pid, log in logs.items()}


def trial_runs(client: MlflowClient) -> tuple[Run, dict[int, Run]]:
    """The study's run, and its children (each trial's cross-validation run) by trial number."""
    experiment = client.get_experiment_by_name("esclab").experiment_id
    study = client.search_runs([experiment], f"tags.`esclab.study` = '{STUDY}' and tags.`esclab.trial` = 'all'")
    assert len(study) == 1  # one study run, though two trials started at once
    children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{study[0].info.run_id}'")
    return study[0], {int(run.data.tags["esclab.trial"]): run for run in children}


def test_a_local_submitit_sweep_of_optuna_trials_resumes_its_study(tiny_data, tmp_path):
    sweeper_pid = sweep(tiny_data, tmp_path, n_trials=2, n_jobs=2)

    # Two trials, each a process of its own (not the sweep's), running at the same time.
    first_jobs = jobs(tmp_path)
    assert len(first_jobs) == 2 and str(sweeper_pid) not in first_jobs
    assert max(start for start, _ in first_jobs.values()) < min(end for _, end in first_jobs.values())

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    trials = optuna.load_study(study_name=STUDY, storage=storage).trials
    assert [(t.number, t.state) for t in trials] == [(n, optuna.trial.TrialState.COMPLETE) for n in (0, 1)]

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    study_run, runs = trial_runs(client)
    assert sorted(runs) == [0, 1] and study_run.info.status == "FINISHED"
    assert study_run.data.params["search.lr"] == "tag(log, interval(1e-5, 3e-3))"
    for trial in trials:
        run = runs[trial.number]
        assert float(run.data.params["lr"]) == trial.params["lr"]
        (fold,) = client.search_runs([run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")
        # The objective is fold 1's best validation accuracy, as Lightning logged it per epoch; not its test accuracy.
        val_acc = [m.value for m in client.get_metric_history(fold.info.run_id, "val/acc")]
        assert trial.value == max(val_acc) == fold.data.metrics["val/acc_best"]
        assert (tmp_path / "sweeps" / STUDY / f"trial_{trial.number}" / "models" / "fold_1.ckpt").is_file()
    assert study_run.data.metrics["best_value"] == max(t.value for t in trials)

    # The same command with n_trials=3 resumes the study: the two trials are kept, one more runs.
    sweep(tiny_data, tmp_path, n_trials=3, n_jobs=1)
    resumed = optuna.load_study(study_name=STUDY, storage=storage).trials
    assert [t.number for t in resumed] == [0, 1, 2] and {t.state for t in resumed} == {optuna.trial.TrialState.COMPLETE}
    assert [(t.value, t.datetime_complete) for t in resumed[:2]] == [(t.value, t.datetime_complete) for t in trials]
    assert len(jobs(tmp_path)) == 3
    same_study_run, runs = trial_runs(client)
    assert same_study_run.info.run_id == study_run.info.run_id and sorted(runs) == [0, 1, 2]


def test_only_completed_trials_count_towards_n_trials(tmp_path):
    from hydra_plugins.esclab_optuna_sweeper import completed_trials

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    assert completed_trials(storage, STUDY) == 0  # no study yet
    study = optuna.create_study(study_name=STUDY, storage=storage)
    study.tell(study.ask(), 0.5)
    study.tell(study.ask(), 0.7)
    study.tell(study.ask(), state=optuna.trial.TrialState.FAIL)
    study.ask()  # left RUNNING, as by a killed sweep
    assert completed_trials(storage, STUDY) == 2


def test_a_direction_that_seeks_the_worst_monitor_is_refused_before_any_trial():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", [f"hparams_search={STUDY}", "train.monitor=val/loss"], return_hydra_config=True)
    with pytest.raises(EsclabError, match="train.monitor=val/loss: set hydra.sweeper.direction=minimize"):
        StudyRun().on_multirun_start(cfg)
