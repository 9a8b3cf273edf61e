"""Execute the notebooks from their jupytext sources, as CI does, and optionally write the executed copies.

    python notebooks/execute.py                 # run every notebooks/NN_*.py, report each one's wall time
    python notebooks/execute.py --write 01      # ... and write notebooks/01_*.ipynb with its outputs (for the web)

The `.py` files (jupytext percent format) are the source of truth and what reviews read; the `.ipynb` beside each
is its executed copy, so GitHub shows the pictures. A cell that raises stops the run with the cell and its error
(nbclient's CellExecutionError), which is what `tests/test_notebooks.py` relies on.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import jupytext
import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def sources() -> list[Path]:
    """The notebooks, in order: notebooks/NN_name.py."""
    return sorted(p for p in HERE.glob("[0-9][0-9]_*.py"))


def execute(source: Path, timeout: int = 900) -> tuple[nbformat.NotebookNode, float]:
    """Run `source` top to bottom in a fresh python3 kernel whose working directory is notebooks/.

    The repository root is put on the kernel's PYTHONPATH, so a checkout runs its own code even where another
    copy is installed. Raises nbclient.exceptions.CellExecutionError at the first cell that fails."""
    nb = jupytext.read(source)
    env_path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    os.environ["PYTHONPATH"] = env_path  # the kernel is a subprocess and inherits it
    os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(HERE)}})
    started = time.perf_counter()
    client.execute()
    return nb, time.perf_counter() - started


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="prefixes of the notebooks to run (default: all)")
    parser.add_argument("--write", action="store_true", help="write each executed copy as notebooks/NAME.ipynb")
    args = parser.parse_args(argv)
    chosen = [p for p in sources() if not args.names or any(p.stem.startswith(n) for n in args.names)]
    for source in chosen:
        nb, seconds = execute(source)
        print(f"{source.name}: {seconds:.0f} s", flush=True)
        if args.write:
            nb.metadata.pop("widgets", None)
            nbformat.write(nb, source.with_suffix(".ipynb"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
