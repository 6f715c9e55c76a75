"""Orbax checkpoints, manifests, adapter-only saves, warm starts and the one model-source reader."""
