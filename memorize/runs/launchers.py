"""The one place that builds an executor from what the command line asks for (--executor,
--ensemble, --workers, and Ray's options): experiments receive an executor and never build one."""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .ensemble_executor import EnsembleExecutor
from .ray_executor import ray_executor
from .sweep import LocalExecutor
from .workers import check_workers


def executor_from_options(name: str, device: torch.device, ensemble: str | int, ray_address: str | None = None,
                          gpus_per_task: float | None = None, cpus_per_task: int | None = None,
                          workers: str | int = "auto"):
    """The executor the command line asks for: --executor local (the local or the ensemble executor,
    `workers` jobs at once) or --executor ray (where --cpus-per-task, not --workers, says how runs share CPUs)."""
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
    return ray_executor(device, ray_address, gpus_per_task, 1 if cpus_per_task is None else cpus_per_task, ensemble)


def executor_for(choice: str | int, device: torch.device, workers: str | int = 1):
    """The executor --ensemble and --workers ask for: the local executor for 'off'."""
    if choice == "off":
        return LocalExecutor(device, workers)
    if choice == "auto":
        return EnsembleExecutor(device, choose_faster=True, workers=workers)
    return EnsembleExecutor(device, max_members=int(choice), workers=workers)
