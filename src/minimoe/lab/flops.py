"""Training FLOPs from activated parameters, counted exactly from the model's own modules.

Per token, a weight matrix that the token passes through costs 2 FLOPs per entry in the forward pass
(one multiply, one add) and 4 more in the backward pass (gradient of the input and of the weight),
so training costs 6 FLOPs per activated matrix entry. Routed experts count with their top-k share,
the router's full weight counts (every token is scored against every expert), the LM head counts
(logits for every position), and the embedding lookup, RMSNorm weights and the balancing bias do not
(no matrix multiply). Attention adds the score and value products, which have no parameters:
a query at position t (1-based) attends to t keys under the causal mask, so a sequence of S tokens has
S (S + 1) / 2 query-key pairs, each costing 2 * H * (d_qk + d_v) forward FLOPs; training is 3x forward.

    train_flops_per_token = 6 * N_matmul + 3 * L * 2 * H * (d_qk + d_v) * (S + 1) / 2   (+ MTP, below)

MTP depth k runs one more block and the shared head on the first S - k positions of every sequence,
and adds its own matrices (eh_proj and the block); its share is scaled by (S - k) / S. Element-wise work
(norms, activations, softmax, RoPE) is left out, as in the usual 6N accounting. Capacity dropping is
ignored (dropless count, an upper bound when tokens are dropped).
"""

from __future__ import annotations

from dataclasses import dataclass

from minimoe.config import ModelConfig, RunConfig
from minimoe.errors import MinimoeError
from minimoe.params import ParamReport, count_params


@dataclass
class FlopsReport:
    """FLOPs per training token of one config at one sequence length."""

    seq_len: int
    matmul_params: int  # activated matrix entries per token, main model (LM head included)
    mtp_matmul_params: int  # per MTP depth: its own matrices plus the shared head, summed over depths
    forward_matmul: float  # 2 * matmul FLOPs per token, main model
    forward_attention: float  # score + value products per token, main model, causal
    forward_mtp: float  # MTP modules per token (matrices + attention), scaled by (S - k) / S
    train_per_token: float  # 3 * (forward_matmul + forward_attention + forward_mtp)

    @property
    def forward_per_token(self) -> float:
        return self.forward_matmul + self.forward_attention + self.forward_mtp


def _attention_norm_params(cfg: ModelConfig) -> int:
    """RMSNorm weights inside one attention module: MLA's q_a_layernorm and kv_a_layernorm, or GQA's
    q_norm and k_norm (`qk_norm`: one head's width each, or every head's)."""
    if cfg.attn_type == "mla":
        return (cfg.q_lora_rank or 0) + cfg.kv_lora_rank
    if cfg.qk_norm == "head":
        return 2 * cfg.gqa_head_dim
    if cfg.qk_norm == "full":
        return (cfg.num_attention_heads + cfg.kv_heads) * cfg.gqa_head_dim
    return 0


def _block_norm_params(cfg: ModelConfig) -> int:
    """RMSNorm weights of one block: its two pre-norms and the attention-internal norms."""
    return 2 * cfg.hidden_size + _attention_norm_params(cfg)


def _attention_pair_flops(cfg: ModelConfig) -> int:
    """Forward FLOPs of one query-key pair in one layer: 2 * H * d_qk (score) + 2 * H * d_v (value)."""
    if cfg.attn_type == "mla":
        d_qk, d_v = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
    else:
        d_qk = d_v = cfg.gqa_head_dim
    return 2 * cfg.num_attention_heads * (d_qk + d_v)


def matmul_params(cfg: ModelConfig, report: ParamReport | None = None) -> int:
    """Activated matrix entries per token in the main model: count_params' activated count minus the
    RMSNorm weights and the balancing-bias buffers it includes.

    Args:
        cfg: model config.
        report: count_params(cfg), when already computed.
    Returns:
        number of weight-matrix entries one token multiplies with (embedding lookup excluded).
    """
    rep = report or count_params(cfg)
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    bias = n_moe * cfg.n_routed_experts if cfg.aux_free_bias else 0
    attn_norms = cfg.num_hidden_layers * _attention_norm_params(cfg)
    return rep.activated - rep.components.get("norms", 0) - attn_norms - bias


