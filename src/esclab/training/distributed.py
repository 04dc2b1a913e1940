"""Several processes on one fold (DDP), and the folds of a cross-validation spread over one machine's GPUs.

With `trainer=ddp` every process runs the whole of `train(cfg)`: Lightning's
`ddp` strategy starts `python train.py <the same overrides>` once more per further
device when the first fit begins, and torchrun or SLURM start them all at once.
Every process decides which folds to train from the same files, so all iterate
the same folds in the same order, and each fit waits for all of them. Global rank
zero alone writes: MLflow runs, metrics and models, checkpoints, reports. The
other processes train their share of each batch and predict their share of the
test fold, which rank zero gathers.
"""

import os

import lightning as L
import numpy as np
import torch
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher

from esclab.errors import EsclabError

# What a launcher sets in the processes it starts: torchrun RANK, SLURM SLURM_PROCID, Lightning's ddp launcher
# LOCAL_RANK and NODE_RANK (both also where a node is started by hand). A process none of them started is rank zero.
RANK_VARIABLES = ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK")


def is_rank_zero() -> bool:
    """Whether this process is global rank zero, known before any process group exists (Tracker, resume point)."""
    return all(os.environ.get(name, "0") == "0" for name in RANK_VARIABLES)


def launched_together() -> bool:
    """Whether torchrun or SLURM started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1"))) > 1


def check_launch(trainer: L.Trainer) -> None:
    """Refuse a multi-process fit that the cross-validation loop around it cannot follow.

    `ddp_spawn`, `ddp_fork` and `ddp_notebook` start processes that run the fit
    alone: the epoch history and the predictions would stay in them. `ddp` starts
    the command line again, which is right for `python train.py` (Lightning passes
    Hydra's overrides on) and needless under torchrun/SLURM, but would rerun pytest
    or a notebook that called `train(cfg)`, and a Hydra multirun from its first job.
    """
    if trainer.world_size == 1:
        return
    strategy = type(trainer.strategy).__name__
    if not isinstance(trainer.strategy.launcher, _SubprocessScriptLauncher):
        raise EsclabError(f"{strategy} starts its processes inside fit, where the fold's history and predictions "
                          "cannot reach train(): use trainer.strategy=ddp (trainer=ddp)")
    if trainer.strategy.cluster_environment.creates_processes_externally:
        return
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        raise EsclabError(f"trainer.devices={trainer.num_devices} with {strategy} starts this command again once per "
                          "device: run it as `python train.py ...` (or under torchrun), not from inside Python")
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        raise EsclabError("a Hydra multirun (-m) cannot start ddp processes: run each value as its own "
                          "`python train.py ...`, or launch the sweep under torchrun")


def check_parallel_folds(processes: int, devices, num_nodes: int) -> None:
    """`train.parallel_folds` trains each fold on one device; a fold over several devices is trainer=ddp's job."""
    if processes > 1 and (devices != 1 or num_nodes != 1 or launched_together()):
        raise EsclabError(f"train.parallel_folds={processes} trains each fold in its own process on one device: set "
                          "trainer.devices=1 (folds spread over the GPUs) or train.parallel_folds=1 (each fold over "
                          "trainer.devices, as trainer=ddp does), and start it as one `python train.py`")


def every_row_once(trainer: L.Trainer, rows: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """The test fold's predictions of all processes on rank zero, one per row, in row order; None elsewhere.

    Lightning gives each process a disjoint share of the rows to predict (its
    distributed sampler repeats rows only while fitting, to even out the batches).
    """
    if trainer.world_size > 1:
        shares = [None] * trainer.world_size
        torch.distributed.all_gather_object(shares, (rows, probs))
        rows, probs = np.concatenate([r for r, _ in shares]), np.concatenate([p for _, p in shares])
    if not trainer.is_global_zero:
        return None
    rows, first = np.unique(rows, return_index=True)
    return rows, probs[first]


def effective_batch_size(trainer: L.Trainer, batch_size: int) -> int:
    """Clips per optimizer step: train.batch_size x processes (devices x nodes) x trainer.accumulate_grad_batches."""
    return batch_size * trainer.world_size * trainer.accumulate_grad_batches


GPU_ACCELERATORS = ("auto", "gpu", "cuda")


def visible_gpus() -> list[str]:
    """The GPUs this process may use, named as CUDA_VISIBLE_DEVICES names them (an index, a UUID or a MIG id)."""
    count = torch.cuda.device_count()
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    names = [name.strip() for name in listed.split(",")] if listed else [str(i) for i in range(count)]
    return names[:count]


def device_slots(accelerator: str, processes: int, gpus: list[str]) -> list[str]:
    """The GPU each of `processes` concurrent fold processes holds: the GPUs in turn, so that with more processes
    than GPUs each GPU trains as many folds at a time as the others, give or take one. None on a CPU."""
    if accelerator not in GPU_ACCELERATORS or not gpus:
        return []
    return [gpus[i % len(gpus)] for i in range(processes)]
