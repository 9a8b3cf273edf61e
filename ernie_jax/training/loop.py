"""The training loop behind `python -m ernie_jax.train [--config=NAME] [key=value ...]`.

With no arguments it trains the embedded default (`configs/tiny.py`): a small ERNIE MoE on CPU, on text that ships
with Python, with a progress bar, checkpoints under runs/tiny, and a greedy sample at the end. Running the same
command again resumes from the latest checkpoint. `--help` lists every config field.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

import sharding
from ernie_jax.config import ConfigError, ErnieConfig, human_count
from ernie_jax.console import fail, setup_logging
from ernie_jax.data import (
    BadRecordError,
    iterator_state,
    make_iterator,
    make_tokenizer,
    restore_iterator,
    skipped_records,
    truncation_counts,
)
from ernie_jax.generate import greedy
from ernie_jax.hf.checkpoint import CheckpointError, save_pretrained, saved_dtype
from ernie_jax.hf.peft_adapter import save_peft_adapter
from ernie_jax.lora import LoRAParam, merge_adapters
from ernie_jax.training.checkpointing import CheckpointMismatchError, TrainCheckpointer
from ernie_jax.training.config import TrainConfig, apply_overrides, describe_fields, list_presets, load_preset
from ernie_jax.training.metrics import MetricsWriter, model_flops_per_token, peak_flops_per_device
from ernie_jax.training.optim import lr_schedule
from ernie_jax.training.state import batch_shardings, build_train_state, jit_train_step
from ernie_jax.training.step import as_metrics_dict
from ernie_jax.vl import VLConfig
from ernie_jax.vl.sft import check_image_tokens

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
    layers = "model.num_hidden_layers=2"
    if isinstance(cfg.model, VLConfig):
        layers = "model.text.num_hidden_layers=2 model.text.mlp_layer_types=dense,sparse model.vision.depth=2"
    if cfg.platform not in ("any", backend) or count < cfg.min_devices:
        raise SystemExit(
            f"--config={name} is meant for {cfg.min_devices} {cfg.platform.upper()} devices with mesh "
            f"{cfg.mesh.sizes}; this host has {count} {backend} device(s).\n"
            f"  Launch it on each host of such a slice. Check that it compiles and fits from this host first:\n"
            f"  python -m ernie_jax.aot --config={name} --topology=v5p-128   (needs the tpu extra: libtpu)\n"
            f"  Or run a reduced copy here: python -m ernie_jax.train --config={name} platform=any min_devices=1 "
            f"mesh.fsdp=1 mesh.expert=1 {layers} data.global_batch_size=8 data.seq_len=128"
        )


def place_batch(batch: dict[str, np.ndarray], shardings: dict) -> dict[str, jax.Array]:
    return {k: jax.make_array_from_process_local_data(shardings[k], v) for k, v in batch.items()}


class RunStopped(Exception):
    """The run cannot go on; `message` is one line for the user, `exit_code` what the process returns."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


# Exit codes of `python -m ernie_jax.train` (documented in the README).
EXIT_CONFIG = 2  # a bad config, override, data source or checkpoint: nothing was trained
EXIT_NONFINITE = 3  # nonfinite=stop hit a non-finite step, or every update of the run was skipped
EXIT_BAD_RECORD = 4  # data.on_bad_record=stop met a bad record (a checkpoint was saved first)
EXIT_SIGNAL_BASE = 128  # SIGTERM -> 143, SIGINT -> 130, after saving a checkpoint


def check_vocab(model_vocab: int, tokenizer, source: str) -> None:
    """Token ids past the embedding table read out of bounds (NaN from the first step): refuse before step 1."""
    if tokenizer.vocab_size > model_vocab:
        raise RunStopped(
            f"model.vocab_size: the model has {model_vocab} token ids but the tokenizer ({source}) has "
            f"{tokenizer.vocab_size}; set model.vocab_size={-(-tokenizer.vocab_size // 128) * 128} or use a "
            "matching data.tokenizer",
            EXIT_CONFIG,
        )


