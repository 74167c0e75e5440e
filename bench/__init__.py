"""Benchmarks: commands that print measurements (``python -m bench.<name>``), not tests."""
