"""Exact parameter accounting, counted from the real modules built on the meta device (no memory).

Conventions (publishers differ, so both are reported):
- total: every parameter plus the `e_score_correction_bias` buffers (DeepSeek-V3's checkpoint stores them).
- activated per token: everything a token passes through, with routed experts scaled by top_k / n_experts
  and the router's full weight (every token is scored against every expert). Reported with and without
  the input-embedding lookup: DeepSeekMoE 16B, Mixtral and OLMoE count it; DeepSeek-V2/V3 do not.
- MTP modules are reported apart from the main model; for a DeepSeek-V3-style checkpoint the stored
  MTP layer also holds its own copies of the embedding and output head (`hf_checkpoint_total`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from minimoe.config import ModelConfig
from minimoe.errors import ConfigError

COMPONENTS = (
    "embedding",
    "attention",
    "norms",
    "dense_mlp",
    "router",
    "shared_experts",
    "routed_experts",
    "lm_head",
)


@dataclass
class ParamReport:
    total: int  # main model, incl. router bias buffers
    activated: int  # per token, without the embedding lookup (DeepSeek-V2/V3 convention)
    activated_with_embedding: int  # per token, with it (DeepSeekMoE / Mixtral / OLMoE convention)
    mtp_total: int  # unique parameters of the MTP modules (shared embedding/head not counted)
    mtp_activated: int
    hf_checkpoint_total: int  # main + MTP + the embedding/head copies a DeepSeek-V3 checkpoint stores
    components: dict[str, int]  # main-model total per component
    kv_cache_bytes_per_token: dict[str, int]  # per dtype, all layers
    kv_cache_bytes_per_token_per_layer: dict[str, int]

    def to_dict(self) -> dict:
        return asdict(self)


def _component(name: str) -> str:
    if name.startswith("embed_tokens"):
        return "embedding"
    if name.startswith("lm_head"):
        return "lm_head"
    for marker, comp in (
        (".self_attn.", "attention"),  # includes q_a_layernorm / kv_a_layernorm, as HF counts them
        (".mlp.gate.", "router"),
        (".mlp.experts.", "routed_experts"),
        (".mlp.shared_experts.", "shared_experts"),
        (".mlp.", "dense_mlp"),
    ):
        if marker in name:
            return comp
    return "norms"  # input/post-attention norms, final norm, MTP enorm/hnorm/norm


def _tally(named: list[tuple[str, torch.Tensor, int]], cfg: ModelConfig) -> tuple[dict[str, int], int]:
    comps = dict.fromkeys(COMPONENTS, 0)
    comps["mtp_proj"] = 0
    for name, t, times in named:
        key = "mtp_proj" if name.endswith("eh_proj.weight") else _component(name)
        comps[key] += t.numel() * times
    routed_active = comps["routed_experts"] * cfg.num_experts_per_tok // max(cfg.n_routed_experts, 1)
    activated = sum(v for k, v in comps.items() if k not in ("routed_experts", "embedding")) + routed_active
    return comps, activated


def _repeats(name: str, n_dense: int, n_moe: int, mtp_depth: int, small_dense: int) -> int:
    """How many layers of the full model the tensor `name` of the reduced model stands for."""
    if name.startswith("layers."):
        return n_dense if int(name.split(".")[1]) < small_dense else n_moe
    if name.startswith("mtp."):
        return mtp_depth
    return 1


def _reduced_model(cfg: ModelConfig):
    """The model of `cfg` with at most one dense layer, one MoE layer and one MTP module, on the meta
    device, and a function giving how many of the full model's layers each of its tensors stands for."""
    import copy

    from minimoe.model.transformer import Transformer

    cfg.validate()
    n_dense = (
        min(cfg.first_k_dense_replace, cfg.num_hidden_layers)
        if cfg.n_routed_experts > 0
        else cfg.num_hidden_layers
    )
    n_moe = cfg.num_hidden_layers - n_dense
    small = copy.copy(cfg)
    small.num_hidden_layers = min(n_dense, 1) + min(n_moe, 1)
    small.first_k_dense_replace = min(n_dense, 1)
    small.mtp_depth = min(cfg.mtp_depth, 1)
    try:
        with torch.device("meta"):
            model = Transformer(small)
    except RuntimeError as e:  # a weight whose element count overflows 64 bits
        if "overflow" not in str(e):
            raise
        raise ConfigError(
            f"the model is too large to exist: one of its weights would hold more than 2**63 elements "
            f"(hidden_size {cfg.hidden_size}, intermediate sizes {cfg.intermediate_size} / "
            f"{cfg.moe_intermediate_size}, vocab_size {cfg.vocab_size})"
        ) from None
    return model, lambda name: _repeats(name, n_dense, n_moe, cfg.mtp_depth, small.first_k_dense_replace)


