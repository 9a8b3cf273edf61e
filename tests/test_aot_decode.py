"""`python -m ernie_jax.aot --decode` compiles one KV-cache decode step of a3b for a TPU slice on this CPU host."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.tpu


def test_reduced_a3b_decode_step_fits_with_the_cache_it_should_have():
    pytest.importorskip("libtpu", reason="TPU AOT compiles need the tpu extra (libtpu)")
    from ernie_jax.tools import aot_report as aot
    from ernie_jax.tools.aot_decode import decode_report, default_decode_mesh
    from ernie_jax.training.config import apply_overrides, load_preset

    model = apply_overrides(load_preset("a3b_tpu"), ["model.num_hidden_layers=2", "model.moe_layer_end_index=1"]).model
    gen, name, chips = aot.resolve_topology("v5p-8")
    sizes = default_decode_mesh(model, chips)
    assert sizes == {"data": 1, "expert": 4}  # 64 experts over 4 chips: weights read in place, not gathered
    batch, cache = 16, 512
    r = decode_report(model, aot.topology_devices(name), gen, batch=batch, cache=cache, mesh_sizes=sizes)
    assert r["fits"] and r["chips"] == 4
    # Keys and values of every layer, bf16, the rows split over the 4 batch shards, K/V heads not repeated.
    kv = 2 * model.num_hidden_layers * (batch // 4) * cache * model.num_key_value_heads * model.resolved_head_dim * 2
    assert kv <= r["bytes_per_chip"]["kv_cache"] <= kv + 1024  # plus the per-row start slots and the fill count
    # Routed experts are split over the chips: each holds well under the whole model.
    assert r["bytes_per_chip"]["weights"] < 0.6 * model.num_params() * 2
    # The compiled step cannot beat reading its weights and cache once.
    assert r["roofline_tokens_per_s_per_chip"] <= r["hbm_bound_tokens_per_s_per_chip"] * 1.01
