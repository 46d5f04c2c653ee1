"""Benchmarks: one command per measurement, each printing a markdown table (BENCHMARKS.md).

Run from the repository root as modules, e.g. `python -m benchmarks.train_step`.
"""
