"""VL SFT: {"images", "messages"} rows -> the ids, pixels and grids transformers' tokenizer and image processor give;
packed rows through the model equal each conversation alone on the transformers-exact path; and the one trainer
(`ernie_jax.train` with data.format=vl_sft) lowers the loss on the 8-device mesh, both expert pools expert-parallel,
and resumes from its checkpoint."""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ernie_jax.vl as vl
from ernie_jax.data import DataConfig, make_iterator
from ernie_jax.data.sources import BadRecordError, JsonRecord
from ernie_jax.training.config import apply_overrides, load_preset
from ernie_jax.vl.sft import VLConversationEncoder
from tests.helpers import assert_close

REAL = os.environ.get(
    "ERNIE_TOKENIZER_DIR",
    os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "ERNIE-4.5-0.3B-Base"),
)
pytestmark = pytest.mark.skipif(not os.path.isdir(REAL), reason=f"no ERNIE 4.5 tokenizer files at {REAL}")
# The VL checkpoints' image tokens past the text tokenizer's added tokens (transformers' defaults for the ids).
VL_TOKENS = {"<|IMAGE_START|>": 101304, "<|IMAGE_END|>": 101305, "<|VIDEO_START|>": 101306, "<|VIDEO_END|>": 101307}
# Small images: 56 x 56 (16 patches) up to 112 x 112 (64 patches) pixels.
PREPROCESSOR = {"patch_size": 14, "merge_size": 2, "temporal_patch_size": 1, "min_pixels": 56 * 56,
                "max_pixels": 112 * 112, "image_processor_type": "Ernie4_5_VLMoeImageProcessor"}  # fmt: skip


