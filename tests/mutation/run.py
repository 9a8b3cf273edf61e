"""Mutation check: put one deliberate bug at a time into a copy of the repository and see whether the tests fail.

    python -m tests.mutation.run                  # every mutation in tests/mutation/catalogue.py
    python -m tests.mutation.run --only NAME ...  # just these (repeatable)
    python -m tests.mutation.run --quick          # only each mutation's first test target
    python -m tests.mutation.run --working-tree   # the files on disk, not the HEAD commit
    python -m tests.mutation.run --list           # names, files and targets, nothing run

Each mutation runs in its own temporary copy of the repository at HEAD (`git archive`: what a clean clone holds,
so untracked junk, build outputs and anyone's uncommitted edits are not copied); --working-tree copies the files
on disk instead (tracked and untracked, not ignored), to check tests before committing them.
The snippet to replace must occur exactly once in its file, else the mutation is reported
as STALE and the run fails: the catalogue cannot rot silently when the code it mutates changes.
A mutation is CAUGHT when its tests fail (pytest exit 1) and MISSED when they pass. Any other pytest exit (2:
interrupted or collection error, 4: bad usage, 5: no tests collected) is an ERROR, because it says nothing about
the test's power. First the listed tests run once on an unmutated copy (the baseline; --no-baseline skips it):
a test that fails without any mutation would "catch" everything. Exit status: 0 when every mutation is caught,
1 otherwise, 2 when the baseline fails.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from tests.mutation.catalogue import MUTATIONS, Mutation

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PYTEST_ARGS = ["-q", "-x", "-m", "not slow and not tpu", "-p", "no:cacheprovider"]


class StaleMutation(Exception):
    """The catalogue's snippet is not found exactly once: the code moved on and the entry must be updated."""


@dataclass
class Outcome:
    name: str
    verdict: str  # CAUGHT, MISSED, STALE or ERROR
    seconds: float
    detail: str  # the failing test (caught) or why it is stale/errored


def copy_commit(root: str, dest: str) -> None:
    """The committed tree (HEAD) as a clean clone would have it: nobody's uncommitted edits, no untracked junk."""
    archive = subprocess.run(["git", "archive", "--format=tar", "HEAD"], cwd=root, check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", dest], input=archive.stdout, check=True)


def copy_working_tree(root: str, dest: str) -> None:
    """Tracked and untracked-but-not-ignored files as they are on disk (for checking tests before committing)."""
    command = ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"]
    listed = subprocess.run(command, cwd=root, check=True, capture_output=True).stdout
    for rel in filter(None, listed.decode().split("\0")):
        src = os.path.join(root, rel)
        if not os.path.isfile(src):  # tracked but deleted on disk
            continue
        target = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(src, target)


def apply_mutation(root: str, mutation: Mutation) -> None:
    path = os.path.join(root, mutation.file)
    if not os.path.isfile(path):
        raise StaleMutation(f"{mutation.file} does not exist")
    with open(path, encoding="utf-8") as f:
        source = f.read()
    count = source.count(mutation.original)
    if count != 1:
        raise StaleMutation(f"snippet found {count} times in {mutation.file}, expected exactly once")
    with open(path, "w", encoding="utf-8") as f:
        f.write(source.replace(mutation.original, mutation.replacement))


def imports_resolve_to(work: str, env: dict[str, str]) -> str:
    """'' when the copy's packages are the ones imported there, else what went wrong. Without this check an
    editable install could make the copy test the unmutated checkout, and every mutation would look missed."""
    probe = "import importlib.util as u; print(*(u.find_spec(m).origin for m in ('ernie_jax', 'sharding')))"
    proc = subprocess.run([sys.executable, "-c", probe], cwd=work, env=env, capture_output=True, text=True)
    origins = proc.stdout.split()
    roots = (work, os.path.realpath(work))
    if proc.returncode or not origins or not all(o.startswith(roots) for o in origins):
        return f"the copy imports {origins or proc.stderr.strip()}, not its own packages"
    return ""


def first_failure(output: str) -> str:
    """The first failing test id from pytest -q's summary ("FAILED tests/x.py::test_y - ...")."""
    for line in output.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line.split(" ", 2)[1]
    return "?"


def run_tests_in_copy(
    mutation: Mutation | None, targets: list[str], timeout: float, working_tree: bool
) -> tuple[int, str]:
    """pytest's exit code and output for `targets` in a fresh copy of the repository, mutated when `mutation` is
    given. Raises StaleMutation; a timeout gives exit code -1."""
    name = mutation.name if mutation else "baseline"
    with tempfile.TemporaryDirectory(prefix=f"mutant-{name}-") as work:
        (copy_working_tree if working_tree else copy_commit)(REPO_ROOT, work)
        if mutation is not None:
            apply_mutation(work, mutation)
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
        # The copy must import its own (mutated) modules, never the installed editable checkout.
        env["PYTHONPATH"] = work + os.pathsep + env.get("PYTHONPATH", "")
        imported_from = imports_resolve_to(work, env)
        if imported_from:
            return -2, imported_from
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "pytest", *PYTEST_ARGS, *targets],
                cwd=work,
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            return -1, f"timed out after {timeout:.0f} s"
    return proc.returncode, proc.stdout + proc.stderr


