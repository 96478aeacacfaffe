"""Entry point for `python -m bench`: parses options and runs the benchmark (see bench/README.md)."""

import sys

from bench.cli import main

sys.exit(main())
