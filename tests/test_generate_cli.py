"""`python -m ernie_jax.generate`: a tiny random model with the real ERNIE 4.5 tokenizer files, run in-process."""

from __future__ import annotations

import io
import os
from pathlib import Path

import jax.numpy as jnp
import pytest

import ernie_jax
from ernie_jax.generate import main
from tests.helpers import TINY_DENSE, hf_model, save_hf

# $ERNIE_TOKENIZER_DIR, else ../shared/data/ERNIE-4.5-0.3B-Base beside the repository root (as test_tokenizer.py)
DEFAULT_TOKENIZER_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ERNIE-4.5-0.3B-Base"
TOKENIZER_DIR = Path(os.environ.get("ERNIE_TOKENIZER_DIR", DEFAULT_TOKENIZER_DIR))
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    """Weights of a tiny dense model over the real vocabulary, beside links to the real tokenizer files."""
    if not (TOKENIZER_DIR / "tokenizer.model").is_file():
        pytest.skip(f"no ERNIE 4.5 tokenizer files at {TOKENIZER_DIR} (ERNIE_TOKENIZER_DIR may name a checkpoint dir)")
    path = Path(save_hf(hf_model(TINY_DENSE.replace(vocab_size=103424)), tmp_path_factory.mktemp("cli")))
    for name in TOKENIZER_FILES:
        (path / name).symlink_to(TOKENIZER_DIR / name)
    released = '{"do_sample": true, "top_p": 0.8, "temperature": 0.8, "eos_token_id": 2}'  # as the -Base file
    (path / "generation_config.json").write_text(released)
    return path


def run(argv, lines=None) -> str:
    out = io.StringIO()
    assert main(argv, out=out, lines=lines) == 0
    return out.getvalue()


def test_prompt_streams_the_greedy_continuation(checkpoint_dir, capsys):
    argv = ["--model", str(checkpoint_dir), "--prompt", "Hello world", "--max-new-tokens", "6", "--temperature", "0"]
    text = run(argv)
    model = ernie_jax.from_pretrained(checkpoint_dir, dtype=jnp.float32, progress=False)
    tokenizer = ernie_jax.Tokenizer.from_pretrained(checkpoint_dir)
    prompt = [tokenizer.bos_token_id, *tokenizer.encode("Hello world", add_special_tokens=False)]
    new = ernie_jax.generate(model, [prompt], max_new_tokens=6, temperature=0.0, eos_token_id=2)[0]
    assert text == tokenizer.decode([t for t in new if t != 2], skip_special_tokens=True) + "\n"
    assert "tokens in" in capsys.readouterr().err


def test_chat_keeps_the_conversation(checkpoint_dir):
    argv = ["--model", str(checkpoint_dir), "--chat", "--max-new-tokens", "5", "--seed", "1"]
    text = run(argv, lines=["Hi there", "And again?"])
    assert text.count("\n") >= 2  # one reply per line read
    assert run(argv, lines=["Hi there", "And again?"]) == text  # sampling from generation_config.json, seeded


def test_mesh_option_gives_the_single_device_text(checkpoint_dir):
    """--mesh: weights loaded sharded, the MoE-free model's batch and cache over 8 CPU devices, tokens streamed."""
    argv = ["--model", str(checkpoint_dir), "--prompt", "Hello world", "--max-new-tokens", "6", "--temperature", "0"]
    assert run([*argv, "--mesh", "data=2,fsdp=2,tensor=2"]) == run(argv)
