"""The mutation catalogue stays valid as the code moves: every snippet still occurs exactly once, and every test it
names still exists and is not marked slow (so the quick suite is what catches it). Only reads files: the mutation
runs themselves are `python -m tests.mutation.run`."""

from __future__ import annotations

import ast
import os

import pytest

from tests.mutation.catalogue import MUTATIONS, Mutation
from tests.mutation.run import REPO_ROOT, StaleMutation, apply_mutation


def _read(rel: str) -> str:
    with open(os.path.join(REPO_ROOT, rel), encoding="utf-8") as f:
        return f.read()


@pytest.mark.parametrize("mutation", MUTATIONS, ids=[m.name for m in MUTATIONS])
def test_snippet_occurs_exactly_once_and_changes_the_code(mutation):
    source = _read(mutation.file)
    assert source.count(mutation.original) == 1, f"{mutation.file}: update the catalogue entry {mutation.name}"
    assert mutation.original != mutation.replacement


@pytest.mark.parametrize("mutation", MUTATIONS, ids=[m.name for m in MUTATIONS])
def test_named_tests_exist_and_are_quick(mutation):
    for target in mutation.tests:
        path, _, name = target.partition("::")
        function = name.split("[")[0]
        tree = ast.parse(_read(path))
        found = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == function]
        assert found, f"{target} not found"
        marks = [ast.unparse(d) for d in found[0].decorator_list]
        marks += [ast.unparse(n) for n in tree.body if isinstance(n, ast.Assign) and "pytestmark" in ast.unparse(n)]
        slow = [m for m in marks if "mark.slow" in m or "mark.tpu" in m]
        assert not slow, f"{target} is marked {slow}: the quick suite skips it"


def test_a_missing_snippet_is_refused(tmp_path):
    (tmp_path / "m.py").write_text("x = 1\nx = 1\n")
    twice = Mutation("twice", "m.py", "x = 1", "x = 2", ("t",), "")
    with pytest.raises(StaleMutation, match="2 times"):
        apply_mutation(str(tmp_path), twice)
    with pytest.raises(StaleMutation, match="0 times"):
        apply_mutation(str(tmp_path), Mutation("gone", "m.py", "y = 1", "y = 2", ("t",), ""))
