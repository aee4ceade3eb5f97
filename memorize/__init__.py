"""memk.memorize: the science. GPT-2 (model.py), data with known entropy (data.py, markov.py,
corpus.py, sources.py), exact bits (bits.py), training (schedule.py, train.py), the sweep
layer every experiment runs through (sweep.py, store.py, runtime.py, options.py), and the
two experiments: capacity.py and generalization.py."""
