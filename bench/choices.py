"""The names `memk bench`'s options choose among, kept free of torch so that `memk bench --help`
imports none of it (cli.py imports the suites only once the command runs).

case.py's TORCH_DTYPES maps these dtype names to torch dtypes; cases.py builds the suites
and presets named here (tests/test_bench.py checks that the two agree).
"""

SUITES = ("logprob", "attention", "train", "bits")
DTYPE_NAMES = ("float32", "tf32", "bfloat16", "float16")  # tf32: float32 tensors, TF32 matmuls (train, CUDA)

# What each preset selects, for --help.
PRESETS = {
    "default": "every suite's sweep of sizes for the device",
    "acceptance": "the cases of the GPU acceptance run (bench/gpu_acceptance.sh; docs/gpu.md): cross-entropy at "
                  "N 131,072, V 2048, attention at seq 64 and 1024, training steps of the paper's 1x64 and 2x128 "
                  "models, 1-32 runs of the 1x64 model as one ensemble; with --quick, the same cases at CPU sizes",
}