def mtp_matmul_params(cfg: ModelConfig, report: ParamReport | None = None) -> int:
    """Activated matrix entries per token of ONE MTP depth: eh_proj, its block, and the shared head."""
    if cfg.mtp_depth == 0:
        return 0
    rep = report or count_params(cfg)
    per_depth = rep.mtp_activated // cfg.mtp_depth
    # each depth has enorm, hnorm, the final norm (3 D) and one block's norms and bias
    moe_block = (
        cfg.n_routed_experts > 0
    )  # MTP blocks have index >= num_hidden_layers >= first_k_dense_replace
    bias = cfg.n_routed_experts if (moe_block and cfg.aux_free_bias) else 0
    non_matmul = 3 * cfg.hidden_size + _block_norm_params(cfg) + bias
    return per_depth - non_matmul + cfg.vocab_size * cfg.hidden_size


def flops_per_token(cfg: ModelConfig, seq_len: int) -> FlopsReport:
    """Exact training FLOPs per token for `cfg` on sequences of `seq_len` tokens (see module doc).

    Args:
        cfg: model config (validated here through count_params).
        seq_len: training sequence length S.
    Returns:
        FlopsReport; `train_per_token` is what budgets use.
    """
    if seq_len <= 0:
        raise MinimoeError(f"seq_len must be positive, got {seq_len}")
    rep = count_params(cfg)
    n_mm = matmul_params(cfg, rep)
    pair = _attention_pair_flops(cfg)
    fwd_mm = 2.0 * n_mm
    fwd_attn = cfg.num_hidden_layers * pair * (seq_len + 1) / 2
    mtp_mm = mtp_matmul_params(cfg, rep)
    fwd_mtp = 0.0
    for k in range(1, cfg.mtp_depth + 1):
        n = max(seq_len - k, 0)  # positions depth k sees in each sequence
        # per sequence: n tokens through the matrices, n (n + 1) / 2 causal pairs; spread over S tokens
        fwd_mtp += (2.0 * mtp_mm * n + pair * n * (n + 1) / 2) / seq_len
    return FlopsReport(
        seq_len=seq_len,
        matmul_params=n_mm,
        mtp_matmul_params=mtp_mm * cfg.mtp_depth,
        forward_matmul=fwd_mm,
        forward_attention=fwd_attn,
        forward_mtp=fwd_mtp,
        train_per_token=3.0 * (fwd_mm + fwd_attn + fwd_mtp),
    )


def tokens_per_step(cfg: RunConfig) -> int:
    t = cfg.train
    return t.batch_size * t.seq_len * t.grad_accum


def training_flops(cfg: RunConfig, steps: int | None = None) -> float:
    """Training FLOPs of `steps` optimizer steps (default train.max_steps) of a run config."""
    steps = cfg.train.max_steps if steps is None else steps
    return flops_per_token(cfg.model, cfg.train.seq_len).train_per_token * tokens_per_step(cfg) * steps


def steps_for_budget(cfg: RunConfig, tokens: float | None = None, flops: float | None = None) -> int:
    """Optimizer steps that spend a token budget or a training-FLOPs budget (rounded down; a budget
    below one step is an error).

    Args:
        cfg: the run config (batch size, sequence length, gradient accumulation, model).
        tokens: training tokens to see; or
        flops: training FLOPs to spend (exactly one of the two).
    Returns:
        max_steps for this config.
    """
    if (tokens is None) == (flops is None):
        raise MinimoeError("a budget needs exactly one of tokens or flops")
    per_step = tokens_per_step(cfg)
    if flops is not None:
        if flops <= 0:
            raise MinimoeError(f"the FLOPs budget must be positive, got {flops}")
        per_step_flops = flops_per_token(cfg.model, cfg.train.seq_len).train_per_token * per_step
        steps = int(flops // per_step_flops)
        if steps < 1:
            raise MinimoeError(
                f"a FLOPs budget of {flops:.3g} is less than one step ({per_step_flops:.3g} FLOPs)"
            )
        return steps
    if tokens <= 0:
        raise MinimoeError(f"the token budget must be positive, got {tokens}")
    if tokens < per_step:
        raise MinimoeError(f"a budget of {tokens:,.0f} tokens is less than one step ({per_step:,} tokens)")
    return int(tokens // per_step)
