"""ERNIE 4.5 VL logits match transformers' Ernie4_5_VLMoeForConditionalGeneration live, on small random checkpoints.

transformers builds and saves each checkpoint (its save_pretrained writes the released tensor layout); we load it
and compare fp32 logits on text only, one image, two images of different sizes (with a left-padded row), a video,
and a video next to an image. Worst differences are printed with a `[vl-parity]` tag:
    python -m pytest tests/test_vl_parity.py -q -s
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ernie_jax.vl as vl
from tests.helpers import assert_close

VOCAB = 256
IMG, IMG_START, IMG_END, VID, VID_START, VID_END = 250, 251, 252, 253, 254, 255
TOKEN_IDS = dict(
    image_token_id=IMG,
    image_start_token_id=IMG_START,
    image_end_token_id=IMG_END,
    video_token_id=VID,
    video_start_token_id=VID_START,
    video_end_token_id=VID_END,
)
TEXT = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rope_parameters={"rope_type": "default", "rope_theta": 500000.0, "mrope_section": [3, 3, 2]},
    moe_num_experts=4,
    moe_k=2,
    moe_intermediate_size=[32, 16],
    moe_num_shared_experts=1,
)
VISION = dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=64, patch_size=2, in_channels=3)
PATCH_DIM = 3 * 2 * 2
VARIANTS = {
    # 28B-A3B layout, shrunk: dense first layer, shared experts, tied head.
    "base": dict(text={}, top={}),
    # Biases everywhere, no shared experts, untied head, MoE and dense layers interleaved, explicit head_dim.
    "bias_untied": dict(
        text=dict(
            use_bias=True,
            moe_num_shared_experts=0,
            mlp_layer_types=["sparse", "dense", "sparse"],
            head_dim=24,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 4, 4]},
        ),
        top=dict(tie_word_embeddings=False),
    ),
}


def hf_vl_model(text_overrides: dict, top_overrides: dict, seed: int = 0):
    """A transformers VL model with every tensor random (norms near 1, correction biases that change selections)."""
    import torch
    from transformers import Ernie4_5_VLMoeConfig, Ernie4_5_VLMoeForConditionalGeneration

    cfg = Ernie4_5_VLMoeConfig(
        text_config={**TEXT, **text_overrides}, vision_config=VISION, **TOKEN_IDS, **top_overrides
    )
    torch.manual_seed(seed)
    model = Ernie4_5_VLMoeForConditionalGeneration(cfg).float().eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and name.endswith("weight"):  # every 1-D weight is a norm's scale
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith("e_score_correction_bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))  # router probs differ by ~0.05 here
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:  # weights: unit-variance outputs, so logits are O(1) and every tensor matters
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)
    return model


@dataclasses.dataclass
class Case:
    ids: np.ndarray  # [B, T]
    mm_types: np.ndarray  # [B, T] 0 text, 1 image, 2 video placeholders
    attention_mask: np.ndarray | None = None
    image_grid: np.ndarray | None = None
    pixel_values: np.ndarray | None = None
    video_grid: np.ndarray | None = None
    pixel_values_videos: np.ndarray | None = None


def vl_row(parts, rng) -> tuple[list[int], list[int]]:
    """parts: int n = n random text tokens; ("image" | "video", n) = start, n placeholders, end."""
    ids, types = [], []
    for part in parts:
        if isinstance(part, int):
            ids += rng.randint(0, 200, part).tolist()
            types += [0] * part
        else:
            kind, n = part
            token, start, end, kind_id = (
                (IMG, IMG_START, IMG_END, 1) if kind == "image" else (VID, VID_START, VID_END, 2)
            )
            ids += [start] + [token] * n + [end]
            types += [0] + [kind_id] * n + [0]
    return ids, types


def random_patches(grid, rng) -> np.ndarray:
    return rng.randn(int(np.prod(grid, axis=-1).sum()), PATCH_DIM).astype(np.float32)


def make_cases() -> dict[str, Case]:
    rng = np.random.RandomState(7)
    cases = {"text_only": Case(ids=rng.randint(0, 200, (2, 12)), mm_types=np.zeros((2, 12), np.int64))}
    ids, types = vl_row([3, ("image", 6), 4], rng)  # one 4x6-patch image -> 2x3 merged tokens
    grid = np.array([[1, 4, 6]])
    cases["one_image"] = Case(
        np.array([ids]), np.array([types]), image_grid=grid, pixel_values=random_patches(grid, rng)
    )
    # Row 0: two images of different sizes (4x6 and 2x4 patches); row 1: a 6x4 image, left-padded to the same length.
    ids0, types0 = vl_row([2, ("image", 6), 3, ("image", 2), 2], rng)
    ids1, types1 = vl_row([2, ("image", 6), 2], rng)
    pad = len(ids0) - len(ids1)
    grid = np.array([[1, 4, 6], [1, 2, 4], [1, 6, 4]])
    cases["two_images_padded"] = Case(
        ids=np.array([ids0, [0] * pad + ids1]),
        mm_types=np.array([types0, [0] * pad + types1]),
        attention_mask=np.array([[1] * len(ids0), [0] * pad + [1] * len(ids1)]),
        image_grid=grid,
        pixel_values=random_patches(grid, rng),
    )
    ids, types = vl_row([3, ("video", 8), 3], rng)  # 4 frames of 4x4 patches -> 2 x (2x2) tokens
    grid = np.array([[4, 4, 4]])
    cases["video"] = Case(
        np.array([ids]), np.array([types]), video_grid=grid, pixel_values_videos=random_patches(grid, rng)
    )
    ids, types = vl_row([2, ("video", 4), 2, ("image", 2), 2], rng)  # 2 frames of 4x4; a 2x4 image
    image_grid, video_grid = np.array([[1, 2, 4]]), np.array([[2, 4, 4]])
    cases["video_and_image"] = Case(
        np.array([ids]),
        np.array([types]),
        image_grid=image_grid,
        pixel_values=random_patches(image_grid, rng),
        video_grid=video_grid,
        pixel_values_videos=random_patches(video_grid, rng),
    )
    return cases


CASES = make_cases()


def hf_logits(model, case: Case, moe_types: np.ndarray | None) -> np.ndarray:
    import torch

    t = lambda a: None if a is None else torch.as_tensor(a)
    has_vision = case.image_grid is not None or case.video_grid is not None
    with torch.no_grad():
        out = model(
            input_ids=t(case.ids),
            attention_mask=t(case.attention_mask),
            mm_token_type_ids=t(case.mm_types) if has_vision else None,
            moe_mm_token_type_ids=t(moe_types),
            pixel_values=t(case.pixel_values),
            image_grid_thw=t(case.image_grid),
            pixel_values_videos=t(case.pixel_values_videos),
            video_grid_thw=t(case.video_grid),
        )
    return out.logits.float().numpy()


def jitted_forward(case: Case):
    """A jitted `model(...)` for one case. Everything that sets shapes (grids, token types, the mask) is a host
    constant, so the model's own default path (3D positions from the token types) runs at trace time."""
    has_vision = case.image_grid is not None or case.video_grid is not None

    @nnx.jit
    def forward(model, ids, pixel_values, pixel_values_videos, moe_types):
        return model(
            ids,
            attention_mask=case.attention_mask,
            mm_token_type_ids=case.mm_types if has_vision else None,
            moe_mm_token_type_ids=moe_types,
            pixel_values=pixel_values,
            image_grid_thw=case.image_grid,
            pixel_values_videos=pixel_values_videos,
            video_grid_thw=case.video_grid,
        )

    def run(model, moe_types):
        as_jnp = lambda a: None if a is None else jnp.asarray(a)
        return np.asarray(
            forward(
                model,
                jnp.asarray(case.ids),
                as_jnp(case.pixel_values),
                as_jnp(case.pixel_values_videos),
                as_jnp(moe_types),
            )  # fmt: skip
        )

    return run


