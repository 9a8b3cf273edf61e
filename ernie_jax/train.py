"""Train an ERNIE 4.5 model: `python -m ernie_jax.train [--config=NAME] [key=value ...]`.

With no arguments it trains the embedded default (`configs/tiny.py`): a small ERNIE MoE on CPU, on text that ships
with Python, with a progress bar, checkpoints under runs/tiny, and a greedy sample at the end. Running the same
command again resumes from the latest checkpoint. `--help` lists every config field.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

import sharding
from ernie_jax.checkpointing import TrainCheckpointer
from ernie_jax.config import human_count
from ernie_jax.data import iterator_state, make_iterator, make_tokenizer, restore_iterator
from ernie_jax.generate import greedy
from ernie_jax.hf.checkpoint import from_pretrained, save_pretrained
from ernie_jax.metrics import MetricsWriter, peak_flops_per_device
from ernie_jax.model import ErnieForCausalLM
from ernie_jax.optim import lr_schedule, make_optimizer
from ernie_jax.step_builder import batch_sharding, jit_train_step, model_creator, model_options, opt_state_shardings
from ernie_jax.train_config import TrainConfig, apply_overrides, describe_fields, list_presets, load_preset
from ernie_jax.train_step import as_metrics_dict, model_flops_per_token, split_model

log = logging.getLogger("ernie_jax.train")


def parse_args(argv: list[str] | None) -> tuple[TrainConfig, argparse.Namespace]:
    parser = argparse.ArgumentParser(
        prog="python -m ernie_jax.train",
        add_help=False,
        description="Train ERNIE 4.5. Overrides are key=value with dotted field paths, e.g. steps=500 optim.lr=1e-3",
    )
    parser.add_argument("--config", default="tiny", help=f"preset in configs/: {', '.join(list_presets())}")
    parser.add_argument("--init-from-hf", dest="init_from_hf", help="start from a Hugging Face checkpoint directory")
    parser.add_argument("--coordinator-address", help="multi-process: host:port of process 0 (CPU/GPU clusters)")
    parser.add_argument("--num-processes", type=int, help="multi-process: total number of processes")
    parser.add_argument("--process-id", type=int, help="multi-process: this process's index")
    parser.add_argument("-h", "--help", action="store_true")
    args, overrides = parser.parse_known_args(argv)
    cfg = load_preset(args.config)
    if args.help:
        parser.print_help()
        print(f"\nFields of --config={args.config} (override any with key=value):")
        print("\n".join(describe_fields(cfg)))
        raise SystemExit(0)
    unknown = [o for o in overrides if o.startswith("-")]
    if unknown:
        parser.error(f"unknown option(s) {unknown}; config fields are set as key=value (see --help)")
    cfg = apply_overrides(cfg, overrides)
    if args.init_from_hf:
        cfg = apply_overrides(cfg, [f"init_from_hf={args.init_from_hf}"])
    return cfg, args


def initialize_distributed(args: argparse.Namespace) -> None:
    """One process per host: explicit coordinator flags (CPU/GPU), or auto-detection on a TPU pod."""
    if args.coordinator_address:
        jax.distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    else:
        # A multi-host TPU slice lists its workers ("10.0.0.2,10.0.0.3,..."). libtpu on a CPU host may leave a
        # warning sentence in this variable instead, so require a comma-separated list without spaces.
        hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
        if "," in hosts and " " not in hosts:
            jax.distributed.initialize()


def check_devices(cfg: TrainConfig, name: str) -> None:
    backend, count = jax.default_backend(), jax.device_count()
    if cfg.platform not in ("any", backend) or count < cfg.min_devices:
        raise SystemExit(
            f"--config={name} is meant for {cfg.min_devices} {cfg.platform.upper()} devices with mesh "
            f"{cfg.mesh.sizes}; this host has {count} {backend} device(s).\n"
            f"  Launch it on each host of such a slice. Check that it compiles and fits from this host first:\n"
            f"  python -m ernie_jax.aot --config={name} --topology=v5p-128   (needs the tpu extra: libtpu)\n"
            f"  Or run a reduced copy here: python -m ernie_jax.train --config={name} platform=any min_devices=1 "
            "mesh.fsdp=1 mesh.expert=1 model.num_hidden_layers=2 data.global_batch_size=8 data.seq_len=128"
        )


def build_model(cfg: TrainConfig, mesh) -> ErnieForCausalLM:
    """fp32 master weights, compute in cfg.dtype, every parameter born on its sharding."""
    if cfg.init_from_hf:
        return from_pretrained(
            cfg.init_from_hf, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.float32, mesh=mesh, options=model_options(cfg)
        )
    create = model_creator(cfg)
    graphdef, abstract_state = nnx.split(nnx.eval_shape(create))
    shardings = sharding.state_shardings(abstract_state, mesh)
    state = jax.jit(lambda: nnx.state(create()), out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def place_batch(batch: dict[str, np.ndarray], batch_sharding) -> dict[str, jax.Array]:
    return {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in batch.items()}


def train(cfg: TrainConfig, name: str = "custom", *, progress: bool = True) -> dict:
    """Run (or resume) training; returns a summary dict (first/last loss, steps, tokens/s, wall time)."""
    started = time.perf_counter()
    mesh = sharding.make_mesh(**cfg.mesh.sizes)
    is_main = jax.process_index() == 0
    model = build_model(cfg, mesh)
    model_cfg = model.config  # with --init-from-hf, the checkpoint's architecture (not the preset's model)
    if model_cfg != cfg.model:
        log.info("Model architecture from %s differs from the preset's; using the checkpoint's", cfg.init_from_hf)
    graphdef, params, biases = split_model(model)
    del model
    optimizer = make_optimizer(cfg.optim, cfg.steps, params)
    schedule = lr_schedule(cfg.optim, cfg.steps)  # the same schedule the optimizer uses, for logging
    param_sh = jax.tree.map(lambda x: x.sharding, params)
    bias_sh = jax.tree.map(lambda x: x.sharding, biases)
    # Adam moments on their parameters' shardings, scalars replicated (jit alone would leave them unsharded).
    opt_sh = opt_state_shardings(optimizer, params, param_sh, mesh)
    opt_state = jax.jit(optimizer.init, out_shardings=opt_sh)(params)
    n_params = model_cfg.num_params()
    log.info(
        "%s: %s params (%s active), mesh %s, %d %s device(s)",
        name,
        human_count(n_params),
        human_count(model_cfg.num_active_params()),
        dict(mesh.shape),
        jax.device_count(),
        jax.default_backend(),
    )

    data = make_iterator(cfg.data, process_index=jax.process_index(), process_count=jax.process_count())
    ckpt = TrainCheckpointer(
        os.path.join(cfg.run_dir, "checkpoints"), keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save
    )
    step = 0
    latest = ckpt.latest_step()
    if latest is not None:
        restored = ckpt.restore(latest, params=params, biases=biases, opt_state=opt_state, model=model_cfg)
        params, biases, opt_state, step = (
            restored["params"],
            restored["biases"],
            restored["opt_state"],
            restored["step"],
        )
        data = restore_iterator(
            cfg.data, restored["data_state"], process_index=jax.process_index(), process_count=jax.process_count()
        )
        log.info("Resumed from %s at step %d", ckpt.directory, step)

    batch_sh = batch_sharding(cfg, mesh)
    step_fn = jit_train_step(cfg, graphdef, optimizer, mesh, param_sh, bias_sh, opt_sh)

    stop = {"signal": None}

    def on_sigterm(signum, frame):  # preemption: finish this step, checkpoint, exit
        stop["signal"] = signum

    previous_handler = signal.signal(signal.SIGTERM, on_sigterm)
    writer = MetricsWriter(cfg.run_dir, enabled=is_main)
    flops_per_token = model_flops_per_token(model_cfg, cfg.data.seq_len)
    peak, peak_source = peak_flops_per_device(jnp.dtype(cfg.dtype))
    log.info("MFU is measured against %.3g FLOP/s per device (%s)", peak, peak_source)
    tokens_per_step = cfg.data.global_batch_size * cfg.data.seq_len
    summary: dict = {"start_step": step, "first_loss": None, "last_loss": None}
    bar = tqdm(total=cfg.steps, initial=step, desc="train", disable=not (progress and is_main), unit="step")
    window_start, window_steps = time.perf_counter(), 0
    skipped = 0
    try:
        with sharding.use_mesh(
            mesh, moe_transport=cfg.mesh.moe_transport, moe_buffer_factor=cfg.mesh.moe_buffer_factor
        ):
            while step < cfg.steps:
                batch = place_batch(next(data), batch_sh)
                params, biases, opt_state, metrics = step_fn(params, biases, opt_state, batch, jnp.int32(step))
                step += 1
                window_steps += 1
                bar.update(1)
                last = step == cfg.steps
                if step % cfg.log_every == 0 or last or step == summary["start_step"] + 1:
                    scalars = as_metrics_dict(metrics)
                    elapsed = time.perf_counter() - window_start
                    tok_s = tokens_per_step * window_steps / elapsed
                    scalars.update(
                        tokens_per_s=tok_s,
                        mfu=tok_s * flops_per_token / (peak * jax.device_count()),
                        lr=float(schedule(step - 1)),
                    )
                    if not scalars["finite"]:
                        skipped += 1
                        if cfg.nonfinite == "stop":
                            raise FloatingPointError(
                                f"step {step}: loss {scalars['loss']} / grad norm {scalars['grad_norm']} is not "
                                "finite; lower optim.lr, or set nonfinite=skip to skip such updates"
                            )
                        log.warning("step %d: non-finite loss or gradient; update skipped", step)
                    if scalars.get("moe_dropped", 0) > 0:
                        log.warning(
                            "step %d: the bounded expert-parallel buffer dropped %d expert assignments; raise "
                            "mesh.moe_buffer_factor (or set it to 0 for dropless) if this persists",
                            step,
                            scalars["moe_dropped"],
                        )
                    summary["first_loss"] = summary["first_loss"] or scalars["loss"]
                    summary["last_loss"] = scalars["loss"]
                    writer.write(step, scalars)
                    bar.set_postfix(loss=f"{scalars['loss']:.3f}", tok_s=f"{tok_s:,.0f}", mfu=f"{scalars['mfu']:.1%}")
                    window_start, window_steps = time.perf_counter(), 0
                if step % cfg.checkpoint.every == 0 or last or stop["signal"]:
                    ckpt.save(
                        step,
                        params=params,
                        biases=biases,
                        opt_state=opt_state,
                        data_state=iterator_state(data),
                        model=model_cfg,
                        seed=cfg.seed,
                        force=True,
                    )
                if stop["signal"]:
                    log.warning("SIGTERM: checkpoint saved at step %d; run the same command to resume", step)
                    break
    finally:
        bar.close()
        ckpt.close()
        writer.close()
        signal.signal(signal.SIGTERM, previous_handler)
    summary.update(
        end_step=step, wall_s=time.perf_counter() - started, skipped_steps=skipped, checkpoint_dir=ckpt.directory
    )
    model = nnx.merge(graphdef, params, biases)
    if cfg.sample_tokens and is_main and not stop["signal"]:
        tok = make_tokenizer(cfg.data)
        with sharding.use_mesh(mesh):
            ids = greedy(model, [tok.bos_id, *tok.encode(cfg.sample_prompt)], cfg.sample_tokens, eos_id=tok.eos_id)
        summary["sample"] = tok.decode(ids[1:])
    if cfg.export_hf and not stop["signal"]:
        save_pretrained(model, cfg.export_hf, dtype=jnp.bfloat16, progress=progress and is_main)
        log.info("Exported the trained model to %s (Hugging Face format)", cfg.export_hf)
    return summary


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    cfg, args = parse_args(argv)
    initialize_distributed(args)
    check_devices(cfg, args.config)
    summary = train(cfg, args.config)
    if jax.process_index() == 0:
        if summary["first_loss"] is not None:
            print(
                f"loss {summary['first_loss']:.4f} -> {summary['last_loss']:.4f} over steps "
                f"{summary['start_step']}..{summary['end_step']} in {summary['wall_s']:.0f} s; "
                f"checkpoint in {summary['checkpoint_dir']}"
            )
        else:
            print(
                f"already at step {summary['end_step']} (steps={cfg.steps}); checkpoint in "
                f"{summary['checkpoint_dir']}. Raise steps=... to train further."
            )
        if "sample" in summary:
            print(f"sample: {summary['sample']!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
