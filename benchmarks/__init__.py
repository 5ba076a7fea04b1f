"""The benchmarks: scripts run from the repository root (`python benchmarks/NAME.py`); a package so they
share `benchmarks.report`."""