def compare(name: str, ours: np.ndarray, ref: np.ndarray, mask: np.ndarray | None) -> float:
    if mask is not None:  # padded positions attend to nothing real; transformers leaves them unspecified
        keep = mask.astype(bool)
        ours, ref = ours[keep], ref[keep]
    scale = float(np.abs(ref).max())
    assert scale > 1.0, f"{name}: reference logits too small ({scale}) for the comparison to mean anything"
    diff = assert_close(ours, ref, np.float32, name)
    print(f"[vl-parity] {name}: max|dlogit|={diff:.2e} (max|logit|={scale:.2f})")
    return diff


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for name, spec in VARIANTS.items():
        hf = hf_vl_model(spec["text"], spec["top"])
        path = tmp_path_factory.mktemp(f"vl_{name}")
        hf.save_pretrained(path)
        out[name] = (str(path), hf, vl.from_pretrained(path, dtype=jnp.float32, progress=False))
    return out


@pytest.fixture(scope="module")
def forwards():
    return {name: jitted_forward(case) for name, case in CASES.items()}


@pytest.mark.parametrize("case_name", list(CASES))
def test_vl_logits_match_transformers(checkpoints, forwards, case_name):
    _, hf, model = checkpoints["base"]
    case = CASES[case_name]
    has_vision = case.image_grid is not None or case.video_grid is not None
    moe_types = vl.moe_token_types(case.ids, model.config) if has_vision else None
    compare(case_name, forwards[case_name](model, moe_types), hf_logits(hf, case, moe_types), case.attention_mask)


