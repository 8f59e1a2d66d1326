"""Benchmarks (`python -m benchmarks ...`, `make bench`): numbers and ratios against a
baseline measured in the same run. Speed goals live here, not in timed tests."""
