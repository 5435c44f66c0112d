"""Which Hugging Face format can hold a minimoe config exactly, and its config.json.

| minimoe config | format | how |
| --- | --- | --- |
| MLA, sigmoid scoring | `deepseek_v3` | native (bias, groups, scaling, shared experts, MTP) |
| MLA, softmax scoring, no top-k renormalisation | `deepseek_v2` | native (`greedy` / `group_limited_greedy`) |
| GQA, sigmoid scoring | `glm4_moe` | DeepSeek-V3 routing with GQA, full-width half-split RoPE, `use_qk_norm` |
| GQA, softmax, no shared/dense layers, renormalised top-k (k > 1) | `mixtral` | scaling folded into down_proj |
| GQA, softmax, no q/k norm otherwise | `qwen2_moe` | shared expert gate fixed at sigmoid(0) = 1/2, down_proj doubled |
| GQA, softmax, per-head q/k norm, no shared experts | `qwen3_moe` | scaling folded into down_proj |
| GQA, softmax, whole-projection q/k norm, no shared/dense layers | `olmoe` | scaling folded into down_proj |

Anything else is refused with one sentence naming the feature (`refusal`), never approximated.
"""

from __future__ import annotations

import math

from minimoe.config import ModelConfig
from minimoe.hf.keymap import MLA_FORMATS, MOE_NAMES, config_key
from minimoe.model.rope import yarn_attention_factor, yarn_get_mscale

