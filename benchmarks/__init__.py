"""Benchmarks: the ``ftmpi-run bench`` suites, the programs they launch, and older scripts."""
