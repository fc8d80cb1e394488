"""Kubernetes manifests for Roundtable, rendered from Python: base (manifests.py) × overlays (environments.py)."""
