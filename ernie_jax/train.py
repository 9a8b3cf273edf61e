"""`python -m ernie_jax.train [--config=NAME] [key=value ...]`: train (or resume) an ERNIE 4.5 model.

The command line lives here so that its name stays what users type; the trainer is `ernie_jax.training`.
"""

from ernie_jax.training.loop import main

if __name__ == "__main__":
    raise SystemExit(main())
