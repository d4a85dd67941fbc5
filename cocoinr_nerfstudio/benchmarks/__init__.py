"""Benchmarks that drive the real nerfstudio CLI and pipeline (``scripts/benchmark_*.py`` are thin wrappers)."""