ARCHITECTURES = {
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM",
    "glm4_moe": "Glm4MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM",
}
# preference order when the user does not name a format
PREFERENCE = {"mla": MLA_FORMATS, "gqa": ("glm4_moe", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe")}
# the q/k norms each GQA format has (glm4_moe: either, by use_qk_norm)
QK_NORMS = {"glm4_moe": ("none", "head"), "qwen3_moe": ("head",), "olmoe": ("full",)}


def refusal(cfg: ModelConfig, fmt: str, bias_nonzero: bool) -> str | None:
    """Why `fmt` cannot hold `cfg` exactly, as a clause naming the feature; None when it can.

    Args:
        cfg: the model config.
        fmt: a format name (ARCHITECTURES key).
        bias_nonzero: whether any aux-free balancing bias is nonzero (it changes expert selection).
    """
    attn = "mla" if fmt in MLA_FORMATS else "gqa"
    if cfg.attn_type != attn:
        return f"{fmt} has {attn.upper()} attention, the model uses {cfg.attn_type.upper()}"
    if cfg.n_routed_experts > 0 and cfg.expert_act != "swiglu":
        return (
            "GELU experts (expert_act=gelu) have no Hugging Face MoE format: all of them use SwiGLU experts"
        )
    if cfg.n_routed_experts == 0 and attn == "gqa":
        return "a dense GQA model (n_routed_experts=0) has no MoE format; minimoe exports MoE models"
    if attn == "gqa" and cfg.qk_norm not in QK_NORMS.get(fmt, ("none",)):
        have = " or ".join(QK_NORMS.get(fmt, ("none",)))
        return f"{fmt} has qk_norm={have}, the model uses qk_norm={cfg.qk_norm}"
    method = cfg.effective_topk_method
    if fmt in ("deepseek_v3", "glm4_moe"):
        if cfg.scoring_func != "sigmoid" and cfg.n_routed_experts > 0:
            return f"{fmt} scores experts with a sigmoid, the model uses softmax (scoring_func=softmax)"
        if cfg.group_limited and method != "noaux_tc":
            return f"{fmt} scores a group by its two best experts (noaux_tc), the model uses topk_method={method}"
        return None
    # softmax formats
    if cfg.n_routed_experts > 0 and cfg.scoring_func != "softmax":
        return f"{fmt} scores experts with a softmax, the model uses sigmoid (scoring_func=sigmoid)"
    if bias_nonzero:
        return f"{fmt} has no aux-free balancing bias and this model's bias is nonzero (it changes which experts are chosen)"
    k = cfg.num_experts_per_tok
    if fmt == "deepseek_v2":
        if cfg.norm_topk_prob and k > 1:
            return "deepseek_v2 does not renormalise the top-k weights (norm_topk_prob=true)"
        if cfg.group_limited and method != "group_limited_greedy":
            return f"deepseek_v2 scores a group by its best expert, the model uses topk_method={method}"
        return None
    if cfg.group_limited:
        return f"{fmt} has no group-limited routing (n_group={cfg.n_group}, topk_group={cfg.topk_group})"
    if MOE_NAMES[fmt].shared is None and cfg.n_shared_experts > 0:
        return f"{fmt} has no shared experts"
    if fmt in ("mixtral", "olmoe") and cfg.first_k_dense_replace > 0:
        return f"{fmt} has no dense layers (first_k_dense_replace > 0)"
    if fmt == "mixtral" and (not cfg.norm_topk_prob or k == 1):
        return "mixtral always renormalises the top-k weights (the model does not, norm_topk_prob=false or top-1)"
    if fmt == "olmoe" and cfg.gqa_head_dim * cfg.num_attention_heads != cfg.hidden_size:
        return f"olmoe sizes its q/k norms by hidden_size, so head_dim ({cfg.head_dim}) * num_attention_heads must equal it"
    return None


def choose_format(cfg: ModelConfig, bias_nonzero: bool, fmt: str | None = None) -> tuple[str, str | None]:
    """The format to export to: `fmt` if given, else the first that fits in PREFERENCE order.

    Returns:
        (format, None) or (the format tried first, the reason nothing fits).
    """
    if fmt is not None:
        return fmt, refusal(cfg, fmt, bias_nonzero)
    reasons = []
    for f in PREFERENCE[cfg.attn_type]:
        why = refusal(cfg, f, bias_nonzero)
        if why is None:
            return f, None
        reasons.append(why)
    return PREFERENCE[cfg.attn_type][0], "; ".join(dict.fromkeys(reasons))


def rope_config(cfg: ModelConfig, fmt: str) -> dict:
    """`rope_theta`, `rope_scaling` (legacy key that vLLM and DeepSeek's files use) and `rope_parameters`
    (transformers 5) for config.json, giving the same cos/sin tables and softmax scale as minimoe."""
    out: dict = {"rope_theta": cfg.rope_theta}
    rs = cfg.rope_scaling
    if not rs:
        out["rope_scaling"] = None
        out["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
        return out
    factor = float(rs["factor"])
    d = {
        "type": "yarn",
        "rope_type": "yarn",
        "factor": factor,
        "original_max_position_embeddings": int(rs["original_max_position_embeddings"]),
        "beta_fast": float(rs.get("beta_fast", 32)),
        "beta_slow": float(rs.get("beta_slow", 1)),
    }
    ours = yarn_attention_factor(rs)  # what minimoe multiplies cos/sin by
    if cfg.attn_type == "mla":
        # DeepSeek YaRN keys. The softmax factor, mscale(f, mscale_all_dim)^2 where truthy, reads alike
        # everywhere; the cos/sin factor does not: HF takes mscale(f, mscale) / mscale(f, mscale_all_dim)
        # where both are truthy (else mscale(f), or attention_factor where given), vLLM always takes the
        # ratio with absent keys as mscale=1, mscale_all_dim=0 (and ignores attention_factor). Where the
        # keys as they are would give vLLM another factor than minimoe's, mscale is solved for it.
        for key in ("mscale", "mscale_all_dim"):
            if key in rs:
                d[key] = float(rs[key])
        ms_all = float(d.get("mscale_all_dim", 0.0))
        vllm = yarn_get_mscale(factor, d.get("mscale", 1.0)) / yarn_get_mscale(factor, ms_all)
        if factor > 1 and not math.isclose(vllm, ours, rel_tol=0, abs_tol=1e-12):
            d["mscale"] = (ours * yarn_get_mscale(factor, ms_all) - 1) / (0.1 * math.log(factor))
            d["mscale_all_dim"] = ms_all
        ms, ms_all = d.get("mscale"), d.get("mscale_all_dim")
        hf = (
            yarn_get_mscale(factor, ms) / yarn_get_mscale(factor, ms_all)
            if ms and ms_all
            else yarn_get_mscale(factor)
        )
        if not math.isclose(hf, ours, rel_tol=0, abs_tol=1e-12):
            d["attention_factor"] = ours  # HF tests truthiness, minimoe presence: pin the value
    else:
        # GQA formats scale scores by head_dim**-0.5 only; minimoe also multiplies the softmax scale
        # by mscale(factor, mscale_all_dim)^2. RoPE covers the whole head here, so that factor moves
        # exactly into the cos/sin multiplier: q.k scales by attention_factor^2.
        ms_all = rs.get("mscale_all_dim")
        d["attention_factor"] = ours * (yarn_get_mscale(factor, float(ms_all)) if ms_all else 1.0)
    d["rope_theta"] = cfg.rope_theta
    out["rope_scaling"] = dict(d)
    out["rope_parameters"] = {k: v for k, v in d.items() if k != "type"}
    return out


# fields every format writes, then per family (names from `keymap.config_key`; where a format calls the
# experts' width `intermediate_size`, the later moe_intermediate_size entry overwrites the dense one)
_COMMON = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
           "initializer_range", "rms_norm_eps", "tie_word_embeddings", "num_experts_per_tok", "norm_topk_prob")  # fmt: skip
_MLA = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
_DEEPSEEK = ("n_routed_experts", "n_shared_experts", "moe_intermediate_size", "first_k_dense_replace", "n_group",
             "topk_group", "routed_scaling_factor", "topk_method", "scoring_func")  # fmt: skip
_SOFTMAX = ("n_routed_experts", "moe_intermediate_size", "aux_loss_alpha")


def hf_config(cfg: ModelConfig, fmt: str, tokenizer, dtype: str, mtp_layers: int) -> dict:
    """config.json for `fmt` (real transformers keys, plus `topk_method` / `scoring_func` that
    vLLM and SGLang read).

    Args:
        cfg: the model config (already accepted by `refusal`).
        fmt: the target format.
        tokenizer: for the special-token ids.
        dtype: "float32", "bfloat16" or "float16", the dtype of the written weights.
        mtp_layers: MTP modules written after the main layers (0 when dropped).
    """
    values = {
        "num_key_value_heads": cfg.kv_heads if cfg.attn_type == "gqa" else cfg.num_attention_heads,
        # minimoe skips the renormalisation for top-1 (it would make every weight 1.0); so must HF
        "norm_topk_prob": cfg.norm_topk_prob and cfg.num_experts_per_tok > 1,
        "first_k_dense_replace": cfg.first_k_dense_replace
        if cfg.n_routed_experts > 0
        else cfg.num_hidden_layers,
        "topk_method": cfg.effective_topk_method if cfg.group_limited else "greedy",
    }
    if fmt in ("deepseek_v3", "glm4_moe"):
        values.update(topk_method="noaux_tc", scoring_func="sigmoid")
    mla = fmt in MLA_FORMATS
    fields = _COMMON + (_MLA if mla else ()) + (_DEEPSEEK if fmt in (*MLA_FORMATS, "glm4_moe") else _SOFTMAX)
    c: dict = {"architectures": [ARCHITECTURES[fmt]], "model_type": fmt}
    c.update({config_key(f, fmt): values[f] if f in values else getattr(cfg, f) for f in fields})
    c.update(
        hidden_act="silu",
        use_cache=True,
        attention_dropout=cfg.attn_dropout,
        attention_bias=False,
        bos_token_id=tokenizer.bos_id,
        eos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.pad_id,
        torch_dtype=dtype,
        dtype=dtype,
        **rope_config(cfg, fmt),
    )
    if not mla:
        c["head_dim"] = cfg.gqa_head_dim
    if fmt in (*MLA_FORMATS, "glm4_moe"):
        c["moe_layer_freq"] = 1
    if fmt == "deepseek_v3":
        c.update(rope_interleave=True, num_nextn_predict_layers=mtp_layers)
    elif fmt == "deepseek_v2":
        c.update(norm_topk_prob=False, mlp_bias=False)
    elif fmt == "glm4_moe":
        c.update(
            partial_rotary_factor=1.0, use_qk_norm=cfg.qk_norm == "head", num_nextn_predict_layers=mtp_layers
        )
        c["rope_parameters"]["partial_rotary_factor"] = 1.0
    elif fmt == "mixtral":
        c.update(sliding_window=None, router_jitter_noise=cfg.router_jitter)
    elif fmt in ("qwen2_moe", "qwen3_moe"):
        c.update(decoder_sparse_step=1, mlp_only_layers=list(range(values["first_k_dense_replace"])))
        c.update(use_sliding_window=False, sliding_window=None)
        if fmt == "qwen2_moe":
            shared = cfg.moe_intermediate_size * cfg.n_shared_experts
            c.update(shared_expert_intermediate_size=shared, qkv_bias=False)
    elif fmt == "olmoe":
        c.update(clip_qkv=None)
    return c
