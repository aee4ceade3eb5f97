"""memk.memorize.experiments: the two experiments as plans of runs. Contract: each validates its
options, plans its runs, hands them to an executor (memk.memorize.runs) and summarizes the rows:
capacity.py (bits per parameter on uniform data), generalization.py with reference.py and
generalization_summary.py (memorization against generalization on real or Markov data),
options.py (presets and shared checks), plots.py, dry_run.py (the plan and its time, untrained)."""
