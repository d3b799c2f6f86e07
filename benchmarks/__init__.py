"""Speed and memory benchmarks: ``python -m benchmarks.run`` (see run.py)."""

from loratune.cli import openmp_defaults

# Runs before run.py imports torch, so `python -m benchmarks.run` measures what the loratune CLI runs.
openmp_defaults()