def test_vl_variant_bias_untied_interleaved(checkpoints, forwards):
    _, hf, model = checkpoints["bias_untied"]
    for case_name in ("one_image", "video"):
        case = CASES[case_name]
        moe_types = vl.moe_token_types(case.ids, model.config)
        ours = forwards[case_name](model, moe_types)
        compare(f"bias_untied/{case_name}", ours, hf_logits(hf, case, moe_types), case.attention_mask)


def test_vl_hard_gate_routes_vision_tokens_to_vision_experts(checkpoints, forwards):
    """Without moe_mm_token_type_ids every token takes the text pool (transformers' behaviour, matched here), and
    that changes the logits: the vision pool really serves the image tokens."""
    _, hf, model = checkpoints["base"]
    case = CASES["one_image"]
    text_pool_only = np.zeros_like(case.ids)
    ours_text_only = forwards["one_image"](model, text_pool_only)
    compare("one_image/text_pool_only", ours_text_only, hf_logits(hf, case, None), None)
    gated = forwards["one_image"](model, vl.moe_token_types(case.ids, model.config))
    assert np.abs(gated - ours_text_only).max() > 1e-2, "the vision pool made no difference"


def test_vl_correction_biases_change_routing(checkpoints, forwards):
    """Each pool's correction bias is read and used: zeroing it moves the logits of the tokens that pool serves."""
    _, _, model = checkpoints["base"]
    for pool, case_name in (("text", "text_only"), ("vision", "one_image")):
        case = CASES[case_name]
        moe_types = vl.moe_token_types(case.ids, model.config)
        ref = forwards[case_name](model, moe_types)
        graphdef, state = nnx.split(model)
        unbiased = nnx.merge(graphdef, jax.tree.map(lambda x: x, state))  # a copy to edit
        for group in unbiased.groups:
            if group.kind == "sparse":
                bias = getattr(group.layer.ffn, pool).correction_bias
                bias[...] = jnp.zeros_like(bias[...])
        moved = float(np.abs(forwards[case_name](unbiased, moe_types) - ref).max())
        assert moved > 1e-3, f"zeroing the {pool} correction bias changed nothing ({moved})"


