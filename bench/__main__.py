"""``python -m bench``: run the benchmarks (see bench/run.py for the options)."""

import sys

from bench.run import main

# Guarded: client processes are spawned, and spawning re-imports the main module.
if __name__ == "__main__":
    sys.exit(main())
