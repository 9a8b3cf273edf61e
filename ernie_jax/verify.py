"""`python -m ernie_jax.verify`: check an install against transformers (see `ernie_jax.tools.verify`)."""

from ernie_jax.tools.verify import main

if __name__ == "__main__":
    raise SystemExit(main())
