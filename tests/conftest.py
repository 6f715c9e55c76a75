"""Every test process sees 8 fake CPU devices: XLA reads the flag when jax first initialises."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