@pytest.fixture(scope="module")
def vl_dir(tmp_path_factory):
    """A VL tokenizer directory: ERNIE's text tokenizer plus the image tokens, and a preprocessor config."""
    out = tmp_path_factory.mktemp("vl_tokenizer")
    for name in ("tokenizer.model", "special_tokens_map.json", "tokenizer_config.json", "added_tokens.json"):
        shutil.copy(os.path.join(REAL, name), out / name)
    added = json.loads((out / "added_tokens.json").read_text())
    (out / "added_tokens.json").write_text(json.dumps({**added, **VL_TOKENS}))
    config = json.loads((out / "tokenizer_config.json").read_text())
    config.pop("auto_map", None)
    config["extra_special_tokens"] = {
        "image_token": "<|IMAGE_PLACEHOLDER|>",
        "image_start_token": "<|IMAGE_START|>",
        "image_end_token": "<|IMAGE_END|>",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    (out / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    from PIL import Image

    rng = np.random.default_rng(0)
    for name, (h, w) in {"a.png": (70, 98), "b.png": (112, 56), "c.png": (56, 56)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(out / name)
    return out


def rows() -> list[dict]:
    image = {"type": "image"}
    return [
        {"images": ["a.png"], "messages": [
            {"role": "user", "content": [image, {"type": "text", "text": "What is in the picture?"}]},
            {"role": "assistant", "content": "Noise, in colour."}]},
        {"images": ["b.png", "c.png"], "messages": [
            {"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": "Compare <|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|> and "
                                        "<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>."},
            {"role": "assistant", "content": "Different."}]},
        {"messages": [{"role": "user", "content": "Hello?"}, {"role": "assistant", "content": "Hi there."}]},
    ]  # fmt: skip


def encoder(vl_dir, seq_len=256, max_patches=256) -> VLConversationEncoder:
    from ernie_jax.tokenizer import Tokenizer

    processor = vl.ImageProcessor.from_pretrained(vl_dir)
    return VLConversationEncoder(Tokenizer.from_pretrained(vl_dir), seq_len, max_patches, processor)


def test_a_row_is_what_transformers_tokenizer_and_image_processor_give(vl_dir):
    """input_ids: the chat template's text with each image placeholder repeated grid.prod() / merge**2 times, as
    transformers' Ernie4_5_VLMoeProcessor writes it, through transformers' tokenizer; pixels and grids from its
    image processor; 3D positions as its model computes them; loss on the reply (and its end, learned as EOS)."""
    transformers = pytest.importorskip("transformers")
    from PIL import Image
    from transformers.models.ernie4_5_vl_moe.image_processing_pil_ernie4_5_vl_moe import (
        Ernie4_5_VLMoeImageProcessorPil,
    )

    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(vl_dir)
    hf_images = Ernie4_5_VLMoeImageProcessorPil(**PREPROCESSOR)
    enc = encoder(vl_dir)
    row = rows()[1]
    out = enc(JsonRecord(row, f"{vl_dir}/c.jsonl:2"))

    images = [Image.open(vl_dir / name) for name in row["images"]]
    ref = hf_images(images, return_tensors="np")
    # The prompt and the reply are tokenized apart (as the text SFT rows: the reply as generation meets it).
    prompt = hf_tokenizer.apply_chat_template(row["messages"][:-1], tokenize=False, add_generation_prompt=True)
    reply_text = hf_tokenizer.apply_chat_template(row["messages"], tokenize=False)[len(prompt) :]
    pieces = prompt.split(hf_tokenizer.image_token)
    counts = [int(np.prod(g)) // 4 for g in ref["image_grid_thw"]]
    expanded = pieces[0] + "".join(hf_tokenizer.image_token * n + p for n, p in zip(counts, pieces[1:], strict=True))
    encode = lambda text: hf_tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = encode(expanded) + encode(reply_text)
    assert out["input_ids"].tolist() == ids[:-1]
    assert (
        (out["input_ids"] == hf_tokenizer.image_token_id).sum() == sum(counts) == 8 + 4
    )  # 112 x 56 and 56 x 56 pixels
    assert out["targets"].tolist() == [*ids[1:-1], 2]  # the reply's <|end_of_sentence|> is learned as EOS (id 2)
    reply = hf_tokenizer("Different.", add_special_tokens=False)["input_ids"]
    assert out["loss_mask"].tolist() == [0] * (len(ids) - 2 - len(reply)) + [1] * (len(reply) + 1)
    np.testing.assert_allclose(out["pixel_values"], ref["pixel_values"], atol=1e-6, rtol=0)
    grid = ref["image_grid_thw"]
    np.testing.assert_array_equal(np.bincount(out["patch_image"])[1:], np.prod(grid, axis=-1))

    types = (out["input_ids"] == hf_tokenizer.image_token_id).astype(np.int64)[None]
    hf_positions = hf_rope_index(types, grid)
    np.testing.assert_array_equal(np.stack([out["positions"], out["positions_h"], out["positions_w"]]), hf_positions)
    gate = np.isin(out["input_ids"], [hf_tokenizer.image_token_id, *VL_TOKENS.values()])
    np.testing.assert_array_equal(out["token_types"], gate.astype(np.int32))


def hf_rope_index(types: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """transformers' 3D positions [3, T] for one row (its model's get_rope_index, on a tiny model)."""
    import torch
    from transformers import Ernie4_5_VLMoeConfig, Ernie4_5_VLMoeModel

    from tests.test_vl_parity import TEXT, TOKEN_IDS, VISION

    model = Ernie4_5_VLMoeModel(Ernie4_5_VLMoeConfig(text_config=TEXT, vision_config=VISION, **TOKEN_IDS))
    positions, _ = model.get_rope_index(
        torch.zeros(types.shape, dtype=torch.long), mm_token_type_ids=torch.as_tensor(types),
        image_grid_thw=torch.as_tensor(grid),
    )  # fmt: skip
    return positions[:, 0].numpy()


@pytest.mark.parametrize(
    "change, says",
    [
        (lambda r: r.update(images=["a.png", "b.png"]), "'images' lists 2 image(s) but the messages hold 1"),
        (lambda r: r.update(images="a.png"), "'images' must be a list of image file paths"),
        (lambda r: r.update(images=["missing.png"]), "'images': "),
        (lambda r: r["messages"][0]["content"].append({"type": "audio"}), "content parts are"),
    ],
)
def test_bad_rows_name_the_row_and_the_key(vl_dir, change, says):
    row = rows()[0]
    change(row)
    with pytest.raises(BadRecordError, match=rf"c\.jsonl:7: .*{__import__('re').escape(says)}"):
        encoder(vl_dir)(JsonRecord(row, f"{vl_dir}/c.jsonl:7"))


def test_conversations_that_do_not_fit_a_row_are_dropped_and_counted(vl_dir):
    enc = encoder(vl_dir, max_patches=16)  # a.png (70 x 98 pixels) becomes 4 x 8 patches
    assert enc(JsonRecord(rows()[0], f"{vl_dir}/c.jsonl:1")) is None
    assert enc(JsonRecord(rows()[2], f"{vl_dir}/c.jsonl:3")) is not None
    assert (enc.cut, enc.dropped) == (0, 1)


def _write_rows(path, n: int) -> str:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps(rows()[i % 3]) + "\n")
    return str(path)


def tiny_model_config():
    return load_preset("vl_tiny").model


@pytest.mark.slow  # each conversation alone runs the model eagerly: about 35 s on 2 cores
def test_packed_rows_equal_each_conversation_alone(vl_dir):
    """The trainer's packed path (several conversations and their images per row, static shapes, jitted) gives
    every conversation the logits of the transformers-exact path run on that conversation alone."""
    src = _write_rows(vl_dir / "pack.jsonl", 6)
    # 96 patches: a row packs the three conversations (32 + 48 + 0 patches) and no more.
    data = DataConfig(sources=(src,), tokenizer=str(vl_dir), format="vl_sft", seq_len=256, vision_patches=96,
                      global_batch_size=1, shuffle=False)  # fmt: skip
    batch = next(make_iterator(data))
    assert batch["segment_ids"].max() == 3 and (batch["patch_frames"] > 0).sum() == 80
    model = vl.ErnieVLForConditionalGeneration(tiny_model_config(), rngs=nnx.Rngs(0))
    packed = nnx.jit(
        lambda m, b: m(b["input_ids"], **{k: v for k, v in b.items() if k not in ("input_ids", "targets", "loss_mask")})
    )
    logits = np.asarray(packed(model, {k: jnp.asarray(v) for k, v in batch.items()}))
    enc, worst = encoder(vl_dir), 0.0
    for row in range(1):
        seg = batch["segment_ids"][row]
        for s in range(1, seg.max() + 1):
            at = seg == s
            ids = batch["input_ids"][row][at][None]
            frames = batch["patch_frames"][row]
            images = sorted(set(frames[frames > 0].tolist()))
            # This conversation's images, found by its placeholders' count: rebuild its grids from patch positions.
            mine = [f for f in images if _conversation_of(batch, row, f) == s]
            kwargs = {}
            if mine:
                grids = np.array([[1, batch["patch_rows"][row][frames == f].max() + 1,
                                   batch["patch_cols"][row][frames == f].max() + 1] for f in mine])  # fmt: skip
                pixels = np.concatenate([batch["pixel_values"][row][frames == f] for f in mine])
                kwargs = dict(pixel_values=jnp.asarray(pixels), image_grid_thw=grids,
                              mm_token_type_ids=(ids == enc.image_token_id).astype(np.int32))  # fmt: skip
            alone = np.asarray(model(jnp.asarray(ids), moe_mm_token_type_ids=batch["token_types"][row][at][None],
                                     **kwargs))[0]  # fmt: skip
            worst = max(worst, assert_close(logits[row][at], alone, np.float32, f"row {row} conversation {s}"))
    print(f"[vl-sft] packed rows vs each conversation alone: max|dlogit|={worst:.2e}")


def _conversation_of(batch, row: int, frame: int) -> int:
    """The packed conversation (segment) whose placeholders the frame's tokens fill: the k-th image of the row
    belongs to the segment holding the row's k-th placeholder run."""
    ids, seg = batch["input_ids"][row], batch["segment_ids"][row]
    is_image = ids == 100295
    starts = np.flatnonzero(is_image & ~np.concatenate([[False], is_image[:-1]]))
    return int(seg[starts[frame - 1]])


@pytest.mark.slow  # three trainer runs (each compiles the step on 8 devices): about 3 minutes on 2 cores
def test_vl_sft_trains_on_the_mesh_with_both_pools_expert_parallel_and_resumes(vl_dir, tmp_path):
    from ernie_jax.training import loop

    src = _write_rows(vl_dir / "train.jsonl", 12)  # next to its images
    overrides = [
        f"data.sources={src}",
        f"data.tokenizer={vl_dir}",
        "data.vision_patches=256",
        "data.global_batch_size=8",
        "mesh.data=2",
        "mesh.expert=4",  # 8 experts per pool: 2 of each pool on every expert shard
        "steps=8",
        "optim.warmup_steps=2",
        "optim.decay=constant",  # the schedule of the first 4 steps must not depend on `steps` (4, then 8)
        "log_every=1",
        "checkpoint.every=4",
        "checkpoint.async_save=false",
        f"run_dir={tmp_path / 'run'}",
    ]
    cfg = apply_overrides(load_preset("vl_tiny"), overrides)
    first = loop.train(apply_overrides(cfg, ["steps=4"]), "vl_tiny", progress=False)
    assert first["start_step"] == 0 and first["end_step"] == 4
    resumed = loop.train(cfg, "vl_tiny", progress=False)
    assert resumed["start_step"] == 4 and resumed["end_step"] == 8
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [x["ce"] for x in lines]
    print(f"[vl-sft] CE per step on 8 devices (data 2 x expert 4): {' '.join(f'{v:.3f}' for v in losses)}")
    assert [x["step"] for x in lines] == list(range(1, 9))
    assert losses[-1] < losses[0] - 1.0, losses  # 11.43 -> 9.41 when written (ln 103424 = 11.55 at random)
    assert all(np.isfinite(x["aux_loss"]) and x["aux_loss"] > 0 for x in lines)
    # The resumed run is the uninterrupted one: params, optimizer, router biases and the data position restored.
    straight = loop.train(apply_overrides(cfg, [f"run_dir={tmp_path / 'straight'}"]), "vl_tiny", progress=False)
    assert straight["last_loss"] == resumed["last_loss"]
    # Both pools route on every MoE layer: text and vision rows of the expert load (2 MoE layers x 2 pools).
    assert len(lines[-1]["load_imbalance"]) == 4
    assert jax.device_count() == 8


@pytest.mark.slow  # a transformers checkpoint, a short run and an export: about 40 s on 2 cores
def test_vl_sft_from_a_transformers_checkpoint_exports_what_transformers_loads(vl_dir, tmp_path):
    """--init-from-hf of a VL checkpoint transformers wrote, a few SFT steps, export_hf: transformers loads the
    export and its logits equal ours on it; training changed them."""
    import torch
    from transformers import Ernie4_5_VLMoeConfig, Ernie4_5_VLMoeForConditionalGeneration

    import ernie_jax
    from ernie_jax.training import loop

    text = dict(vocab_size=103424, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=1024, moe_num_experts=8, moe_k=2,
                moe_intermediate_size=[32, 16], moe_num_shared_experts=1,
                rope_parameters={"rope_type": "default", "mrope_section": [3, 3, 2]})  # fmt: skip
    vision = dict(depth=2, hidden_size=64, num_heads=4, intermediate_size=128, patch_size=14)
    torch.manual_seed(0)
    base = Ernie4_5_VLMoeForConditionalGeneration(Ernie4_5_VLMoeConfig(text_config=text, vision_config=vision))
    base.float().save_pretrained(tmp_path / "base")
    src = _write_rows(vl_dir / "export.jsonl", 12)
    overrides = [
        f"init_from_hf={tmp_path / 'base'}",
        f"data.sources={src}",
        f"data.tokenizer={vl_dir}",
        "steps=3",
        "checkpoint.async_save=false",
        f"run_dir={tmp_path / 'run'}",
        f"export_hf={tmp_path / 'out'}",
    ]
    loop.train(apply_overrides(load_preset("vl_tiny"), overrides), "vl_tiny", progress=False)

    ids = np.random.RandomState(0).randint(0, 1000, (1, 16))
    exported = Ernie4_5_VLMoeForConditionalGeneration.from_pretrained(tmp_path / "out").float().eval()
    with torch.no_grad():
        ref, before = (m(input_ids=torch.as_tensor(ids)).logits.numpy() for m in (exported, base.eval()))
    ours = np.asarray(ernie_jax.from_pretrained(tmp_path / "out", dtype=jnp.float32, progress=False)(jnp.asarray(ids)))
    diff = assert_close(ours, ref, np.float32, "export")
    print(f"[vl-sft] export after VL SFT, ours vs transformers: max|dlogit|={diff:.2e}")
    assert np.abs(ref - before).max() > 0.1  # the steps changed the model that was exported


def test_packed_rows_on_the_mesh_equal_one_device(vl_dir):
    """The trainer's packed path on 8 devices (data 2 x expert 4: rows split, both expert pools expert-parallel)
    gives one device's logits and per-pool router losses."""
    import sharding

    src = _write_rows(vl_dir / "mesh.jsonl", 24)
    data = DataConfig(sources=(src,), tokenizer=str(vl_dir), format="vl_sft", seq_len=128, vision_patches=96,
                      global_batch_size=8, shuffle=False)  # fmt: skip
    batch = {k: jnp.asarray(v) for k, v in next(make_iterator(data)).items()}
    assert int((batch["patch_frames"] > 0).sum()) > 0 and int((batch["token_types"] > 0).sum()) > 0
    model = vl.ErnieVLForConditionalGeneration(tiny_model_config(), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)

    def forward(state, batch):
        inputs = {k: v for k, v in batch.items() if k not in ("input_ids", "targets", "loss_mask")}
        logits, aux = nnx.merge(graphdef, state)(batch["input_ids"], return_aux=True, **inputs)
        return logits, vl.modality_router_losses(aux["router_stats"])

    logits, losses = jax.jit(forward)(state, batch)
    mesh = sharding.make_mesh(data=2, expert=4)
    with sharding.use_mesh(mesh):
        mesh_logits, mesh_losses = jax.jit(forward)(sharding.shard_state(state, mesh), batch)
    worst = assert_close(mesh_logits, logits, np.float32, "packed logits on the mesh")
    for name, value in losses.items():
        assert_close(mesh_losses[name], value, np.float32, name)
    assert losses["vision_aux_loss"] > 0 and losses["text_aux_loss"] > 0
    print(f"[vl-sft] packed rows, data 2 x expert 4 vs one device: max|dlogit|={worst:.2e}")


@pytest.mark.parametrize(
    "preset, overrides, says",
    [
        ("vl_tiny", ["data.vision_patches=250"], "data.vision_patches: 250 must be a multiple of"),
        ("vl_tiny", ["data.format=sft"], "data.format: vl_sft trains a VL model"),
        ("tiny", ["data.format=vl_sft", "data.vision_patches=64"], "data.format: vl_sft trains a VL model"),
        ("vl_tiny", ["lora.rank=8"], "lora.rank: LoRA is not there yet for VL models"),
        ("vl_tiny", ["data.vision_patches=0"], "vision_patches must be > 0 with format=vl_sft"),
        ("vl_tiny", ["model.text.num_hidden_layers=4"], "mlp_layer_types=dense,sparse,sparse,sparse"),
    ],
)
def test_bad_vl_run_configs_name_the_key_and_the_fix(preset, overrides, says):
    from ernie_jax.config import ConfigError

    with pytest.raises(ConfigError, match=__import__("re").escape(says)):
        apply_overrides(load_preset(preset), overrides)
