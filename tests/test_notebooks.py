"""The notebooks run top to bottom in a fresh kernel, as a user runs them, and their executed copies are current.

Each `notebooks/NN_name.py` (jupytext percent format, the source of truth) is executed with nbclient by
`notebooks/execute.py`; a cell that raises fails the test with that cell and its traceback. The `.ipynb` beside each
source is its executed copy (outputs kept so GitHub shows the pictures): its code cells must be the source's.
"""

import importlib.util
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
SOURCES = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.py"))


def _runner():
    spec = importlib.util.spec_from_file_location("notebooks_execute", NOTEBOOKS / "execute.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _code_cells(nb) -> list[str]:
    return [cell.source.strip() for cell in nb.cells if cell.cell_type == "code"]


def test_every_notebook_is_found():
    names = [p.stem for p in SOURCES]
    assert names == [p.stem for p in _runner().sources()]
    assert {"01_quickstart", "02_finetune_lora", "03_moe_internals", "04_pod_readiness"} <= set(names), names


@pytest.mark.parametrize("source", SOURCES, ids=[p.stem for p in SOURCES])
def test_executed_copy_has_the_source_code(source):
    import jupytext
    import nbformat

    copy = source.with_suffix(".ipynb")
    assert copy.exists(), f"{copy.name} missing: run python notebooks/execute.py --write {source.stem[:2]}"
    executed = nbformat.read(copy, as_version=4)
    assert _code_cells(executed) == _code_cells(jupytext.read(source)), (
        f"{copy.name} is older than {source.name}: run python notebooks/execute.py --write {source.stem[:2]}"
    )
    errors = [o for cell in executed.cells for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"{copy.name} was committed with an error output"


def test_a_failing_cell_fails_the_run(tmp_path):
    from nbclient.exceptions import CellExecutionError

    source = tmp_path / "99_broken.py"
    source.write_text("# %%\nx = 1\n\n# %%\nraise RuntimeError('this cell fails')\n\n# %%\nprint('never reached')\n")
    with pytest.raises(CellExecutionError, match="this cell fails"):
        _runner().execute(source, timeout=120)


# The pod-readiness notebook compiles for TPU topologies through libtpu, like the other `tpu` tests.
RUNS = [pytest.param(p, id=p.stem, marks=[pytest.mark.tpu] if "pod" in p.stem else []) for p in SOURCES]


# The knobs a user has for a quicker run: what the committed copies show is the full run (execute.py --write).
# Here every cell still runs and draws: the LoRA run takes 24 steps, not 80, the MoE runs 40, not 200, and the pod
# report compiles the embedded default for a v5p-8, not a3b for a v5p-64 (tests/test_aot.py compiles a3b, reduced
# in depth).
QUICK_RUN = {
    "02_finetune_lora": {"FINETUNE_STEPS": "24"},
    "03_moe_internals": {"MOE_STEPS": "40"},
    "04_pod_readiness": {"POD_PRESET": "tiny", "POD_TOPOLOGY": "v5p-8"},
}


@pytest.mark.slow
@pytest.mark.parametrize("source", RUNS)
def test_notebook_runs_top_to_bottom(source, monkeypatch):
    for name, value in QUICK_RUN.get(source.stem, {}).items():
        monkeypatch.setenv(name, value)  # the kernel is a subprocess and inherits the environment
    # find_spec, not import: importing libtpu here would leave its guesses in TPU_* variables the kernel inherits.
    if "pod" in source.stem and importlib.util.find_spec("libtpu") is None:
        pytest.skip("the pod-readiness notebook compiles for TPU through libtpu: pip install -e '.[tpu]'")
    nb, seconds = _runner().execute(source, timeout=1800)  # raises CellExecutionError at the first failing cell
    outputs = [o for cell in nb.cells for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    pictures = sum("image/png" in o.get("data", {}) for o in outputs)
    assert pictures >= 1, f"{source.name} drew no picture"
    print(f"[notebook] {source.name}: {seconds:.0f} s, {pictures} pictures")
