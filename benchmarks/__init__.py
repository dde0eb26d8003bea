"""Benchmarks: `python -m benchmarks.attention` (tables) and the pytest-benchmark suite."""