def open_data(cfg: TrainConfig):
    """The tokenizer and a fresh iterator; a missing file or a wrong field is a config error, said in one line."""
    try:
        return make_tokenizer(cfg.data), make_iterator(
            cfg.run_data, process_index=jax.process_index(), process_count=jax.process_count()
        )
    except (OSError, ValueError) as e:
        raise RunStopped(f"data: {e}", EXIT_CONFIG) from e


def bad_record(error: BaseException) -> BadRecordError | None:
    """The BadRecordError behind an error from the data iterator (Grain may re-raise it wrapped)."""
    while error is not None:
        if isinstance(error, BadRecordError):
            return error
        error = error.__cause__ or error.__context__
    return None


class StepChecker:
    """Host-side bookkeeping of finished steps: counts non-finite (skipped) updates, stops on them if asked.

    The jitted step never applies a non-finite update, so the state (and every checkpoint) stays finite; this
    only decides what to tell the user. A step is checked one step late, so reading its flag never stalls the
    device; steps that are logged or saved are checked at once.
    """

    WARN_FIRST = 5
    STUCK_AFTER = 10  # this many skipped updates in a row at the end of a run: it is stuck, not unlucky

    def __init__(self, policy: str):
        self.policy, self.skipped, self.checked, self.trailing = policy, 0, 0, 0
        self.pending: tuple[int, dict] | None = None

    @property
    def failed(self) -> bool:
        """More than half of the updates were skipped, or the run ended on a streak of them: it did not train."""
        return self.skipped * 2 > self.checked or self.trailing >= self.STUCK_AFTER

    def finish(self, step: int, metrics: dict) -> None:
        self.checked += 1
        if bool(metrics["finite"]):
            self.trailing = 0
            return
        self.skipped += 1
        self.trailing += 1
        what = f"step {step}: loss {float(metrics['loss']):.4g}, grad norm {float(metrics['grad_norm']):.4g}"
        if self.policy == "stop":
            raise RunStopped(
                f"{what} is not finite (nonfinite=stop); the update was not applied and the last checkpoint is "
                "intact. Lower optim.lr or raise optim.warmup_steps, or set nonfinite=skip",
                EXIT_NONFINITE,
            )
        if self.skipped <= self.WARN_FIRST:
            more = "; further skips are only counted" if self.skipped == self.WARN_FIRST else ""
            log.warning("%s is not finite: update skipped (nonfinite=skip)%s", what, more)

    def defer(self, step: int, metrics: dict) -> None:
        self.flush()
        self.pending = (step, metrics)

    def flush(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            self.finish(*pending)


def fit_mtp_depth(cfg: TrainConfig) -> TrainConfig:
    """With --init-from-hf the checkpoint decides how many MTP depths exist: a preset's mtp.depth beyond them (the
    embedded default trains one; most checkpoints have none) is lowered to what the checkpoint has, with a warning.
    Read from config.json before the data opens, since the rows' length depends on it."""
    if not cfg.init_from_hf or not cfg.mtp.depth:
        return cfg
    try:
        depths = ErnieConfig.from_hf_config(cfg.init_from_hf).num_nextn_predict_layers
    except (OSError, ValueError):
        return cfg  # an unreadable checkpoint is reported by the model loader, with its own line
    if cfg.mtp.depth <= depths:
        return cfg
    log.warning(
        "mtp.depth=%d but %s has %d MTP depth(s) (num_nextn_predict_layers): training with mtp.depth=%d",
        cfg.mtp.depth,
        cfg.init_from_hf,
        depths,
        depths,
    )
    return apply_overrides(cfg, [f"mtp.depth={depths}"])


def train(
    cfg: TrainConfig,
    name: str = "custom",
    *,
    progress: bool = True,
    on_log: Callable[[int, dict], None] | None = None,
) -> dict:
    """Run (or resume) training; returns a summary dict (first/last loss, steps, tokens/s, wall time).

    `on_log(step, row)`, if given, is called on the main process after every logged step with the row written to
    metrics.jsonl, plus `expert_load` for MoE models: tokens routed to each expert, one list per MoE layer. It is
    meant for watching a run from Python, e.g. a notebook that redraws the loss curve.

    Raises:
        RunStopped: the run could not start or had to stop (a bad config or record, a non-finite step with
            nonfinite=stop); the message says why and what to change.
    """
    started = time.perf_counter()
    cfg = fit_mtp_depth(cfg)
    mesh = sharding.make_mesh(**cfg.mesh.sizes)
    is_main = jax.process_index() == 0
    tokenizer, data = open_data(cfg)  # a missing or misnamed data file fails before a checkpoint is loaded
    try:
        state = build_train_state(cfg, mesh)
    except CheckpointError as e:
        raise RunStopped(f"--init-from-hf: {e}", EXIT_CONFIG) from e
    model_cfg = state.model_config  # with --init-from-hf, the checkpoint's architecture (not the preset's model)
    if model_cfg != cfg.model:
        log.info("Model architecture from %s differs from the preset's; using the checkpoint's", cfg.init_from_hf)
    check_vocab(model_cfg.vocab_size, tokenizer, cfg.data.tokenizer)
    if isinstance(model_cfg, VLConfig):
        try:
            check_image_tokens(model_cfg, tokenizer)
        except ValueError as e:
            raise RunStopped(f"data.tokenizer: {e}", EXIT_CONFIG) from e
    graphdef, params, biases, opt_state = state.graphdef, state.params, state.biases, state.opt_state
    schedule = lr_schedule(cfg.optim, cfg.steps)  # the same schedule the optimizer uses, for logging
    if cfg.lora.enabled:
        adapter_count = sum(x.size for x in jax.tree.leaves(nnx.filter_state(params, LoRAParam)))
        log.info(
            "LoRA rank %d, alpha %g%s: training %s adapter params; base weights and router biases frozen",
            cfg.lora.rank,
            cfg.lora.resolved_alpha,
            " (rsLoRA)" if cfg.lora.rslora else "",
            human_count(adapter_count),
        )
    log.info(
        "%s: %s params (%s active), mesh %s, %d %s device(s)",
        name,
        human_count(model_cfg.num_params()),
        human_count(model_cfg.num_active_params()),
        dict(mesh.shape),
        jax.device_count(),
        jax.default_backend(),
    )

    ckpt = TrainCheckpointer(
        os.path.join(cfg.run_dir, "checkpoints"), keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save
    )
    step = 0
    try:
        restored = ckpt.restore_latest(params=params, biases=biases, opt_state=opt_state, model=model_cfg)
    except CheckpointMismatchError as e:
        ckpt.close()
        raise RunStopped(str(e), EXIT_CONFIG) from e
    if restored is not None:
        params, biases, opt_state, step = (
            restored["params"],
            restored["biases"],
            restored["opt_state"],
            restored["step"],
        )
        data = restore_iterator(
            cfg.run_data, restored["data_state"], process_index=jax.process_index(), process_count=jax.process_count()
        )
        log.info("Resumed from %s at step %d", os.path.join(ckpt.directory, str(step)), step)

    batch_sh = batch_shardings(cfg, mesh)
    step_fn = jit_train_step(cfg, state, mesh)
    del state  # the loop owns params, biases and opt_state from here (the step donates them)

    stop = {"signal": None}

    def on_signal(signum, frame):  # preemption or Ctrl-C: finish this step, checkpoint, exit non-zero
        if stop["signal"] is not None:  # a second Ctrl-C: the user does not want to wait for the save
            raise KeyboardInterrupt
        stop["signal"] = signum
        log.warning("%s: saving a checkpoint after this step, then stopping", signal.Signals(signum).name)

    previous_handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    writer = MetricsWriter(cfg.run_dir, enabled=is_main, resume_step=step)
    flops_per_token = model_flops_per_token(
        model_cfg, cfg.data.seq_len, mtp_depth=cfg.mtp.depth, vision_patches=cfg.data.vision_patches
    )
    peak, peak_source = peak_flops_per_device(jnp.dtype(cfg.dtype))
    log.info("MFU is measured against %.3g FLOP/s per device (%s)", peak, peak_source)
    tokens_per_step = cfg.data.global_batch_size * cfg.data.seq_len  # the main model's tokens (MTP reads ahead)
    summary: dict = {"start_step": step, "first_loss": None, "last_loss": None}
    show_bar = progress and is_main and step < cfg.steps
    bar = tqdm(total=cfg.steps, initial=step, desc="train", disable=not show_bar, unit="step")
    window_start, window_steps = time.perf_counter(), 0
    checker = StepChecker(cfg.nonfinite)
    last_saved = step if restored is not None else None

    def save(at_step: int, data_state: dict) -> None:
        nonlocal last_saved
        if last_saved == at_step:
            return
        ckpt.save(
            at_step,
            params=params,
            biases=biases,
            opt_state=opt_state,
            data_state=data_state,
            model=model_cfg,
            seed=cfg.seed,
            force=True,
        )
        last_saved = at_step

    try:
        with sharding.use_mesh(mesh):
            while step < cfg.steps:
                data_state = iterator_state(data)  # where the data stood after `step` batches (cheap)
                try:
                    host_batch = next(data)
                except Exception as e:
                    record = bad_record(e)
                    if record is None:
                        raise
                    checker.flush()
                    saved = ""
                    if step > summary["start_step"]:
                        save(step, data_state)
                        saved = f"Checkpoint saved at step {step}. "
                    raise RunStopped(
                        f"{record} (data.on_bad_record=stop). {saved}Fix or remove the record and run the same "
                        "command, or add data.on_bad_record=skip, to go on",
                        EXIT_BAD_RECORD,
                    ) from e
                params, biases, opt_state, metrics = step_fn(
                    params, biases, opt_state, place_batch(host_batch, batch_sh), jnp.int32(step)
                )
                step += 1
                window_steps += 1
                bar.update(1)
                last = step == cfg.steps
                log_now = step % cfg.log_every == 0 or last or step == summary["start_step"] + 1
                save_now = step % cfg.checkpoint.every == 0 or last or stop["signal"] is not None
                if not (log_now or save_now):
                    checker.defer(step, metrics)
                    continue
                checker.flush()
                checker.finish(step, metrics)  # before a save: a stopped run never checkpoints the bad step
                if log_now:
                    scalars = as_metrics_dict(metrics)
                    elapsed = time.perf_counter() - window_start
                    tok_s = tokens_per_step * window_steps / elapsed
                    scalars.update(
                        tokens_per_s=tok_s,
                        mfu=tok_s * flops_per_token / (peak * jax.device_count()),
                        lr=float(schedule(step - 1)),
                        skipped_steps=checker.skipped,
                    )
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
                    if on_log is not None and is_main:
                        row = dict(scalars)
                        if "expert_load" in metrics:
                            row["expert_load"] = np.asarray(jax.device_get(metrics["expert_load"])).tolist()
                        on_log(step, row)
                    bar.set_postfix(loss=f"{scalars['loss']:.3f}", tok_s=f"{tok_s:,.0f}", mfu=f"{scalars['mfu']:.1%}")
                    window_start, window_steps = time.perf_counter(), 0
                if save_now or stop["signal"] is not None:  # a signal may have come in while logging
                    save(step, iterator_state(data))
                if stop["signal"] is not None:
                    break
            checker.flush()
            if stop["signal"] is not None:  # it may also have come in after this step's save
                save(step, iterator_state(data))
    finally:
        bar.close()
        ckpt.close()
        writer.close()
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
    summary.update(
        end_step=step,
        wall_s=time.perf_counter() - started,
        skipped_steps=checker.skipped,
        steps_run=checker.checked,
        training_failed=checker.failed,
        skipped_records=skipped_records(data),
        truncated_conversations=truncation_counts(data),
        checkpoint_dir=ckpt.directory,
        interrupted_by=stop["signal"],
    )
    if stop["signal"] is not None:
        log.warning(
            "%s: checkpoint saved at step %d of %d; run the same command to resume%s",
            signal.Signals(stop["signal"]).name,
            step,
            cfg.steps,
            " (export_hf is written when a run finishes)" if cfg.export_hf else "",
        )
        return summary
    model = nnx.merge(graphdef, params, biases)
    if cfg.sample_tokens and is_main and not isinstance(model_cfg, VLConfig):  # a text prompt: text models only
        with sharding.use_mesh(mesh):  # the model carries its run options (MoE transport included)
            prompt = [tokenizer.bos_id, *tokenizer.encode(cfg.sample_prompt)]
            ids = greedy(model, prompt, cfg.sample_tokens, eos_id=tokenizer.eos_id)
        summary["sample"] = tokenizer.decode(ids[1:])
    if cfg.export_hf:
        dtype = export_dtype(cfg)
        # A LoRA run exports the merged model (W + s * A @ B): the base architecture that transformers loads.
        merged = merge_adapters(model) if cfg.lora.enabled else model
        save_pretrained(merged, cfg.export_hf, dtype=dtype, progress=progress and is_main)
        log.info("Exported the trained model to %s (Hugging Face format, %s)", cfg.export_hf, jnp.dtype(dtype).name)
    if cfg.export_peft:
        save_peft_adapter(model, cfg.export_peft, cfg.lora, base_model=cfg.init_from_hf, write=is_main)
        log.info("Exported the LoRA adapters to %s (PEFT format)", cfg.export_peft)
    return summary


def export_dtype(cfg: TrainConfig):
    """export_dtype=auto: the --init-from-hf checkpoint's own dtype, else bfloat16."""
    name = cfg.export_dtype
    if name == "auto":
        name = (cfg.init_from_hf and saved_dtype(cfg.init_from_hf)) or "bfloat16"
    return jnp.dtype(name)


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    try:
        cfg, args = parse_args(argv)
        use_compile_cache(cfg.compile_cache)  # before anything compiles: JAX decides at its first compile
        initialize_distributed(args)
        check_devices(cfg, args.config)
        summary = train(cfg, args.config)
    except ConfigError as e:
        return fail(str(e), EXIT_CONFIG)
    except RunStopped as e:
        return fail(str(e), e.exit_code)
    if jax.process_index() != 0:
        return exit_code(summary)
    if summary["first_loss"] is not None:
        print(
            f"loss {summary['first_loss']:.4f} -> {summary['last_loss']:.4f} over steps "
            f"{summary['start_step']}..{summary['end_step']} in {summary['wall_s']:.0f} s; "
            f"checkpoint in {summary['checkpoint_dir']}"
        )
    elif summary["steps_run"] == 0:
        print(
            f"already at step {summary['end_step']} (steps={cfg.steps}); checkpoint in "
            f"{summary['checkpoint_dir']}. Raise steps=... to train further."
        )
    if summary["skipped_records"]:
        log.warning("skipped %d bad data records (data.on_bad_record=skip)", summary["skipped_records"])
    cut = summary["truncated_conversations"]
    if cut.get("cut") or cut.get("dropped"):
        log.info(
            "data.format=sft: %d conversations were cut to fit data.seq_len (their latest turns kept) and %d dropped "
            "(nothing supervised fit)",
            cut["cut"],
            cut["dropped"],
        )
    if summary["skipped_steps"]:
        log.warning(
            "%d of %d updates were skipped: their loss or gradient was not finite (nonfinite=skip)",
            summary["skipped_steps"],
            summary["steps_run"],
        )
    if "sample" in summary:
        print(f"sample: {summary['sample']!r}")
    code = exit_code(summary)
    if code == EXIT_NONFINITE:
        fail(
            f"{summary['skipped_steps']} of {summary['steps_run']} updates were skipped as non-finite: the run did "
            "not train. Lower optim.lr or raise optim.warmup_steps (the checkpoint holds the last finite state)",
            code,
        )
    return code


def use_compile_cache(directory: str | None) -> str | None:
    """Turn on JAX's persistent compilation cache in `directory` (compile_cache); returns the directory in use.

    The embedded default for 20 steps took 23.1 s, then 10.6 s the second time: the step and the initialiser come
    from the cache. A directory the user gave JAX (JAX_COMPILATION_CACHE_DIR) stands."""
    if jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir
    if directory is None:
        return None
    path = os.path.expanduser(directory)
    jax.config.update("jax_compilation_cache_dir", path)
    return path


def exit_code(summary: dict) -> int:
    if summary["interrupted_by"] is not None:
        return EXIT_SIGNAL_BASE + summary["interrupted_by"]
    return EXIT_NONFINITE if summary["training_failed"] else 0
