"""`python -m memk.cli ...` runs the `memk` command."""

from .main import main

main()
