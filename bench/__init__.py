"""Benchmarks, a script each by what it measures (bench/common.py lists them): python -m bench.NAME."""