def test_vl_bf16_forward(checkpoints, forwards):
    """bf16 parameters and compute (routers stay fp32): as close to our fp32 logits as transformers' own bf16 run is to
    its fp32 one. Not elementwise: in bf16 an occasional near-tie in a router flips an expert for one token."""
    import torch
    from transformers import Ernie4_5_VLMoeForConditionalGeneration

    path, hf, model32 = checkpoints["base"]
    model = vl.from_pretrained(path, dtype=jnp.bfloat16, progress=False)
    assert model.groups[1].layer.ffn.vision.router[...].dtype == jnp.float32
    assert model.groups[1].layer.ffn.vision.w_gate[...].dtype == jnp.bfloat16
    hf16 = Ernie4_5_VLMoeForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16).eval()
    case = CASES["one_image"]
    moe_types = vl.moe_token_types(case.ids, model.config)
    ours = np.abs(
        forwards["one_image"](model, moe_types).astype(np.float32) - forwards["one_image"](model32, moe_types)
    )
    theirs = np.abs(hf_logits(hf16, case, moe_types) - hf_logits(hf, case, moe_types))
    print(
        f"[vl-parity] bf16 vs fp32, one_image: ours median|dlogit|={np.median(ours):.1e} max={ours.max():.1e}; "
        f"transformers median={np.median(theirs):.1e} max={theirs.max():.1e}"
    )
    assert np.median(ours) <= 2 * np.median(theirs) + 1e-3


def test_vl_host_inputs_are_checked(checkpoints):
    """Grids and token types set shapes: a traced one, or a grid that does not match the placeholders, is refused
    with a message (before any compute)."""
    _, _, model = checkpoints["base"]
    case = CASES["one_image"]
    with pytest.raises(ValueError, match=r"6 image placeholder tokens .* \[\[1, 4, 4\]\] gives 4 tokens"):
        model(jnp.asarray(case.ids), pixel_values=jnp.zeros((16, PATCH_DIM)), image_grid_thw=np.array([[1, 4, 4]]),
              mm_token_type_ids=case.mm_types)  # fmt: skip
    traced = jax.jit(
        lambda types: model(
            jnp.asarray(case.ids),
            pixel_values=jnp.asarray(case.pixel_values),
            image_grid_thw=case.image_grid,
            mm_token_type_ids=types,
        )
    )
    with pytest.raises(TypeError, match="mm_token_type_ids must be a concrete"):
        traced(jnp.asarray(case.mm_types))


def test_vl_rope_index_matches_transformers(checkpoints):
    import torch

    _, hf, _ = checkpoints["base"]
    for name, case in CASES.items():
        if case.image_grid is None and case.video_grid is None:
            continue
        t = lambda a: None if a is None else torch.as_tensor(a)
        ref, _ = hf.model.get_rope_index(
            t(case.ids), t(case.mm_types), t(case.image_grid), t(case.video_grid), t(case.attention_mask)
        )
        ours = vl.rope_index(
            case.mm_types,
            case.image_grid,
            case.video_grid,
            case.attention_mask,
            spatial_merge_size=2,
            temporal_merge_size=2,
        )
        np.testing.assert_array_equal(ours, ref.numpy(), err_msg=name)


def test_vl_save_pretrained_round_trip(checkpoints, forwards, tmp_path):
    """Our save_pretrained -> transformers from_pretrained gives the same tensors and logits (exactly)."""
    import torch
    from transformers import Ernie4_5_VLMoeForConditionalGeneration

    for variant in VARIANTS:
        _, hf, model = checkpoints[variant]
        out = tmp_path / variant
        vl.save_pretrained(model, out, progress=False)
        reloaded = Ernie4_5_VLMoeForConditionalGeneration.from_pretrained(out).float().eval()
        ref_state, new_state = hf.state_dict(), reloaded.state_dict()
        assert set(ref_state) == set(new_state)
        for key, value in ref_state.items():
            torch.testing.assert_close(new_state[key], value, rtol=0, atol=0, msg=key)
        case = CASES["video_and_image"]
        moe_types = vl.moe_token_types(case.ids, model.config)
        diff = float(np.abs(hf_logits(reloaded, case, moe_types) - hf_logits(hf, case, moe_types)).max())
        assert diff == 0.0
        ours = vl.from_pretrained(out, dtype=jnp.float32, progress=False)
        same = forwards["video_and_image"](ours, moe_types) - forwards["video_and_image"](model, moe_types)
        print(f"[vl-parity] round trip {variant}: transformers max|dlogit|={diff:.1e}, ours {np.abs(same).max():.1e}")
        assert np.abs(same).max() == 0.0
