"""Benchmarks: `python -m benchmarks.NAME [--quick] --json` prints one JSON object."""
