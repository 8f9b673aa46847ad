"""Benchmarks and the reliability harness; run each as a module from the repository root (``python -m bench.serving``)."""
