"""Test setup: 8 emulated CPU devices (before JAX initialises its backend) and shared fixtures."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
