import os

os.environ.setdefault("BENCH_QUIET", "1")
