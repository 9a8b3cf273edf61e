"""Test setup: 8 emulated CPU devices (before JAX initialises its backend) and shared fixtures."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
# libtpu takes a per-host lock; the TPU AOT tests only compile, so several processes may load it at once.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)


import logging  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture
def project_logs(caplog):
    """caplog that also sees the project's loggers, which stop propagating once an entry point set up logging."""
    from ernie_jax.console import PROJECT_LOGGERS

    loggers = [logging.getLogger(name) for name in PROJECT_LOGGERS]
    before = [logger.propagate for logger in loggers]
    for logger in loggers:
        logger.propagate = True
    caplog.set_level(logging.INFO)
    yield caplog
    for logger, propagate in zip(loggers, before, strict=True):
        logger.propagate = propagate
