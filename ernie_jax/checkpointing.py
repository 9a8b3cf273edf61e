"""Training checkpoints with Orbax: async saves, keep the last K, exact resume, restore onto any mesh.

Each step directory holds params (fp32 master weights), router correction biases, optimizer state, the data
iterator's state and a JSON record of the step, the RNG seed and the model architecture. Orbax finalises a step
only once every item is written, and `latest_step()` sees finalised steps only, so a save cut short by preemption
is never restored. A checkpoint written for another architecture is refused with the differing fields named.
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
        meta = {"step": step, "seed": seed, "model": dataclasses.asdict(model)}
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            biases=ocp.args.StandardSave(biases),
            opt_state=ocp.args.StandardSave(opt_state),
            data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta),
        )
        return self.manager.save(step, args=args, force=force)

    def restore(self, step: int, *, params, biases, opt_state, model: ErnieConfig) -> dict[str, Any]:
        """Restore `step` into the structure, dtypes and shardings of the given (template) state."""
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # noqa: BLE001 - a foreign or damaged directory: say which
            raise CheckpointMismatchError(
                f"{self.directory}/{step}: not a readable ernie_jax training checkpoint ({type(e).__name__}: {e})"
            ) from e
        saved = meta.get("model", {})
        diffs = {k: (saved.get(k), v) for k, v in dataclasses.asdict(model).items() if saved.get(k) != v}
        if diffs:
            listed = ", ".join(f"model.{k}: checkpoint {a!r} vs run {b!r}" for k, (a, b) in sorted(diffs.items()))
            raise CheckpointMismatchError(
                f"{self.directory}/{step} was written for another architecture ({listed}). Use a fresh run_dir, "
                "or the overrides the checkpoint was trained with."
            )
        args = ocp.args.Composite(
            params=ocp.args.StandardRestore(_abstract(params)),
            biases=ocp.args.StandardRestore(_abstract(biases)),
            opt_state=ocp.args.StandardRestore(_abstract(opt_state)),
            data=ocp.args.JsonRestore(),
        )
        try:
            restored = self.manager.restore(step, args=args)
        except Exception as e:  # noqa: BLE001 - damaged files or another optimizer layout: name the step and the cause
            raise CheckpointMismatchError(
                f"{self.directory}/{step}: cannot be restored into this run's state ({type(e).__name__}: {e}). The "
                "checkpoint is damaged, or was written with another optimizer configuration; delete that step "
                "directory to resume from the previous one."
            ) from e
        return dict(
            params=restored["params"],
            biases=restored["biases"],
            opt_state=restored["opt_state"],
            data_state=restored["data"],
            step=meta["step"],
            seed=meta["seed"],
        )

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)
