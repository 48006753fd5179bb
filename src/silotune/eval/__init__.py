"""Evaluation: metrics shared by the trainers, benchmarks and the CLI."""
