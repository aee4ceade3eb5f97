"""The one place that builds an executor from what the command line asks for (--executor,
--ensemble, --workers, and Ray's options); an experiment's command calls it once, after its one
validation, and hands the executor its runs."""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .ensemble_executor import EnsembleExecutor
from .packing import EnsembleChoice, read_ensemble
from .ray_executor import ray_executor
from .sweep import LocalExecutor
from .workers import check_workers


def executor_from_options(name: str, device: torch.device, ensemble: EnsembleChoice | str | int,
                          ray_address: str | None = None, gpus_per_task: float | None = None,
                          cpus_per_task: int | None = None, workers: str | int = "auto"):
    """The executor the command line asks for: --executor local (the local or the ensemble executor,
    `workers` jobs at once) or --executor ray (where --cpus-per-task, not --workers, says how runs share CPUs).
    `ensemble` is --ensemble's EnsembleChoice (packing.read_ensemble), or the option itself."""
    if name == "local":
        given = [flag for flag, value in (("--ray-address", ray_address), ("--gpus-per-task", gpus_per_task),
                                          ("--cpus-per-task", cpus_per_task)) if value is not None]
        if given:
            raise ConfigError(f"{', '.join(given)} is for --executor ray; add --executor ray or leave it out")
        check_workers(workers, device)  # now, before the output folder is touched
        return executor_for(ensemble, device, workers)
    if workers != "auto":
        raise ConfigError("--workers is for --executor local: on Ray, tasks run side by side as the cluster's "
                          "CPUs allow (--cpus-per-task); leave --workers out")
    return ray_executor(device, ray_address, gpus_per_task, 1 if cpus_per_task is None else cpus_per_task,
                        read_ensemble(ensemble))


def executor_for(choice: EnsembleChoice | str | int, device: torch.device, workers: str | int = 1):
    """The local executor --ensemble and --workers ask for: LocalExecutor for off, else the ensemble executor."""
    choice = read_ensemble(choice)
    if choice.off:
        return LocalExecutor(device, workers)
    return EnsembleExecutor(device, max_members=choice.max_members, choose_faster=choice.choose_faster,
                            workers=workers)
