"""`python -m ernie_jax.generate --model DIR [--chat] [--prompt TEXT]`: generate or chat from a checkpoint directory.

`ernie_jax.generate(model, prompts, ...)` is the API (ernie_jax/generation/); `from ernie_jax.generate import
greedy` is the trainer's sample. This module is callable as `generate` itself, because importing it makes
`ernie_jax.generate` name the module rather than the function (a submodule import rebinds the package attribute).

The command loads the weights, the checkpoint's tokenizer and its generation_config.json (sampling and EOS
defaults), then continues `--prompt` (or each line of standard input), streaming the text as it is decoded. With
`--chat` the prompt goes through the checkpoint's own chat template, and the conversation is kept across lines.
After each reply it reports the number of tokens and the decode speed on standard error.
"""

from __future__ import annotations

import argparse
import sys
import time
import types

from ernie_jax.generation import GenerationConfig, generate, greedy
from ernie_jax.options import MOE_TRANSPORTS

__all__ = ["GenerationConfig", "generate", "greedy", "main"]


class _CallableModule(types.ModuleType):
    """`ernie_jax.generate(...)` keeps working after `import ernie_jax.generate` rebinds the package attribute."""

    def __call__(self, *args, **kwargs):
        return generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule


class StreamPrinter:
    """Writes a row's text as tokens arrive from the decode loop. One instance serves a whole session: the stream
    function is part of the compiled loop's cache key, so a new one per reply would recompile."""

    def __init__(self, tokenizer, out, stop_ids: tuple[int, ...]):
        self.tokenizer, self.out, self.stop_ids = tokenizer, out, stop_ids
        self.reset()

    def reset(self):
        self.ids: list[int] = []
        self.printed = ""
        self.times: list[float] = []

    def __call__(self, tokens: list[int | None]) -> None:
        token = tokens[0]
        if token is None:
            return
        self.times.append(time.perf_counter())
        if token in self.stop_ids:
            return
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for its next byte piece
            return
        self.out.write(text[len(self.printed) :])
        self.out.flush()
        self.printed = text

    def decode_tokens_per_second(self) -> float | None:
        """Tokens per second between the second and the last token: the first comes from the prefill and the
        second waits for the decode loop's compile on a first call."""
        if len(self.times) < 3 or self.times[-1] <= self.times[1]:
            return None
        return (len(self.times) - 2) / (self.times[-1] - self.times[1])


def parse_args(argv=None) -> argparse.Namespace:

    parser = argparse.ArgumentParser(prog="python -m ernie_jax.generate", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint directory: config.json, safetensors, tokenizer")
    parser.add_argument("--prompt", help="text to continue (the first user message with --chat); else stdin lines")
    parser.add_argument("--chat", action="store_true", help="apply the checkpoint's chat template; keep history")
    parser.add_argument("--system", help="system message (with --chat)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, help="0 is greedy (default: generation_config.json)")
    parser.add_argument("--top-k", type=int, help="default: generation_config.json")
    parser.add_argument("--top-p", type=float, help="default: generation_config.json")
    parser.add_argument("--repetition-penalty", type=float, help="default: generation_config.json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto", help="auto: fp32 on CPU")
    parser.add_argument("--mesh", help="mesh axis sizes, e.g. data=2,expert=4 (default: one device)")
    parser.add_argument("--moe-transport", choices=MOE_TRANSPORTS, help="default: allgather (the only one on CPU)")
    parser.add_argument(
        "--quantize", choices=("int8", "nf4"), help="store the decoder's matmul weights quantized (ernie_jax.quant)"
    )
    return parser.parse_args(argv)


def parse_mesh(text: str) -> dict[str, int]:
    sizes = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        if not value.strip().lstrip("-").isdigit():
            raise SystemExit(f"--mesh: expected axis=size items such as data=2,expert=4, got {item!r}")
        sizes[name.strip()] = int(value)
    return sizes


def main(argv=None, out=None, lines=None) -> int:
    """Run the command; `out` (stdout) receives the generated text, `lines` (stdin) the prompts without --prompt."""
    import jax
    import jax.numpy as jnp

    import ernie_jax
    import sharding

    args = parse_args(argv)
    out = sys.stdout if out is None else out
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}.get(args.dtype)
    if dtype is None:
        dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    mesh = sharding.make_mesh(**parse_mesh(args.mesh)) if args.mesh else None
    model = ernie_jax.from_pretrained(args.model, dtype=dtype, mesh=mesh, progress=False, quantize=args.quantize)
    tokenizer = ernie_jax.Tokenizer.from_pretrained(args.model)
    config = GenerationConfig.from_pretrained(args.model) or GenerationConfig()
    eos_ids = set(config.eos_token_id or ()) | {tokenizer.eos_token_id}
    if args.chat:  # the chat template closes each assistant turn with its sep token
        eos_ids.add(tokenizer.token_to_id(tokenizer.special_tokens.get("sep_token", "<|end_of_sentence|>")))
    eos_ids.discard(None)
    printer = StreamPrinter(tokenizer, out, tuple(sorted(eos_ids)))
    options = dict(
        max_new_tokens=args.max_new_tokens,
        eos_token_id=printer.stop_ids,
        generation_config=config,
        mesh=mesh,
        moe_transport=args.moe_transport,
    )
    for name in ("temperature", "top_k", "top_p", "repetition_penalty"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    messages = [{"role": "system", "content": args.system}] if args.chat and args.system else []
    prompts = [args.prompt] if args.prompt is not None else (line.rstrip("\n") for line in (lines or sys.stdin))
    for text in prompts:
        if args.chat:
            messages.append({"role": "user", "content": text})
            prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        else:
            prompt_ids = [tokenizer.bos_token_id, *tokenizer.encode(text, add_special_tokens=False)]
        printer.reset()
        start = time.perf_counter()
        new_ids = generate(model, [prompt_ids], seed=args.seed, stream=printer, **options)[0]
        jax.effects_barrier()  # every streamed token has been printed
        seconds = time.perf_counter() - start
        out.write("\n")
        out.flush()
        if args.chat:
            reply = tokenizer.decode([t for t in new_ids if t not in printer.stop_ids], skip_special_tokens=True)
            messages.append({"role": "assistant", "content": reply})
        speed = printer.decode_tokens_per_second()
        print(
            f"[{len(new_ids)} tokens in {seconds:.2f} s" + (f", decode {speed:.1f} tokens/s]" if speed else "]"),
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
