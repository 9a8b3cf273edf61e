"""Independent references: each test recomputes a behaviour from its definition (numpy, or optax primitives), never
from the code under test, so a bug shared by two code paths cannot make both agree.

Every test here is small and fast (seconds on 2 CPU cores) and not marked slow: the mutation check
(`python -m tests.mutation.run`) relies on them to catch the catalogue's deliberate bugs.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from flax import nnx

import pallas_kernels
from ernie_jax.layers import RMSNorm, apply_interleaved_rope
from ernie_jax.model import ErnieForCausalLM
from ernie_jax.moe import MoEBlock, route, router_stats
from ernie_jax.training.config import apply_overrides, load_preset
from ernie_jax.training.losses import chunked_cross_entropy_sum, cross_entropy_sum, router_orthogonal_loss
from ernie_jax.training.optim import lr_schedule, make_optimizer
from ernie_jax.training.state import split_model
from ernie_jax.training.step import make_train_step
from tests.helpers import TINY_MOE, TINY_MOE_INTERVAL

# ------------------------------------------------------------------------------------------------- numpy references


def np_log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def np_logsumexp(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    top = logits.max(axis=-1)
    return top + np.log(np.exp(logits - top[..., None]).sum(axis=-1))


def np_masked_cross_entropy_sum(logits, targets, mask) -> float:
    """sum_t mask_t * -log softmax(logits_t)[target_t]."""
    logp = np_log_softmax(np.asarray(logits))
    picked = np.take_along_axis(logp, np.asarray(targets)[..., None], axis=-1)[..., 0]
    return float(np.sum(-picked * np.asarray(mask, np.float64)))


def np_silu(x):
    return x / (1.0 + np.exp(-x))


def np_swiglu(x, gate, up, down):
    return (np_silu(x @ gate) * (x @ up)) @ down


def np_softmax(logits):
    return np.exp(np_log_softmax(logits))


def np_route(x, router_w, bias, k, norm_min):
    """ERNIE 4.5 routing from its definition: softmax over all experts; top-k of probs + bias picks the experts; the
    mixing weights are the *unbiased* probs of those experts divided by max(their sum, norm_min)."""
    logits = np.asarray(x, np.float64) @ np.asarray(router_w, np.float64)
    probs = np_softmax(logits)
    experts = np.argsort(-(probs + np.asarray(bias, np.float64)), axis=-1, kind="stable")[:, :k]
    chosen = np.take_along_axis(probs, experts, axis=-1)
    weights = chosen / np.maximum(chosen.sum(-1, keepdims=True), norm_min)
    return logits, probs, experts, weights


def np_attention(q, k, v, segment_ids):
    """Causal GQA attention with document masking: query head n reads kv head n // (N / K)."""
    b, t, n, h = q.shape
    kv = k.shape[2]
    group = n // kv
    out = np.zeros((b, t, n, h))
    causal = np.arange(t)[:, None] >= np.arange(t)[None, :]
    for bi in range(b):
        allowed = causal & (segment_ids[bi][:, None] == segment_ids[bi][None, :])
        for head in range(n):
            scores = q[bi, :, head].astype(np.float64) @ k[bi, :, head // group].T.astype(np.float64) / np.sqrt(h)
            scores = np.where(allowed, scores, -np.inf)
            out[bi, :, head] = np_softmax(scores) @ v[bi, :, head // group]
    return out


# -------------------------------------------------------------------------------------------------- cross-entropy


def test_masked_cross_entropy_matches_numpy():
    rng = np.random.RandomState(0)
    logits = rng.randn(2, 8, 11).astype(np.float32) * 3
    targets = rng.randint(0, 11, (2, 8)).astype(np.int32)
    mask = (rng.rand(2, 8) > 0.4).astype(np.float32)
    assert 0 < mask.sum() < mask.size  # both masked and unmasked tokens, so ignoring the mask changes the sum
    expected = np_masked_cross_entropy_sum(logits, targets, mask)
    np.testing.assert_allclose(float(cross_entropy_sum(jnp.asarray(logits), targets, mask)), expected, rtol=1e-6)
    # The chunked loss: h @ head, 2 tokens at a time, must give the same masked sum.
    hidden = rng.randn(2, 8, 5).astype(np.float32)
    head = rng.randn(5, 11).astype(np.float32)
    chunked = chunked_cross_entropy_sum(jnp.asarray(hidden), lambda h: h @ head, targets, mask, chunk=2)
    expected = np_masked_cross_entropy_sum(hidden.astype(np.float64) @ head, targets, mask)
    np.testing.assert_allclose(float(chunked), expected, rtol=1e-5)


# ----------------------------------------------------------------------------------------------- attention, RoPE


def test_attention_matches_numpy_causal_gqa_and_documents():
    rng = np.random.RandomState(1)
    b, t, n, kv, h = 2, 12, 4, 2, 8
    q, k, v = (rng.randn(b, t, heads, h).astype(np.float32) for heads in (n, kv, kv))
    segment_ids = np.array([[1] * 5 + [2] * 7, [1] * 9 + [2] * 2 + [0]], np.int32)
    out = pallas_kernels.flash_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), segment_ids=segment_ids)
    np.testing.assert_allclose(np.asarray(out), np_attention(q, k, v, segment_ids), atol=2e-5, rtol=1e-5)


