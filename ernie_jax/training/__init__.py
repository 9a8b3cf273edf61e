"""Training: run config (`config.py`), the train state (`state.py`), losses, the functional step, optimizer,
checkpointing, metrics and the run loop (`loop.py`, behind `python -m ernie_jax.train`)."""
