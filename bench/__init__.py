"""Benchmark suite for cached: ``python -m bench [--quick]`` (see bench/README.md)."""
