"""Benchmarks: run from the checkout's root as `python -m benchmarks.NAME`; each prints a table
with a peer measured in the same run."""
