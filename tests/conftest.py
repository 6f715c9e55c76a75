"""Every test process sees 8 fake CPU devices and only the CPU backend: XLA reads the flag when jax
first initialises, and an installed libtpu (the TPU plan tests) must not probe for a TPU."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