def test_interleaved_rope_matches_numpy():
    rng = np.random.RandomState(2)
    b, t, n, h, theta = 2, 6, 3, 16, 500000.0
    x = rng.randn(b, t, n, h).astype(np.float32)
    positions = rng.randint(0, 40, (b, t)).astype(np.int32)
    # Pair (2i, 2i+1) rotates by position * theta^(-2i / h).
    inv_freq = theta ** (-np.arange(0, h, 2, dtype=np.float64) / h)
    angle = positions[..., None, None].astype(np.float64) * inv_freq  # [B, T, 1, H/2]
    even, odd = x[..., 0::2].astype(np.float64), x[..., 1::2].astype(np.float64)
    expected = np.empty_like(x, dtype=np.float64)
    expected[..., 0::2] = even * np.cos(angle) - odd * np.sin(angle)
    expected[..., 1::2] = odd * np.cos(angle) + even * np.sin(angle)
    out = apply_interleaved_rope(jnp.asarray(x), jnp.asarray(positions), theta)
    np.testing.assert_allclose(np.asarray(out), expected, atol=3e-5)


def test_rmsnorm_of_bf16_input_is_computed_in_fp32():
    """bf16 activations are normalised in fp32 and rounded once: every output equals the fp32 result rounded to
    bf16, times the weight. Normalising in bf16 rounds x^2, the mean and rsqrt, and is several ulps off."""
    rng = np.random.RandomState(3)
    dim = 256
    norm = RMSNorm(dim, 1e-5, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    weight = (1.0 + 0.2 * rng.randn(dim)).astype(np.float32)
    norm.weight.set_value(jnp.asarray(weight))
    x = (rng.randn(16, dim) * 3 + 0.5).astype(ml_dtypes.bfloat16)
    x64 = x.astype(np.float64)
    normed = x64 / np.sqrt(np.mean(x64 * x64, axis=-1, keepdims=True) + 1e-5)
    # The scale multiplies in fp32 (the weight is fp32), as the model does.
    expected = (weight * normed.astype(ml_dtypes.bfloat16).astype(np.float32)).astype(np.float64)
    out = np.asarray(norm(jnp.asarray(x)), np.float64)
    # Rounding fp32 instead of float64 to bf16 can flip a tie at most, one ulp (2^-8 relative), on rare elements.
    one_ulp = 2.0**-8 * np.abs(expected) + 1e-30
    assert np.all(np.abs(out - expected) <= one_ulp), np.max(np.abs(out - expected) / one_ulp)
    exact = np.mean(out == expected)
    assert exact >= 0.99, f"only {exact:.3f} of the outputs equal the fp32-normalised reference"


# ---------------------------------------------------------------------------------------------- router and MoE


def _router_inputs(n=48, d=16, e=8, seed=4, scale=1.0):
    rng = np.random.RandomState(seed)
    x = rng.randn(n, d).astype(np.float32)
    router_w = (rng.randn(d, e) * scale / np.sqrt(d)).astype(np.float32)
    bias = (rng.randn(e) * 0.3).astype(np.float32)  # big enough to change most selections
    return x, router_w, bias


def test_routing_matches_numpy():
    x, router_w, bias = _router_inputs()
    routing = route(jnp.asarray(x), jnp.asarray(router_w), jnp.asarray(bias), k=2, norm_min=1e-12)
    _, probs, experts, weights = np_route(x, router_w, bias, 2, 1e-12)
    _, _, unbiased_experts, _ = np_route(x, router_w, np.zeros_like(bias), 2, 1e-12)
    assert np.mean(np.sort(experts, -1) != np.sort(unbiased_experts, -1)) > 0.2, "the bias must matter here"
    np.testing.assert_allclose(np.asarray(routing.probs), probs, atol=1e-6)
    np.testing.assert_array_equal(np.sort(np.asarray(routing.experts), -1), np.sort(experts, -1))
    order = np.argsort(np.asarray(routing.experts), -1)  # compare weights expert by expert, whatever the order
    np.testing.assert_allclose(
        np.take_along_axis(np.asarray(routing.weights), order, -1),
        np.take_along_axis(weights, np.argsort(experts, -1), -1),
        atol=1e-6,
    )
    # Near-uniform routing: the chosen probs sum to about k / E = 0.25, under norm_min = 0.5, which then divides.
    x, router_w, bias = _router_inputs(scale=0.05)
    routing = route(jnp.asarray(x), jnp.asarray(router_w), jnp.asarray(bias) * 0, k=2, norm_min=0.5)
    _, _, experts, weights = np_route(x, router_w, np.zeros_like(bias), 2, 0.5)
    assert np.all(weights.sum(-1) < 0.6)  # renormalised to about 0.5, not 1
    np.testing.assert_allclose(np.sort(np.asarray(routing.weights), -1), np.sort(weights, -1), atol=1e-6)


def test_router_losses_match_numpy():
    """Paddle's formulas: aux = E * sum_e (c_e / T) * mean_t p_te with c_e counted from top-k of the *unbiased*
    probs; z = mean_t logsumexp(logits_t)^2; padding excluded from both. Orthogonal: rows of W [E, D]
    L2-normalised, mean over (E, E) of (W W^T - I)^2, summed over layers."""
    x, router_w, bias = _router_inputs(n=40)
    k, e = 2, router_w.shape[1]
    token_mask = np.ones(40, bool)
    token_mask[-7:] = False  # padding
    routing = route(jnp.asarray(x), jnp.asarray(router_w), jnp.asarray(bias), k=k, norm_min=1e-12)
    stats = router_stats(routing, k=k, token_mask=jnp.asarray(token_mask))

    logits, probs, biased, _ = np_route(x[token_mask], router_w, bias, k, 1e-12)
    _, _, unbiased, _ = np_route(x[token_mask], router_w, np.zeros_like(bias), k, 1e-12)
    tokens = token_mask.sum()
    counts = np.bincount(unbiased.reshape(-1), minlength=e)
    aux = e * np.sum(counts / tokens * probs.mean(axis=0))
    z = np.mean(np_logsumexp(logits) ** 2)
    np.testing.assert_allclose(float(stats.aux_loss), aux, rtol=1e-5)
    np.testing.assert_allclose(float(stats.z_loss), z, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(stats.tokens_per_expert), np.bincount(biased.reshape(-1), minlength=e))

    rng = np.random.RandomState(5)
    stacked = rng.randn(3, 16, e).astype(np.float32)  # [layers, D, E] as stored
    expected = 0.0
    for w in stacked:
        rows = w.T.astype(np.float64)  # [E, D]
        rows = rows / np.linalg.norm(rows, axis=-1, keepdims=True)
        expected += np.mean((rows @ rows.T - np.eye(e)) ** 2)
    np.testing.assert_allclose(float(router_orthogonal_loss(jnp.asarray(stacked))), expected, rtol=1e-5)


def test_moe_block_matches_numpy():
    """Routed experts mixed by the routing weights, plus the shared experts added unweighted."""
    cfg = TINY_MOE
    assert cfg.moe_num_shared_experts and not cfg.use_bias
    block = MoEBlock(cfg, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(6))
    rng = np.random.RandomState(6)
    bias = (rng.randn(cfg.moe_num_experts) * 0.05).astype(np.float32)
    block.correction_bias.set_value(jnp.asarray(bias))
    x = rng.randn(2, 10, cfg.hidden_size).astype(np.float32)
    y, _ = block(jnp.asarray(x))

    flat = x.reshape(-1, cfg.hidden_size).astype(np.float64)
    p = {name: np.asarray(getattr(block, name)[...], np.float64) for name in ("router", "w_gate", "w_up", "w_down")}
    _, _, experts, weights = np_route(flat, p["router"], bias, cfg.moe_k, cfg.moe_norm_min)
    expected = np.zeros_like(flat)
    for i, token in enumerate(flat):
        for e, w in zip(experts[i], weights[i], strict=True):
            expected[i] += w * np_swiglu(token, p["w_gate"][e], p["w_up"][e], p["w_down"][e])
    shared = [np.asarray(getattr(block.shared, name)[...], np.float64) for name in ("gate", "up", "down")]
    expected += np_swiglu(flat, *shared)
    np.testing.assert_allclose(np.asarray(y).reshape(flat.shape), expected, atol=1e-5)


# --------------------------------------------------------------------------------------- packing, the train step


# One dense layer then one MoE layer with shared experts: the 21B-A3B layout at its smallest, quick to compile.
SMALL_MOE = TINY_MOE.replace(num_hidden_layers=2, moe_layer_end_index=1)


def tiny_model(cfg=SMALL_MOE, seed=0):
    return ErnieForCausalLM(cfg, rngs=nnx.Rngs(seed), dtype=jnp.float32, param_dtype=jnp.float32)


def _alone_logits(model, docs, t) -> list[np.ndarray]:
    """Each document's logits from the model run on that document alone, with default positions 0..n-1 and no
    segment ids. Documents are right-padded to one length so one compiled call runs them all: under causal
    attention the padding after a document cannot change its logits."""
    ids = np.zeros((len(docs), t), np.int32)
    for row, doc in zip(ids, docs, strict=True):
        row[: len(doc) - 1] = doc[:-1]
    logits = np.asarray(jax.jit(lambda state, x: nnx.merge(*state)(x))(nnx.split(model), ids))
    return [row[: len(doc) - 1] for row, doc in zip(logits, docs, strict=True)]


def _packed_row(lengths, t, vocab, seed):
    """One packed row: documents back to back, segment ids 1.., positions restarting at 0, padding (0) at the end."""
    rng = np.random.RandomState(seed)
    docs = [rng.randint(0, vocab, n + 1).astype(np.int32) for n in lengths]  # n inputs, n targets each
    ids, targets, segs, pos = (np.zeros(t, np.int32) for _ in range(4))
    start = 0
    for s, doc in enumerate(docs, 1):
        n = len(doc) - 1
        ids[start : start + n], targets[start : start + n] = doc[:-1], doc[1:]
        segs[start : start + n], pos[start : start + n] = s, np.arange(n)
        start += n
    return docs, ids, targets, segs, pos


def test_packed_row_logits_equal_each_document_alone():
    model = tiny_model()
    lengths, t = (5, 7, 3), 16
    docs, ids, _, segs, pos = _packed_row(lengths, t, model.config.vocab_size, seed=7)
    packed = jax.jit(lambda state, *a: nnx.merge(*state)(a[0], positions=a[1], segment_ids=a[2]))(
        nnx.split(model), ids[None], pos[None], segs[None]
    )[0]
    start = 0
    for alone, n in zip(_alone_logits(model, docs, t), lengths, strict=True):
        np.testing.assert_allclose(np.asarray(packed[start : start + n]), alone, atol=1e-5)
        start += n


def train_cfg(*overrides):
    """The tiny preset's training settings, without its MTP loss (rows of seq_len tokens); the model itself comes
    from tests.helpers (the step takes a graphdef)."""
    return apply_overrides(load_preset("tiny"), ["mtp.depth=0", *overrides])


def batch_of(rows):
    keys = ("input_ids", "targets", "segment_ids", "positions")
    batch = {key: jnp.asarray(np.stack([r[i] for r in rows])) for i, key in enumerate(keys)}
    batch["loss_mask"] = (batch["segment_ids"] > 0).astype(jnp.float32)
    return batch


def test_train_step_loss_on_packed_rows_equals_documents_alone():
    """The step's CE is the mean over real tokens of each document's own next-token loss, computed here from the
    model run on each document alone: attention must not cross documents and positions must restart."""
    model = tiny_model()
    cfg = train_cfg("moe_loss.aux_loss_coef=0", "moe_loss.z_loss_coef=0", "moe_loss.ortho_loss_coef=0")
    rows, ce_sum, tokens = [], 0.0, 0
    for seed, lengths in ((8, (6, 4, 5)), (9, (9, 7))):
        docs, *row = _packed_row(lengths, 16, model.config.vocab_size, seed)
        rows.append(row)
        for doc, logits in zip(docs, _alone_logits(model, docs, 16), strict=True):
            ce_sum += np_masked_cross_entropy_sum(logits, doc[1:], 1.0)
            tokens += len(doc) - 1
    graphdef, params, biases = split_model(model)
    optimizer = optax.sgd(0.0)
    step = jax.jit(make_train_step(graphdef, cfg, optimizer))
    _, _, _, metrics = step(params, biases, optimizer.init(params), batch_of(rows), jnp.int32(0))
    assert float(metrics["tokens"]) == tokens
    np.testing.assert_allclose(float(metrics["ce"]), ce_sum / tokens, rtol=1e-5)


def _random_rows(n, t, vocab, seed):
    return [_packed_row((t // 2, t // 2 - 1), t, vocab, seed + i)[1:] for i in range(n)]


def test_grad_accumulation_equals_one_big_batch():
    """With plain SGD (update = -lr * grad, so the parameters show the gradient itself) at a non-zero learning rate,
    two micro-batches of 2 rows must give the step of one batch of 4 rows. Router aux/z terms are per-micro-batch
    means by design (not linear in the batch), so they are off here; the orthogonal term is parameter-only."""
    model = tiny_model()
    graphdef, params, biases = split_model(model)
    batch = batch_of(_random_rows(4, 16, model.config.vocab_size, seed=10))
    optimizer = optax.sgd(0.5)
    results = {}
    for accum in (1, 2):
        cfg = train_cfg(f"optim.grad_accum={accum}", "moe_loss.aux_loss_coef=0", "moe_loss.z_loss_coef=0")
        step = jax.jit(make_train_step(graphdef, cfg, optimizer))
        results[accum] = step(params, biases, optimizer.init(params), batch, jnp.int32(5))
    (p1, b1, _, m1), (p2, b2, _, m2) = results[1], results[2]
    np.testing.assert_allclose(float(m2["loss"]), float(m1["loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(m2["grad_norm"]), float(m1["grad_norm"]), rtol=1e-4)
    moved = jax.tree.map(lambda new, old: float(jnp.max(jnp.abs(new - old))), p1, params)
    assert max(jax.tree.leaves(moved)) > 1e-3, "the step must move the parameters for the comparison to mean anything"
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6), p2, p1)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), b2, b1)


def test_nonfinite_step_leaves_params_optimizer_state_and_biases_unchanged():
    model = tiny_model()
    graphdef, params, biases = split_model(model)
    cfg = train_cfg("nonfinite=skip", "optim.warmup_steps=0")
    optimizer = make_optimizer(cfg.optim, 10, params)
    opt_state = optimizer.init(params)
    batch = batch_of(_random_rows(2, 16, model.config.vocab_size, seed=11))
    batch["loss_mask"] = batch["loss_mask"].at[0, 3].set(jnp.nan)  # a poisoned token: loss and grads non-finite
    step = jax.jit(make_train_step(graphdef, cfg, optimizer))
    new_params, new_biases, new_opt_state, metrics = step(params, biases, opt_state, batch, jnp.int32(3))
    assert not bool(metrics["finite"])
    for new, old in ((new_params, params), (new_biases, biases), (new_opt_state, opt_state)):
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), new, old)


# ------------------------------------------------------------------------------------------------------ optimizer

# Which parameters decay, from their role (not from the code's rule): matrices decay; norm scales and biases do not.
DECAYED = {"embed", "lm_head", "wq", "wk", "wv", "wo", "gate", "up", "down", "router", "w_gate", "w_up", "w_down"}
NOT_DECAYED = {"weight", "bq", "bk", "bv", "bo", "gate_bias", "up_bias", "down_bias", "lm_head_bias"}


def np_schedule(i: int, *, lr, warmup, total, decay, min_ratio) -> float:
    """Linear warmup from 0 over `warmup` steps, then decay to min_ratio * lr over the remaining steps."""
    warmup = min(warmup, total - 1)
    if i < warmup:
        return lr * i / warmup
    span = max(total - warmup, 1)
    frac = min(i - warmup, span) / span
    if decay == "cosine":
        return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + np.cos(np.pi * frac)))
    if decay == "linear":
        return lr + (lr * min_ratio - lr) * frac
    return lr


