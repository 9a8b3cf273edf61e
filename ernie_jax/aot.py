"""`python -m ernie_jax.aot --config=NAME --topology=v5p-64 [--decode]`: compile for a TPU slice from this host.

The command line keeps this name for users; the report is built in `ernie_jax.tools.aot_report`.
"""

from ernie_jax.tools.aot_report import main

if __name__ == "__main__":
    raise SystemExit(main())
