"""memk.bench: benchmark cases shared by `memk bench` and pytest-benchmark."""