@pytest.mark.parametrize("decay", ["cosine", "linear"])
def test_lr_schedule_matches_formula(decay):
    optim = dataclasses.replace(load_preset("tiny").optim, lr=2e-3, warmup_steps=4, decay=decay, min_lr_ratio=0.1)
    schedule = lr_schedule(optim, 12)
    for i in range(14):
        expected = np_schedule(i, lr=2e-3, warmup=4, total=12, decay=decay, min_ratio=0.1)
        np.testing.assert_allclose(float(schedule(i)), expected, rtol=1e-6, atol=1e-12, err_msg=f"step {i}")


def test_adamw_with_schedule_clipping_and_decay_mask_matches_numpy():
    """Four AdamW steps on gradients of varying size, against the textbook update written out here: global-norm
    clipping, bias-corrected moments, decoupled weight decay on matrices only, learning rate schedule(step)."""
    model = tiny_model(TINY_MOE_INTERVAL)  # biases everywhere, untied head: every kind of parameter
    _, params, _ = split_model(model)
    lr, wd, b1, b2, eps, clip, total, warmup = 1e-2, 0.1, 0.9, 0.95, 1e-8, 1.0, 6, 2
    optim = dataclasses.replace(
        load_preset("tiny").optim,
        lr=lr,
        warmup_steps=warmup,
        decay="cosine",
        min_lr_ratio=0.1,
        weight_decay=wd,
        b1=b1,
        b2=b2,
        eps=eps,
        clip_norm=clip,
    )
    optimizer = make_optimizer(optim, total, params)
    state = optimizer.init(params)
    update = jax.jit(optimizer.update)

    key = lambda path: tuple(str(p) for p in path)
    flat = [(key(path), np.asarray(v.get_value(), np.float64)) for path, v in nnx.to_flat_state(params)]
    names = {path[-1] for path, _ in flat}
    assert names <= DECAYED | NOT_DECAYED, f"classify new parameters: {names - DECAYED - NOT_DECAYED}"
    assert names & NOT_DECAYED and names & DECAYED
    expected = {path: value for path, value in flat}
    m = {path: np.zeros_like(v) for path, v in flat}
    v2 = {path: np.zeros_like(v) for path, v in flat}
    rng = np.random.RandomState(12)
    for i, scale in enumerate((30.0, 0.01, 3.0, 0.5)):  # above and below the clip norm
        # fp32 gradients, and the same values in float64 for the reference.
        grads_np = {path: (rng.randn(*v.shape) * scale).astype(np.float32).astype(np.float64) for path, v in flat}
        grads = nnx.map_state(lambda path, var, g=grads_np: var.replace(jnp.asarray(g[key(path)], jnp.float32)), params)
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)

        norm = np.sqrt(sum(np.sum(g * g) for g in grads_np.values()))
        factor = min(1.0, clip / norm)
        rate = np_schedule(i, lr=lr, warmup=warmup, total=total, decay="cosine", min_ratio=0.1)
        for path in expected:
            g = grads_np[path] * factor
            m[path] = b1 * m[path] + (1 - b1) * g
            v2[path] = b2 * v2[path] + (1 - b2) * g * g
            adam = (m[path] / (1 - b1 ** (i + 1))) / (np.sqrt(v2[path] / (1 - b2 ** (i + 1))) + eps)
            decay = wd * expected[path] if path[-1] in DECAYED else 0.0
            expected[path] = expected[path] - rate * (adam + decay)
        for path, value in nnx.to_flat_state(params):
            np.testing.assert_allclose(
                np.asarray(value.get_value()), expected[key(path)], atol=2e-6, rtol=1e-5, err_msg=f"step {i}: {path}"
            )
