"""Roundtable benchmarks: baselines, the suite as shipped, same-run ratios (`python -m bench run|smoke`)."""
