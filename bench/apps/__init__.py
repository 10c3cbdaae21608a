"""The task definitions each system's worker imports; configured from BENCH_* variables."""
