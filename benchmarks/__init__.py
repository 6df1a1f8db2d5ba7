"""Benchmarks of the unif2ace kernels and model (run `python -m benchmarks`)."""
