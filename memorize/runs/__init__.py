"""memk.memorize.runs: the machinery that executes a plan of runs. Contract: an experiment hands an
executor its `Run`s (sweep.py) and a `Workload`; the executor trains those the `RunStore` (store.py)
says are unfinished, alone, stacked in ensembles (ensemble_executor.py, ensemble_probe.py), side by
side (workers.py) or as Ray tasks (ray_executor.py, ray_watchdog.py), and records each run's row as
it finishes. It knows nothing of any experiment."""