def run_one(mutation: Mutation, *, quick: bool, timeout: float, verbose: bool, working_tree: bool) -> Outcome:
    started = time.perf_counter()
    targets = mutation.tests[:1] if quick else list(mutation.tests)
    try:
        returncode, output = run_tests_in_copy(mutation, targets, timeout, working_tree)
    except StaleMutation as e:
        return Outcome(mutation.name, "STALE", time.perf_counter() - started, str(e))
    seconds = time.perf_counter() - started
    if returncode < 0:
        return Outcome(mutation.name, "ERROR", seconds, output)
    if verbose:
        print(output)
    if returncode == 1:
        return Outcome(mutation.name, "CAUGHT", seconds, first_failure(output))
    if returncode == 0:
        return Outcome(mutation.name, "MISSED", seconds, "all listed tests passed")
    tail = output.strip().splitlines()[-1:] or ["no output"]
    return Outcome(mutation.name, "ERROR", seconds, f"pytest exit {returncode}: {tail[0]}")


def print_table(outcomes: list[Outcome]) -> None:
    width = max(len(o.name) for o in outcomes)
    print(f"\n{'mutation'.ljust(width)}  verdict  seconds  detail")
    for o in outcomes:
        print(f"{o.name.ljust(width)}  {o.verdict:<7}  {o.seconds:7.1f}  {o.detail}")
    counts = {v: sum(o.verdict == v for o in outcomes) for v in ("CAUGHT", "MISSED", "STALE", "ERROR")}
    print(", ".join(f"{n} {v.lower()}" for v, n in counts.items()) + f" of {len(outcomes)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", default=[], metavar="NAME", help="run only this mutation")
    parser.add_argument("--quick", action="store_true", help="run only the first test target of each mutation")
    parser.add_argument("--list", action="store_true", help="print the catalogue and exit")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per mutation before it counts as ERROR")
    parser.add_argument(
        "--working-tree",
        action="store_true",
        help="copy the files on disk (tracked and untracked, not ignored) instead of the HEAD commit",
    )
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the listed tests")
    parser.add_argument("-v", "--verbose", action="store_true", help="print pytest's output for every mutation")
    args = parser.parse_args(argv)

    names = [m.name for m in MUTATIONS]
    if len(set(names)) != len(names):
        raise SystemExit("catalogue: duplicate mutation names")
    unknown = sorted(set(args.only) - set(names))
    if unknown:
        raise SystemExit(f"unknown mutation(s) {unknown}; known: {', '.join(names)}")
    selected = [m for m in MUTATIONS if not args.only or m.name in args.only]
    if args.list:
        for m in selected:
            print(f"{m.name}: {m.file} -> {' '.join(m.tests)}\n    {m.why}")
        return 0
    if not args.no_baseline:
        # A test that already fails unmutated would "catch" every mutation: the listed tests must pass first.
        targets = sorted({t for m in selected for t in (m.tests[:1] if args.quick else m.tests)})
        started = time.perf_counter()
        returncode, output = run_tests_in_copy(None, targets, args.timeout, args.working_tree)
        print(f"baseline: {len(targets)} targets, unmutated, exit {returncode} ({time.perf_counter() - started:.0f} s)")
        if returncode != 0:
            print(output)
            print("baseline failed: fix the tests (or the code) before judging mutations", file=sys.stderr)
            return 2
    outcomes = []
    for m in selected:
        outcome = run_one(
            m, quick=args.quick, timeout=args.timeout, verbose=args.verbose, working_tree=args.working_tree
        )
        print(f"{outcome.verdict:<7} {outcome.name} ({outcome.seconds:.0f} s) {outcome.detail}", flush=True)
        outcomes.append(outcome)
    print_table(outcomes)
    return 0 if all(o.verdict == "CAUGHT" for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
