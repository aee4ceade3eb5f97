"""memk.cli: the `memk` command, above the packages it drives (memk.memorize, memk.bench)."""
