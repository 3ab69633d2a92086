"""Simulated federations on Flower's simulation engine, benchmarks and the CLI."""
