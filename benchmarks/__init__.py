"""Reproducible measurements (speed, accuracy) whose results are committed under ``benchmarks/results/``."""
