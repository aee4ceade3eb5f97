"""Names and numbers the command line needs before torch is imported (memk --help stays fast)."""

# Training precisions (memorize/precision.py): float32; bfloat16 weights and optimizer state (the
# paper's); bfloat16 autocast over float32 weights (memk's "bfloat16" before 2026-12).
PRECISIONS = ("float32", "bfloat16", "bfloat16-autocast")
BOTH_PRECISIONS = ("float32", "bfloat16")  # --precision both: the paper's two
SOURCES = ("text", "markov")  # run-generalization's data: a corpus, or a Markov chain with exact entropy

# Morris et al. 2025: GPT-family models store about 3.6 bits per parameter; 3.51 trained in
# bfloat16, 3.83 in float32.
PAPER_ALPHA = 3.6
PAPER_ALPHA_BY_PRECISION = {"bfloat16": 3.51, "float32": 3.83}
