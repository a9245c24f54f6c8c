"""Test setup: 8 fake CPU devices for the sharding tests.

XLA reads the flag when jax starts, so it must be set before any test module
imports jax. Unsharded computations still run on one device.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
