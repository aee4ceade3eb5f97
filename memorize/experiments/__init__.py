"""memk.memorize.experiments: the two experiments as plans of runs. Contract: each builds its
experiment from a preset and the command line's typed knobs (knobs.py), validates it once, plans its
runs, hands them to an executor (memk.memorize.runs) and summarizes the rows: capacity.py (bits per
parameter on uniform data), generalization.py with generalization_experiment.py (its definition and
presets), reference.py and generalization_summary.py (memorization against generalization on real or
Markov data), options.py (the shared readings and checks), plots.py, dry_run.py (the plan and its
time, untrained)."""
