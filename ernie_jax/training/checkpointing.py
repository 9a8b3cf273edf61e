"""Training checkpoints with Orbax: async saves, keep the last K, exact resume, restore onto any mesh.

Each step directory holds params (fp32 master weights; a QLoRA run's quantized base too), router correction biases,
optimizer state, the data iterator's state and a JSON record of the step, the RNG seed and the model architecture.
Orbax finalises a step only once every item is written, and `latest_step()` sees finalised steps only, so a save cut
short by preemption is never restored. A checkpoint written for another architecture is refused with the differing
fields named. Params of other dtypes (another lora.base_dtype) are refused too.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from ernie_jax.config import ErnieConfig

log = logging.getLogger(__name__)


class CheckpointMismatchError(ValueError):
    """The checkpoint does not belong to this run's model or is not a training checkpoint."""


def _abstract(tree):
    """ShapeDtypeStructs carrying each array's sharding: the restore target (so restore reshards to this mesh)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class TrainCheckpointer:
    def __init__(self, directory: str, *, keep: int, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("params", "biases", "opt_state", "data", "meta")
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(
        self,
        step: int,
        *,
        params,
        biases,
        opt_state,
        data_state: dict,
        model: ErnieConfig,
        seed: int,
        force: bool = False,
    ) -> bool:
        meta = {"step": step, "seed": seed, "model": _as_json(model), "param_dtypes": param_dtypes(params)}
        items = dict(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta),
        )
        if _has_leaves(biases):  # a dense model has no router biases, and Orbax refuses to save an empty tree
            items["biases"] = ocp.args.StandardSave(biases)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int, *, params, biases, opt_state, model: ErnieConfig) -> dict[str, Any]:
        """Restore `step` into the structure, dtypes and shardings of the given (template) state.

        Raises:
            CheckpointMismatchError: the step was written for another architecture.
            DamagedCheckpointError: the step's files cannot be read back.
        """
        path = os.path.join(self.directory, str(step))
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # noqa: BLE001 - a foreign or damaged directory: say which
            raise DamagedCheckpointError(
                f"{path}: not a readable ernie_jax training checkpoint ({_first_line(e)})"
            ) from e
        saved = meta.get("model", {})
        diffs = {k: (saved.get(k), v) for k, v in _as_json(model).items() if saved.get(k) != v}
        if diffs:
            listed = ", ".join(f"model.{k}: checkpoint {a!r} vs run {b!r}" for k, (a, b) in sorted(diffs.items()))
            raise CheckpointMismatchError(
                f"{path} was written for another architecture ({listed}). Use a fresh run_dir, "
                "or the overrides the checkpoint was trained with."
            )
        saved_dtypes, run_dtypes = meta.get("param_dtypes"), param_dtypes(params)
        if saved_dtypes is not None and saved_dtypes != run_dtypes:  # e.g. lora.base_dtype=int8 vs nf4 (QLoRA)
            raise CheckpointMismatchError(
                f"{path} holds parameters of other dtypes (checkpoint {saved_dtypes} vs run {run_dtypes}): "
                "lora.rank or lora.base_dtype differ from the run that wrote it. Use a fresh run_dir, or its overrides."
            )
        items = dict(
            params=ocp.args.StandardRestore(_abstract(params)),
            opt_state=ocp.args.StandardRestore(_abstract(opt_state)),
            data=ocp.args.JsonRestore(),
        )
        if _has_leaves(biases):
            items["biases"] = ocp.args.StandardRestore(_abstract(biases))
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # noqa: BLE001 - damaged files or another optimizer layout: name the step and the cause
            raise DamagedCheckpointError(f"{path}: cannot be restored into this run's state ({_first_line(e)})") from e
        return dict(
            params=restored["params"],
            biases=restored["biases"] if _has_leaves(biases) else biases,
            opt_state=restored["opt_state"],
            data_state=restored["data"],
            step=meta["step"],
            seed=meta["seed"],
        )

    def restore_latest(self, *, params, biases, opt_state, model: ErnieConfig) -> dict[str, Any] | None:
        """The newest step that restores; None when there is no checkpoint yet.

        A step that cannot be read back (a disk filled up, a file truncated or deleted by hand) is moved aside to
        `damaged-<step>` with a warning naming it, and the next older step is tried: the run loses one checkpoint
        interval, not everything. A step written for another architecture is not damage and still stops the run.

        Raises:
            CheckpointMismatchError: the newest readable step belongs to another architecture.
            DamagedCheckpointError: checkpoints exist but none of them is intact (they are all moved aside).
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        damaged = []
        for step in steps:
            try:
                return self.restore(step, params=params, biases=biases, opt_state=opt_state, model=model)
            except DamagedCheckpointError as e:
                aside = self._move_aside(step)
                damaged.append(aside)
                log.warning("%s; moved it to %s and trying the previous step", e, aside)
        if damaged:
            raise DamagedCheckpointError(
                f"{self.directory}: no intact checkpoint (damaged steps moved to {', '.join(damaged)}); run the "
                "same command again to start from step 0"
            )
        return None

    def _move_aside(self, step: int) -> str:
        source = os.path.join(self.directory, str(step))
        target = os.path.join(self.directory, f"damaged-{step}")
        n = 1
        while os.path.exists(target):
            n += 1
            target = os.path.join(self.directory, f"damaged-{step}.{n}")
        os.replace(source, target)
        self.manager.reload()
        return target

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


class DamagedCheckpointError(CheckpointMismatchError):
    """A finalised step whose files cannot be read back."""


def param_dtypes(params) -> dict[str, int]:
    """How many arrays of each dtype the params hold: tells a QLoRA checkpoint (int8 or uint8 codes) and a bf16 base
    from an fp32 one, which Orbax would otherwise fail to restore as if the files were damaged."""
    counts: dict[str, int] = {}
    for x in jax.tree.leaves(params):
        counts[str(x.dtype)] = counts.get(str(x.dtype), 0) + 1
    return dict(sorted(counts.items()))


def _has_leaves(tree) -> bool:
    return bool(jax.tree.leaves(tree))


def _first_line(error: BaseException, limit: int = 300) -> str:
    text = str(error).strip().splitlines()
    line = text[0] if text else ""
    return f"{type(error).__name__}: {line[:limit]}"


def _as_json(model) -> dict[str, Any]:
    """The architecture as its JSON record reads back (tuples as lists, nested configs as dicts), so a saved record
    and the run's compare equal when they are."""
    return json.loads(json.dumps(dataclasses.asdict(model)))
