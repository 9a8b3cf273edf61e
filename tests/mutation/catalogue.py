"""The mutation catalogue: deliberate, plausible bugs, each with the tests that must catch it.

Each entry replaces one exact snippet of one file (it must occur exactly once, so an entry whose code moved is
reported STALE, never silently skipped) and names the pytest targets (files or node ids) to run against the
mutant. Targets are chosen to be fast and not marked slow or tpu: the quick suite must catch every entry.
Run with `python -m tests.mutation.run` (see tests/mutation/run.py).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    original: str
    replacement: str
    tests: tuple[str, ...]
    why: str  # the real bug this stands for


REF = "tests/test_references.py::"
RUNS = "tests/test_references_runs.py::"
RAGGED = "tests/test_ragged_transport.py::"
QUANT = "tests/test_quant.py::"

MUTATIONS: tuple[Mutation, ...] = (
    # ------------------------------------------------------------------------------------ from issue 11
    Mutation(
        "ce_ignores_loss_mask",
        "ernie_jax/training/losses.py",
        "return jnp.sum((log_z - target_logit) * mask)",
        "return jnp.sum(log_z - target_logit)",
        (REF + "test_masked_cross_entropy_matches_numpy",),
        "padding and cross-document targets are trained on",
    ),
    Mutation(
        "step_drops_segment_ids_and_positions",
        "ernie_jax/training/step.py",
        """            positions=main["positions"],
            segment_ids=main["segment_ids"],
