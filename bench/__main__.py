import sys

from bench.cli import main

if __name__ == "__main__":  # not when a spawned worker (bench.jobs) imports the main module
    sys.exit(main())
