"""Measuring results: the budget curve, the reproduce table, deployment and training benchmarks."""