""",
        "",
        (REF + "test_train_step_loss_on_packed_rows_equals_documents_alone",),
        "attention crosses packed documents and positions run on across them",
    ),
    Mutation(
        "grad_accum_keeps_last_micro_batch",
        "ernie_jax/training/step.py",
        "return jax.tree.map(jnp.add, carry, (grads, metrics)), None",
        "return (grads, metrics), None",
        (REF + "test_grad_accumulation_equals_one_big_batch",),
        "only the last micro-batch's gradient is applied",
    ),
    Mutation(
        "nonfinite_step_applied",
        "ernie_jax/training/step.py",
        "keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)",
        "keep = lambda new, old: new",
        (REF + "test_nonfinite_step_leaves_params_optimizer_state_and_biases_unchanged",),
        "a NaN step poisons the parameters, the Adam moments and the router biases",
    ),
    Mutation(
        "init_from_hf_ignored",
        "ernie_jax/training/state.py",
        """    if cfg.init_from_hf:
        model = from_pretrained(""",
        """    if False:
        model = from_pretrained(""",
        (RUNS + "test_init_from_hf_with_no_update_exports_the_checkpoint_logits",),
        "--init-from-hf silently trains from a random init",
    ),
    Mutation(
        "aux_loss_without_E_factor",
        "ernie_jax/moe/routing.py",
        "aux = e * jnp.sum(",
        "aux = jnp.sum(",
        (REF + "test_router_losses_match_numpy",),
        "the load-balance loss is E times too small",
    ),
    Mutation(
        "z_loss_not_squared",
        "ernie_jax/moe/routing.py",
        "jax.nn.logsumexp(routing.logits, axis=-1) ** 2 * mask",
        "jax.nn.logsumexp(routing.logits, axis=-1) * mask",
        (REF + "test_router_losses_match_numpy",),
        "the router z-loss is mean logsumexp, not its square",
    ),
    Mutation(
        "ragged_a2a_wrong_local_expert",
        "ernie_jax/moe/expert_parallel.py",
        "return expert_start[None] + source_start",
        "return (jnp.cumsum(kept.sum(2), axis=0) - kept.sum(2))[:, :, None] + jnp.cumsum(kept, axis=2) - kept",
        (RAGGED + "test_ragged_transport_matches_dense_oracle",),
        "received rows land by source, not by local expert, so the wrong local expert computes them",
    ),
    Mutation(
        "ragged_a2a_cut_block_sent_from_wrong_offset",
        "ernie_jax/moe/expert_parallel.py",
        "expert_offsets = (jnp.cumsum(all_counts, axis=1) - all_counts).reshape(ep, ep, e_loc)",
        "expert_offsets = (jnp.cumsum(kept.reshape(ep, -1), axis=1) - kept.reshape(ep, -1)).reshape(ep, ep, e_loc)",
        (RAGGED + "test_bounded_buffer_drops_exactly_the_overflow",),
        "after a cut segment, a bounded buffer sends rows from the wrong place in the send buffer",
    ),
    # Not a mutation: dropping the `kept` bound in _kept_segments is equivalent (a cut only happens when the
    # receiver is full, every later source sends nothing, so the segments it would change lie past the buffer).
    Mutation(
        "ragged_a2a_drops_not_counted",
        "ernie_jax/moe/expert_parallel.py",
        "dropped = (wanted[me].sum() - traffic[me].sum()).astype(jnp.float32)",
        "dropped = jnp.zeros((), jnp.float32)",
        (RAGGED + "test_bounded_buffer_drops_exactly_the_overflow",),
        "assignments a bounded buffer dropped are not reported (moe_dropped reads 0)",
    ),
    Mutation(
        "rmsnorm_in_bf16",
        "ernie_jax/layers.py",
        "x32 = x.astype(jnp.float32)",
        "x32 = x",
        (REF + "test_rmsnorm_of_bf16_input_is_computed_in_fp32",),
        "bf16 activations are normalised in bf16 (transformers normalises in fp32)",
    ),
    # ------------------------------------------------------------------------------------ our own
    Mutation(
        "rope_rotate_half_pairs",
        "ernie_jax/layers.py",
        """pairs = x.astype(jnp.float32).reshape(b, t, n, h // 2, 2)
    even, odd = pairs[..., 0], pairs[..., 1]""",
        """pairs = x.astype(jnp.float32).reshape(b, t, n, 2, h // 2)
    even, odd = pairs[..., 0, :], pairs[..., 1, :]""",
        (REF + "test_interleaved_rope_matches_numpy",),
        "Llama's rotate-half pairs (i, i + H/2) instead of ERNIE's interleaved (2i, 2i+1)",
    ),
    Mutation(
        "rope_inv_freq_exponent",
        "ernie_jax/layers.py",
        "exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim",
        "exponents = jnp.arange(0, head_dim // 2, dtype=jnp.float32) / head_dim",
        (REF + "test_interleaved_rope_matches_numpy",),
        "frequencies theta^(-i/H) instead of theta^(-2i/H)",
    ),
    Mutation(
        "router_weights_from_biased_scores",
        "ernie_jax/moe/routing.py",
        "chosen = jnp.take_along_axis(probs, experts, axis=-1)",
        "chosen = jnp.take_along_axis(probs + correction_bias.astype(jnp.float32), experts, axis=-1)",
        (REF + "test_routing_matches_numpy", REF + "test_moe_block_matches_numpy"),
        "the correction bias leaks into the mixing weights (it must affect selection only)",
    ),
    Mutation(
        "router_selection_ignores_bias",
        "ernie_jax/moe/routing.py",
        "jax.lax.top_k(probs + correction_bias.astype(jnp.float32), k)",
        "jax.lax.top_k(probs, k)",
        (REF + "test_routing_matches_numpy", REF + "test_moe_block_matches_numpy"),
        "the aux-free correction bias never changes which experts are chosen",
    ),
    Mutation(
        "renormalise_without_norm_min",
        "ernie_jax/moe/routing.py",
        "weights = chosen / jnp.maximum(chosen.sum(axis=-1, keepdims=True), norm_min)",
        "weights = chosen / chosen.sum(axis=-1, keepdims=True)",
        (REF + "test_routing_matches_numpy",),
        "moe_norm_min ignored in the renormalisation",
    ),
    Mutation(
        "shared_experts_weighted",
        "ernie_jax/moe/block.py",
        "y = y + self.shared(flat, dropout_key)",
        "y = y + 0.5 * self.shared(flat, dropout_key)",
        (REF + "test_moe_block_matches_numpy",),
        "shared experts scaled down (ERNIE adds them unweighted)",
    ),
    Mutation(
        "aux_counts_from_biased_selection",
        "ernie_jax/moe/routing.py",
        "_, unbiased = jax.lax.top_k(routing.probs, k)",
        "unbiased = routing.experts",
        (REF + "test_router_losses_match_numpy",),
        "the aux loss counts the biased selection (Paddle recounts top-k on the unbiased probs)",
    ),
    Mutation(
        "router_stats_ignore_padding",
        "ernie_jax/moe/routing.py",
        "mask = jnp.ones((n,), jnp.float32) if token_mask is None else token_mask.astype(jnp.float32)",
        "mask = jnp.ones((n,), jnp.float32)",
        (REF + "test_router_losses_match_numpy",),
        "padding tokens count in the load, the aux loss and the z-loss",
    ),
    Mutation(
        "ortho_loss_rows_not_normalised",
        "ernie_jax/training/losses.py",
        "w = w / jnp.maximum(jnp.linalg.norm(w, axis=-1, keepdims=True), 1e-12)",
        "w = w",
        (REF + "test_router_losses_match_numpy",),
        "the orthogonal loss on raw rows (Paddle L2-normalises each expert row)",
    ),
    Mutation(
        "causal_mask_off_by_one",
        "pallas_kernels/flash_attention/reference.py",
        "mask = (jnp.arange(t)[:, None] + (s - t)) >= jnp.arange(s)[None, :]",
        "mask = (jnp.arange(t)[:, None] + (s - t)) > jnp.arange(s)[None, :]",
        (REF + "test_attention_matches_numpy_causal_gqa_and_documents",),
        "a token cannot attend to itself",
    ),
    Mutation(
        "gqa_wrong_kv_head",
        "pallas_kernels/flash_attention/reference.py",
        'qh = jnp.einsum("BTKGH->BKGTH", q.reshape(b, t, kv, g, h)).reshape(b, kv, g * t, h)  # [B, K, M, H]',
        'qh = jnp.einsum("BTGKH->BKGTH", q.reshape(b, t, g, kv, h)).reshape(b, kv, g * t, h)  # [B, K, M, H]',
        (REF + "test_attention_matches_numpy_causal_gqa_and_documents",),
        "query head n reads kv head n % K instead of n // (N / K)",
    ),
    Mutation(
        "causal_blocks_drop_the_diagonal_key",
        "pallas_kernels/flash_attention/blocked.py",
        "visible = s - t + stop  # the block's last query sits at key position visible - 1",
        "visible = s - t + stop - 1  # the block's last query sits at key position visible - 1",
        ("tests/test_attention_blocked.py::test_blocked_matches_twin",),
        "a query block is handed one key too few, so the XLA path sees a shifted causal window",
    ),
    Mutation(
        "weight_decay_on_vectors",
        "ernie_jax/layers.py",
        "decay = len(shape) >= 2 if weight_decay is None else weight_decay",
        "decay = True if weight_decay is None else weight_decay",
        (REF + "test_adamw_with_schedule_clipping_and_decay_mask_matches_numpy",),
        "RMSNorm scales and vector biases decay towards zero",
    ),
    Mutation(
        "weight_decay_on_head_biases",
        "ernie_jax/layers.py",
        "no_decay = dict(weight_decay=False)",
        "no_decay = dict(weight_decay=True)",
        (REF + "test_adamw_with_schedule_clipping_and_decay_mask_matches_numpy",),
        "attention biases, stored per head as [N, H] matrices, decay like weights",
    ),
    Mutation(
        "lr_warmup_off_by_one",
        "ernie_jax/training/optim.py",
        "warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))",
        "warmup = min(cfg.warmup_steps + 1, max(total_steps - 1, 0))",
        (REF + "test_lr_schedule_matches_formula",),
        "warmup one step too long, every later step's lr shifted",
    ),
    Mutation(
        "clip_elementwise_not_global_norm",
        "ernie_jax/training/optim.py",
        "chain.append(optax.clip_by_global_norm(cfg.clip_norm))",
        "chain.append(optax.clip(cfg.clip_norm))",
        (REF + "test_adamw_with_schedule_clipping_and_decay_mask_matches_numpy",),
        "gradients clipped element by element, changing their direction",
    ),
    Mutation(
        "bias_update_sign_flipped",
        "ernie_jax/moe/block.py",
        "jnp.sign(jnp.mean(load, axis=-1, keepdims=True) - load)",
        "jnp.sign(load - jnp.mean(load, axis=-1, keepdims=True))",
        ("tests/test_train.py::test_aux_free_bias_moves_toward_balance",),
        "the aux-free update pushes more tokens to overloaded experts",
    ),
    Mutation(
        "packing_positions_not_restarting",
        "ernie_jax/data/pipeline.py",
        'positions=batch["positions"] if vision else batch["input_ids_positions"],',
        'positions=batch["positions"] if vision else np.broadcast_to(np.arange(segment_ids.shape[1]), segment_ids.shape),',  # noqa: E501
        ("tests/test_data.py::test_packing_reconstructs_documents_exactly",),
        "a packed document's positions continue from the previous document's",
    ),
    Mutation(
        "restore_drops_optimizer_state",
        "ernie_jax/training/checkpointing.py",
        'opt_state=restored["opt_state"],',
        "opt_state=opt_state,",
        (RUNS + "test_checkpoint_restore_returns_the_saved_optimizer_state",),
        "a resume restarts Adam from zero moments and step 0",
    ),
    Mutation(
        "resume_restarts_data_stream",
        "ernie_jax/training/loop.py",
        "        data = restore_iterator(",
        "        _ignored = restore_iterator(",
        (RUNS + "test_resume_onto_another_mesh_continues_the_uninterrupted_run",),
        "a resumed run trains on the first batches again instead of continuing the stream",
    ),
    Mutation(
        "export_resets_router_biases",
        "ernie_jax/training/loop.py",
        "    model = nnx.merge(graphdef, params, biases)\n",
        "    model = nnx.merge(graphdef, params, jax.tree.map(jnp.zeros_like, biases))\n",
        (RUNS + "test_export_equals_the_trained_checkpoint",),
        "the export writes the initial router correction biases, not the trained ones",
    ),
    Mutation(
        "export_ignores_export_dtype",
        "ernie_jax/training/loop.py",
        "save_pretrained(merged, cfg.export_hf, dtype=dtype,",
        "save_pretrained(merged, cfg.export_hf, dtype=jnp.bfloat16,",
        (RUNS + "test_export_equals_the_trained_checkpoint",),
        "export_dtype=float32 still writes bf16 (the export no longer equals the trained model)",
    ),
    Mutation(
        "processes_read_same_documents",
        "ernie_jax/data/pipeline.py",
        "[(0 if by_rows else process_index) :: readers]",
        "[0::readers]",
        (RUNS + "test_processes_read_disjoint_parts_of_one_stream",),
        "every process reads the first process's documents (issue 11: every process reading the same rows)",
    ),
    Mutation(
        "processes_take_same_rows",
        "ernie_jax/data/pipeline.py",
        "out = out.map(_TakeRows(process_index * batch, (process_index + 1) * batch))",
        "out = out.map(_TakeRows(0, batch))",
        (RUNS + "test_processes_read_disjoint_parts_of_one_stream",),
        'with process_sharding="rows", every process trains on the global batch\'s first rows',
    ),
    # ------------------------------------------------------------------------------------ from issue 12
    Mutation(
        "orthogonal_loss_over_every_parameter",
        "ernie_jax/training/losses.py",
        "nnx.filter_state(params, RouterWeight)",
        "nnx.filter_state(params, nnx.Param)",
        ("tests/test_param_roles.py::test_orthogonal_loss_selects_routers_by_type_not_name",),
        "the router role selected too widely: every matrix pushed towards orthogonal rows",
    ),
    Mutation(
        "hf_save_drops_unnamed_parameters",
        "ernie_jax/hf/transfer.py",
        '    check_names_cover(flat, maps, "save_pretrained")\n',
        "",
        ("tests/test_param_roles.py::test_hf_name_map_refuses_a_parameter_it_cannot_name",),
        "an added module's weights silently left out of an export",
    ),
    Mutation(
        "run_options_lost_by_with_options",
        "ernie_jax/model.py",
        "            node.options = options\n",
        "            pass\n",
        ("tests/test_param_roles.py::test_with_options_reaches_every_module",),
        "generation on a mesh asks for another MoE transport and silently runs the trained one",
    ),
    # ------------------------------------------------------------------------------------ issues 13 and 14: quant
    Mutation(
        "int8_scale_per_input_channel",
        "ernie_jax/quant.py",
        "quantize_int8(value, tuple(range(first_in, value.ndim - out_ndim)))",
        "quantize_int8(value, tuple(range(value.ndim - out_ndim, value.ndim)))",
        (QUANT + "test_int8_round_trip_per_output_channel",),
        "int8 scales reduced over the wrong axes: one scale per input row instead of per output channel",
    ),
    Mutation(
        "int8_dequant_forgets_the_scale",
        "ernie_jax/quant.py",
        "return (codes.astype(jnp.float32) * scales).astype(dtype)",
        "return codes.astype(dtype)",
        (QUANT + "test_int8_round_trip_per_output_channel", QUANT + "test_quantized_forward_against_fp32"),
        "int8 codes used as weights, unscaled",
    ),
    Mutation(
        "nf4_levels_off_by_one",
        "ernie_jax/quant.py",
        "values = jnp.asarray(NF4_LEVELS)[index.astype(jnp.int32)].reshape(shape)",
        "values = jnp.asarray(NF4_LEVELS)[jnp.minimum(index.astype(jnp.int32) + 1, 15)].reshape(shape)",
        (QUANT + "test_nf4_round_trip_per_block",),
        "NF4 indices read one level up the table",
    ),
    Mutation(
        "nf4_nibbles_swapped",
        "ernie_jax/quant.py",
        "index = jnp.stack([codes & 0x0F, codes >> 4], axis=axis + 1)",
        "index = jnp.stack([codes >> 4, codes & 0x0F], axis=axis + 1)",
        (QUANT + "test_nf4_round_trip_per_block",),
        "packed NF4 pairs unpacked in the wrong order: neighbouring weights swapped",
    ),
    Mutation(
        "quantized_storage_is_a_param",
        "ernie_jax/quant.py",
        "class QuantizedVariable(nnx.Variable):",
        "class QuantizedVariable(nnx.Param):",
        (QUANT + "test_quantized_forward_against_fp32",),
        "int8 codes typed as trainable parameters: a full fine-tune would hand integer weights to AdamW",
    ),
    Mutation(
        "qlora_base_not_quantized",
        "ernie_jax/lora.py",
        "    if cfg.base_dtype in quant.QUANT_KINDS:\n",
        "    if False:\n",
        (QUANT + "test_qlora_config_and_the_optimizer_never_sees_quantized_weights",),
        "lora.base_dtype=int8 accepted and ignored: the base stays fp32",
    ),
    Mutation(
        "qlora_export_keeps_unadapted_weights_quantized",
        "ernie_jax/lora.py",
        "    return quant.dequantize(merged)\n",
        "    return merged\n",
        (QUANT + "test_qlora_exports_merged_dequantised_and_peft",),
        "export of a QLoRA run with some targets: weights without adapters left as int8 codes the writer cannot name",
    ),
    Mutation(
        "checkpoint_restores_another_base_dtype",
        "ernie_jax/training/checkpointing.py",
        "if saved_dtypes is not None and saved_dtypes != run_dtypes:",
        "if False:",
        (QUANT + "test_qlora_checkpoint_restores_exactly_and_refuses_another_base",),
        "an int8 QLoRA checkpoint restored into an nf4 run: Orbax fails and the step is moved aside as damaged",
    ),
    # ------------------------------------------------------------------------------------ from issue 15
    Mutation(
        "mtp_concat_order_swapped",
        "ernie_jax/model.py",
        "jnp.concatenate([self.emb_norm(embedded), self.hidden_norm(h)], axis=-1)",
        "jnp.concatenate([self.hidden_norm(h), self.emb_norm(embedded)], axis=-1)",
        ("tests/test_mtp.py::test_mtp_logits_match_the_reference_formula",),
        "the MTP projection reads the hidden half where the embedding half belongs (Paddle puts embeddings first)",
    ),
    Mutation(
        "mtp_reads_final_normed_hidden",
        "ernie_jax/model.py",
        "mtp_hidden = self.mtp_hidden(last, ids, positions, segment_ids, token_mask)",
        "mtp_hidden = self.mtp_hidden(h, ids, positions, segment_ids, token_mask)",
        ("tests/test_mtp.py::test_mtp_logits_match_the_reference_formula",),
        "the first MTP depth reads the main model's output after the final norm instead of the last layer's",
    ),
    Mutation(
        "mtp_targets_cross_documents",
        "ernie_jax/training/losses.py",
        'batch["loss_mask"][:, ahead] * same_document',
        'batch["loss_mask"][:, ahead]',
        ("tests/test_mtp.py::test_mtp_targets_stay_inside_each_document",),
        "MTP learns to predict the next document's tokens across a packing boundary",
    ),
    Mutation(
        "speculative_accepts_by_target_probability_only",
        "ernie_jax/generation/sampling.py",
        "jax.random.uniform(accept_key, draft.shape) * q_d < p_d",
        "jax.random.uniform(accept_key, draft.shape) < p_d",
        ("tests/test_speculative.py::test_acceptance_rule_keeps_the_target_distribution",),
        "speculative sampling skews the output towards the draft head's distribution",
    ),
    Mutation(
        "speculative_rejected_slot_stays_readable",
        "ernie_jax/generation/speculative.py",
        "cache.slot_ok.at[:, fill + 1].set(accepted)",
        "cache.slot_ok.at[:, fill + 1].set(True)",
        ("tests/test_speculative.py::test_greedy_speculative_equals_plain_greedy",),
        "a rejected draft's keys and values stay in the cache and every later token attends to them",
    ),
    Mutation(
        "blocked_gmm_weight_grad_to_wrong_expert",
        "pallas_kernels/gmm/blocked.py",
        "dw = jax.ops.segment_sum(dw_tiles, layout.tile_group, num_segments=num_groups, indices_are_sorted=True)",
        "dw = jax.ops.segment_sum(dw_tiles, jnp.arange(num_tiles) % num_groups, num_segments=num_groups)",
        ("tests/test_gmm_blocked.py::test_blocked_gmm_matches_twin_with_ragged_and_empty_groups",),
        "on CPU each tile's expert-weight gradient lands on the wrong expert (tiles dealt round-robin)",
    ),
    Mutation(
        "blocked_gmm_scatters_rows_into_zeroed_tiles",
        "pallas_kernels/gmm/blocked.py",
        'slots = rows.at[layout.source].get(mode="fill", fill_value=0)  # [tiles * tile, C]',
        'slots = jnp.zeros((layout.source.shape[0], rows.shape[1]), rows.dtype).at[layout.dest].set(rows, mode="drop")',
        ("tests/test_compiled_layouts.py::test_blocked_gmm_lays_rows_into_tiles_with_one_gather",),
        "the CPU grouped matmul fills a zeroed tile buffer and scatters the rows into it (a fill and a scatter)",
    ),
    Mutation(
        "blocked_gmm_fixed_64_row_tiles",
        "pallas_kernels/gmm/blocked.py",
        "return min(max(1 << (half_mean.bit_length() - 1), 32), 128)",
        "return 64",
        ("tests/test_compiled_layouts.py::test_blocked_gmm_runs_the_tiny_presets_rows_in_128_row_tiles",),
        "the CPU grouped matmul keeps 64-row tiles whatever the rows per expert (the slower batched matmul)",
    ),
    Mutation(
        "mtp_projection_keeps_batch_and_sequence_rows",
        "ernie_jax/model.py",
        'x = jnp.einsum("NC,CD->ND", x.reshape(b * t, c), self.proj[...].astype(self.dtype)).reshape(b, t, -1)',
        'x = jnp.einsum("BTC,CD->BTD", x, self.proj[...].astype(self.dtype))',
        ("tests/test_compiled_layouts.py::test_mtp_projection_weight_gradient_reads_the_activation_gradient_in_place",),
        "the MTP projection's weight gradient goes through a transposed copy of its output gradient on CPU",
    ),
    Mutation(
        "dense_mlp_keeps_batch_and_sequence_rows",
        "ernie_jax/layers.py",
        "x = x.reshape(-1, x.shape[-1]).astype(self.dtype)  # [N, D]",
        "x = x.astype(self.dtype)  # [..., D]",
        ("tests/test_compiled_layouts.py::test_dense_mlp_weight_gradients_read_the_activation_gradients_in_place",),
        "the dense MLP's weight gradients go through transposed copies of its activation gradients on CPU",
    ),
    Mutation(
        "layer_scan_ignores_scan_layers",
        "ernie_jax/model.py",
        "h, stats = jax.lax.scan(body, h, (state, repeat_keys), unroll=not self.options.scan_layers)",
        "h, stats = jax.lax.scan(body, h, (state, repeat_keys))",
        ("tests/test_scan_layers.py::test_unrolled_program_has_no_loop_over_the_layers",),
        "scan_layers=false still compiles a loop over the layers (the tiny preset trains slower on CPU)",
    ),
)
