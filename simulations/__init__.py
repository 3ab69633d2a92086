"""Simulated federations with ground truth: `fedshift simulate`, scenarios, studies, benchmarks."""
