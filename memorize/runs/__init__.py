"""memk.memorize.runs: the machinery that executes a plan of runs. Contract: an experiment hands an
executor its `Run`s (sweep.py) and a `Workload`; the executor packs those the `RunStore` (store.py)
says are unfinished (packing.py: alone, or stacked in ensembles), places each job in this process,
one after another or side by side (ensemble_executor.py, workers.py), or as a Ray task (ray_executor.py,
ray_watchdog.py), and records each run's row as it finishes. launchers.py builds the executor the
command line asks for. It knows nothing of any experiment."""
