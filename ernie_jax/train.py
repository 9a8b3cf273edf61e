"""`python -m ernie_jax.train [--config=NAME] [key=value ...]`: train (or resume) an ERNIE 4.5 model.

The command line lives here so that its name stays what users type; the trainer is `ernie_jax.training`.
From Python: `ernie_jax.train.train(cfg)` with a config from `ernie_jax.training.config.load_preset(NAME)`.
"""

from ernie_jax.training.loop import main, train  # noqa: F401 - train: the same run from Python

if __name__ == "__main__":
    raise SystemExit(main())
