"""Orbax checkpoints, manifests, adapter-only saves, warm starts, the one model-source reader and the
export formats (exporting.py: train.export; serving.py: jax.export)."""