def count_params(cfg: ModelConfig) -> ParamReport:
    """Count parameters of `cfg` exactly without allocating (meta device).

    Layers of one kind are identical, so a model with at most one dense layer, one MoE layer and one MTP
    module is built and each of its layers counted as many times as the full model has it: the count
    takes the same time for 4 layers or a million.
    """
    model, repeats = _reduced_model(cfg)
    seen: set[int] = set()
    main, mtp = [], []
    tensors = list(model.named_parameters(remove_duplicate=False)) + [
        (n, b) for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")
    ]
    for name, t in tensors:
        if id(t) in seen:  # tied embedding/head counted once (as the head)
            continue
        seen.add(id(t))
        times = repeats(name)
        (mtp if name.startswith("mtp.") else main).append((name.removeprefix("mtp."), t, times))
    if cfg.tie_word_embeddings:
        # named_parameters lists embed_tokens first; credit the shared matrix to the head, which every
        # token uses, so "without the embedding lookup" does not drop it.
        main = [("lm_head.weight", t, k) if n == "embed_tokens.weight" else (n, t, k) for n, t, k in main]
    comps, act = _tally(main, cfg)
    mtp_comps, mtp_act = _tally([("layers." + n.split("block.", 1)[-1], t, k) for n, t, k in mtp], cfg)
    total = sum(comps.values())
    emb = comps["embedding"]
    # a DeepSeek-V3 checkpoint's MTP layer stores embed_tokens and shared_head.head again, both, tied or
    # not (vLLM's MTP layer loads shared_head.head)
    emb_and_head = 2 * cfg.vocab_size * cfg.hidden_size
    mtp_total = sum(mtp_comps.values())
    per_layer_numbers = model.layers[0].self_attn.cache_numbers_per_token()
    # the dtypes a cache is kept in (the model's: fp32 or bf16; there is no quantized KV cache)
    kv_layer = {name: per_layer_numbers * size for name, size in (("fp32", 4), ("bf16", 2))}
    return ParamReport(
        total=total,
        activated=act,
        activated_with_embedding=act + emb,
        mtp_total=mtp_total,
        mtp_activated=mtp_act,
        hf_checkpoint_total=total + mtp_total + (emb_and_head * cfg.mtp_depth),
        components={k: v for k, v in comps.items() if v},
        kv_cache_bytes_per_token={k: v * cfg.num_hidden_layers for k, v in kv_layer.items()},
        kv_cache_bytes_per_token_per_layer=kv_layer,
    )


def muon_param_names(model: torch.nn.Module) -> set[str]:
    """Names of the hidden matrices Muon trains: parameters of two or more dimensions, except the token
    embedding, the LM head (tied or not) and routers (their logits feed a top-k, not a hidden state)."""
    from minimoe.model.router import Router

    routers = {id(p) for m in model.modules() if isinstance(m, Router) for p in m.parameters()}
    skip = set()
    for attr in ("embed_tokens", "lm_head"):
        mod = getattr(model, attr, None)
        if mod is not None:
            skip.update(id(p) for p in mod.parameters())
    return {
        n
        for n, p in model.named_parameters()
        if p.requires_grad and p.dim() >= 2 and id(p) not in routers and id(p) not in skip
    }


def optimizer_state_bytes(cfg: ModelConfig, optimizer: str = "adamw", muon_experts: bool = True) -> int:
    """Bytes of optimizer state for every parameter of `cfg` (main and MTP): AdamW's two fp32 moments (8
    per parameter); Muon's one fp32 momentum (4) for the matrices it trains (`muon_param_names`; the routed
    experts' too unless `muon_experts` is False) and AdamW's 8 for the rest; bitsandbytes' AdamW8bit two
    8-bit moments (2) for tensors of 4,096 elements or more, its default, and 8 for smaller ones."""
    model, repeats = _reduced_model(cfg)
    muon = muon_param_names(model) if optimizer == "muon" else set()
    if not muon_experts:
        muon = {n for n in muon if ".mlp.experts." not in n}
    total = 0
    for name, p in model.named_parameters():  # a tied matrix once
        per = 8
        if name in muon:
            per = 4
        elif optimizer == "adamw8bit" and p.numel() >= 4096:
            per = 2
        total += per * p.numel() * repeats(name)
    return total


def memory_estimate(
    cfg: ModelConfig,
    report: ParamReport | None = None,
    context: int | None = None,
    optimizer: str = "adamw",
    muon_experts: bool = True,
) -> dict:
    """Bytes for weights, gradients and `optimizer`'s state (`optimizer_state_bytes`; train.optimizer's
    names) per weight dtype, and the KV cache for one sequence of `context` tokens (default
    max_position_embeddings)."""
    report = report or count_params(cfg)
    n = report.total + report.mtp_total
    context = context or cfg.max_position_embeddings
    state = optimizer_state_bytes(cfg, optimizer, muon_experts)
    out = {}
    for dtype, size in (("fp32", 4), ("bf16", 2)):
        weights = n * size
        grads = n * size
        master = n * 4 if size < 4 else 0  # fp32 master weights for bf16 training
        out[dtype] = {
            "weights": weights,
            "gradients": grads,
            "optimizer_state": state + master,
            "training_total": weights + grads + state + master,
            "kv_cache_per_token": report.kv_cache_bytes_per_token[dtype],
            "kv_cache_per_sequence": report.kv_cache_bytes_per_token[dtype] * context,
        }
    return {"context": context, "optimizer": optimizer, "by_dtype": out}
