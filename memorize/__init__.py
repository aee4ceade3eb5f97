"""memk.memorize: the science, in a foundation and three rooms.

The foundation (this folder): GPT-2 and its stacked ensemble (model.py, ensemble.py), data with
known entropy (data.py, markov.py, corpus.py, sources.py), exact bits (bits.py), the membership
attack and F1 law (membership.py), training (precision.py, schedule.py, train.py), and what all
share (runtime.py: device, backends, threads, progress; outputs.py; errors.py; constants.py).
The rooms import the foundation and, in this order only, each other:
runs/ (how a plan of runs executes) <- experiments/ (capacity, generalization) <- audit/.
"""
