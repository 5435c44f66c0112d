"""config.json of a Hugging Face checkpoint -> ModelConfig, one reader per family of formats.

| model_type | published checkpoints | minimoe |
| --- | --- | --- |
| `deepseek_v3` | DeepSeek-V3/R1, Moonlight-16B-A3B | MLA, sigmoid, `noaux_tc`, bias, MTP |
| `deepseek_v2` | DeepSeek-V2, DeepSeek-V2-Lite | MLA, softmax, `greedy` / `group_limited_greedy` |
| `deepseek` | DeepSeekMoE 16B (remote code) | MHA, softmax, shared experts, `greedy` |
| `glm4_moe` | GLM-4.5 | GQA, sigmoid, `noaux_tc`, per-head q/k norm when `use_qk_norm` |
| `mixtral` | Mixtral | GQA, softmax, renormalised top-k |
| `qwen2_moe` | Qwen1.5/2-MoE | GQA, softmax, shared expert behind a zero gate |
| `qwen3_moe` | Qwen3-30B-A3B, 235B-A22B | GQA, softmax, per-head q/k norm (`qk_norm=head`) |
| `olmoe` | OLMoE-1B-7B | GQA, softmax, q/k norm over the whole projection (`qk_norm=full`) |

A feature minimoe cannot express is refused with one sentence naming it (`need`).
"""

from __future__ import annotations

import math

import torch

from minimoe.config import ModelConfig
from minimoe.errors import MinimoeError
from minimoe.hf.keymap import FORMATS, MLA_FORMATS, config_key
from minimoe.model.rope import yarn_get_mscale


def read_rope(c: dict, attn: str) -> tuple[float, dict | None]:
    """(rope_theta, minimoe rope_scaling) from `rope_parameters` (transformers 5) or the legacy keys."""
    key = "rope_scaling" if c.get("rope_scaling") else "rope_parameters"
    rp = c.get(key) or {}
    if not isinstance(rp, dict):
        raise MinimoeError(f"config.json field {key!r} must be a mapping, got {rp!r}")
    try:
        return _read_rope(c, rp, attn)
    except (TypeError, ValueError, KeyError) as e:
        raise MinimoeError(f"config.json field {key!r} cannot be read ({type(e).__name__}: {e})") from None


def _read_rope(c: dict, rp: dict, attn: str) -> tuple[float, dict | None]:
    theta = float(rp.get("rope_theta", c.get("rope_theta", 10000.0)))
    kind = rp.get("rope_type", rp.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "yarn":
        raise MinimoeError(
            f"RoPE scaling of type {kind!r} has no minimoe equivalent (only YaRN is supported)"
        )
    if not rp.get("truncate", True):  # transformers then skips the floor/ceil of the ramp's ends
        raise MinimoeError(
            "YaRN with truncate=false (an unrounded correction range) has no minimoe equivalent"
        )
    factor = float(rp.get("factor") or c["max_position_embeddings"] / rp["original_max_position_embeddings"])
    rs = {
        "type": "yarn",
        "factor": factor,
        "original_max_position_embeddings": int(
            rp.get("original_max_position_embeddings", c["max_position_embeddings"])
        ),
        "beta_fast": float(rp.get("beta_fast") or 32),
        "beta_slow": float(rp.get("beta_slow") or 1),
    }
    ms, ms_all, af = rp.get("mscale"), rp.get("mscale_all_dim"), rp.get("attention_factor")
    if attn == "mla":
        # HF scales cos/sin by mscale(f, mscale) / mscale(f, mscale_all_dim) when both are truthy, and
        # the softmax by mscale(f, mscale_all_dim)^2 when mscale_all_dim is truthy; minimoe does the same
        # for keys that are present, so copy only truthy keys.
        if ms and ms_all:
            rs["mscale"], rs["mscale_all_dim"] = float(ms), float(ms_all)
        elif ms_all:
            rs["mscale_all_dim"] = float(ms_all)
        if af is not None and not math.isclose(
            float(af), _hf_attention_factor(factor, ms, ms_all), rel_tol=1e-9
        ):
            # minimoe's cos/sin factor is mscale(f, mscale) / mscale(f, mscale_all_dim) whenever both keys are
            # present, falsy ones too: its exporter pins attention_factor for e.g. mscale=0.0 for transformers
            both = ms is not None and ms_all is not None
            if not (both and math.isclose(float(af), _mscale_ratio(factor, ms, ms_all), rel_tol=1e-9)):
                raise MinimoeError(f"an MLA YaRN attention_factor of {af} has no minimoe equivalent")
            rs["mscale"], rs["mscale_all_dim"] = float(ms), float(ms_all)
        return theta, rs
    # GQA: q.k is scaled by attention_factor^2 (RoPE covers the whole head). minimoe gives
    # mscale(f, m)^2 with mscale = mscale_all_dim = m (cos/sin factor 1, softmax factor mscale^2).
    af = float(_hf_attention_factor(factor, ms, ms_all) if af is None else af)
    if factor > 1 and not math.isclose(af, yarn_get_mscale(factor), rel_tol=1e-12):
        m = (af - 1.0) / (0.1 * math.log(factor))
        rs["mscale"] = rs["mscale_all_dim"] = m
    elif factor <= 1 and af != 1.0:
        raise MinimoeError(f"a YaRN attention_factor of {af} with factor {factor} has no minimoe equivalent")
    return theta, rs


def _mscale_ratio(factor: float, ms, ms_all) -> float:
    return yarn_get_mscale(factor, ms) / yarn_get_mscale(factor, ms_all)


def _hf_attention_factor(factor: float, ms, ms_all) -> float:
    """The cos/sin factor transformers derives when config.json gives no attention_factor."""
    return _mscale_ratio(factor, ms, ms_all) if ms and ms_all else yarn_get_mscale(factor)


def need(cond: bool, feature: str) -> None:
    if not cond:
        raise MinimoeError(f"the checkpoint uses {feature}, which minimoe cannot express")


# config.json fields that model_config reads as numbers
_NUMERIC = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "max_position_embeddings", "rms_norm_eps", "initializer_range", "intermediate_size", "q_lora_rank",
    "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "num_experts_per_tok",
    "n_routed_experts", "n_shared_experts", "moe_intermediate_size", "first_k_dense_replace", "moe_layer_freq",
    "n_group", "topk_group", "routed_scaling_factor", "num_local_experts", "router_aux_loss_coef", "num_experts",
    "shared_expert_intermediate_size", "decoder_sparse_step", "num_nextn_predict_layers", "partial_rotary_factor",
)  # fmt: skip


_NOT_NULL = ("routed_scaling_factor",)
DENSE_TYPES = ("llama", "mistral", "qwen2")  # dense model types `minimoe upcycle` reads (not importable)

# transformers' defaults (its config classes) for keys a config.json may leave out, where minimoe's
# fallback would give other logits without a word: DeepseekV3Config routes 8 experts scaled by 2.5 ...
HF_DEFAULTS = {
    "deepseek_v3": {"num_experts_per_tok": 8, "routed_scaling_factor": 2.5, "n_group": 8, "topk_group": 4},
    "glm4_moe": {"num_experts_per_tok": 8, "rms_norm_eps": 1e-5},
    "mixtral": {"num_experts_per_tok": 2, "rms_norm_eps": 1e-5, "rope_theta": 1e6},
    "qwen2_moe": {"num_experts_per_tok": 4},
    "qwen3_moe": {"num_experts_per_tok": 8},
    "olmoe": {"num_experts_per_tok": 8, "rms_norm_eps": 1e-5},
}


def _check_number(key: str, v) -> None:
    """One sentence when config.json field `key` holds `v`, which is neither null nor a number."""
    if v is not None and (isinstance(v, bool) or not isinstance(v, int | float)):
        raise MinimoeError(f"config.json field {key!r} must be a number, got {v!r}")


def _check_numbers(c: dict) -> None:
    """One sentence naming the first config.json field that should be a number and is not."""
    for key in _NUMERIC:
        _check_number(key, c.get(key))
    for key in _NOT_NULL:  # null where transformers multiplies by the value: neither side can run it
        if key in c and c[key] is None:
            raise MinimoeError(f"config.json field {key!r} must be a number, got null")


def _fields(c: dict, fmt: str, names: tuple[str, ...], required: tuple[str, ...] = ()) -> dict:
    """ModelConfig fields read under their config.json keys (`keymap.config_key`), where present;
    a missing `required` one raises KeyError(its key)."""
    out = {}
    for name in names:
        key = config_key(name, fmt)
        if c.get(key) is not None:
            out[name] = c[key]
        elif name in required:
            raise KeyError(key)
    return out


_SIZES = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
_COMMON = (*_SIZES, "max_position_embeddings", "rms_norm_eps", "initializer_range")
_MLA = ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")


def _attention(c: dict, fmt: str) -> dict:
    """Sizes, RoPE and attention fields shared by every format."""
    attn = "mla" if fmt in MLA_FORMATS else "gqa"
    need(
        c.get("hidden_act", "silu") == "silu",
        f"hidden_act={c.get('hidden_act')!r} (minimoe's FFNs are SwiGLU)",
    )
    need(not c.get("attention_bias", False) or fmt == "qwen2_moe", "attention biases (attention_bias=true)")
    need(not c.get("mlp_bias", False), "MLP biases (mlp_bias=true)")
    theta, rope_scaling = read_rope(c, attn)
    kw = {"max_position_embeddings": 4096, **_fields(c, fmt, _COMMON, required=_SIZES)}
    kw.update(
        attn_type=attn,
        rope_theta=theta,
        rope_scaling=rope_scaling,
        tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
        router_jitter=0.0,
    )
    if attn == "mla":
        return {**kw, **_fields(c, fmt, _MLA, required=_MLA), "q_lora_rank": c.get("q_lora_rank")}
    kw.update(_fields(c, fmt, ("num_key_value_heads", "head_dim")))
    # q/k norms: Qwen3 per head; OLMoE over the whole projection; GLM-4.5 per head when use_qk_norm
    qk = {"qwen3_moe": "head", "olmoe": "full"}.get(fmt, "head" if c.get("use_qk_norm") else "none")
    kw["qk_norm"] = qk
    if qk == "full" and "head_dim" in kw:  # transformers sizes OLMoE's q_norm by hidden_size
        heads_width = int(kw["head_dim"]) * int(kw["num_attention_heads"])
        need(
            heads_width == kw["hidden_size"],
            f"OLMoE q/k norms with head_dim * heads ({heads_width}) != hidden_size",
        )
    need(c.get("clip_qkv") is None, f"clipped q/k/v (clip_qkv={c.get('clip_qkv')})")
    prf = (c.get("rope_parameters") or {}).get("partial_rotary_factor", c.get("partial_rotary_factor"))
    _check_number("partial_rotary_factor", prf)  # also where it sits in rope_parameters
    if prf is None:
        prf = 0.5 if fmt == "glm4_moe" else 1.0  # GLM's config default
    need(float(prf) == 1.0, f"partial rotary embeddings (partial_rotary_factor={prf})")
    sliding = c.get("use_sliding_window", c.get("sliding_window") is not None and fmt == "mixtral")
    need(not sliding, "sliding-window attention")
    return kw


def _deepseek_family(c: dict, fmt: str, L: int, k: int) -> dict:
    """deepseek (DeepSeekMoE), deepseek_v2, deepseek_v3, glm4_moe: DeepSeek's MoE config keys."""
    E = int(c.get("n_routed_experts") or 0)
    need(int(c.get("moe_layer_freq") or 1) == 1, "MoE layers only every moe_layer_freq layers")
    kw = dict(
        n_routed_experts=E,
        n_shared_experts=int(c.get("n_shared_experts") or 0),
        moe_intermediate_size=int(c.get("moe_intermediate_size", 1)),
        first_k_dense_replace=min(int(c.get("first_k_dense_replace") or 0), L) if E > 0 else L,
        n_group=int(c.get("n_group") or 1),
        topk_group=int(c.get("topk_group") or 1),
        routed_scaling_factor=float(c.get("routed_scaling_factor", 1.0)),
    )
    norm = bool(c.get("norm_topk_prob", fmt in ("deepseek_v3", "glm4_moe")))
    if fmt in ("deepseek", "deepseek_v2"):
        need(c.get("scoring_func", "softmax") == "softmax", f"scoring_func={c.get('scoring_func')!r}")
        method = c.get("topk_method", "greedy")
        need(method in ("greedy", "group_limited_greedy"), f"topk_method={method!r}")
        if fmt == "deepseek_v2":  # transformers ignores it, DeepSeek's own code applies it
            need(not (norm and k > 1), "norm_topk_prob=true in a deepseek_v2 config")
        if method == "greedy":
            kw.update(n_group=1, topk_group=1)
        return {
            **kw,
            "scoring_func": "softmax",
            "topk_method": method,
            "norm_topk_prob": norm,
            "aux_free_bias": False,
        }
    # DeepSeekMoE and V2 skip the renormalisation for top-1 as minimoe does; V3 and GLM do not
    need(not (norm and k == 1), "top-1 routing with norm_topk_prob=true (every weight is a constant)")
    return {
        **kw,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "norm_topk_prob": norm,
        "aux_free_bias": True,
    }


def _softmax_family(c: dict, fmt: str, L: int, k: int) -> dict:
    """mixtral, qwen2_moe, qwen3_moe, olmoe: softmax routers without groups, bias or scaling."""
    # transformers 5 saves Qwen3-MoE's expert count as num_local_experts, the published files num_experts
    E = int(c.get(config_key("n_routed_experts", fmt)) or c.get("num_local_experts") or 0)
    mis = int(c.get(config_key("moe_intermediate_size", fmt)) or 1)
    norm = fmt == "mixtral" or bool(c.get("norm_topk_prob", False))
    need(
        not (norm and k == 1), "top-1 routing with renormalised top-k weights (every weight is a constant 1)"
    )
    shared = int(c.get("shared_expert_intermediate_size") or 0) if fmt == "qwen2_moe" else 0
    need(shared % mis == 0, "a shared expert whose width is not a multiple of moe_intermediate_size")
    only = c.get("mlp_only_layers") or []
    if not isinstance(only, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in only):
        raise MinimoeError(
            f"config.json field 'mlp_only_layers' must be a list of layer numbers, got {only!r}"
        )
    only = sorted(only)
    need(int(c.get("decoder_sparse_step") or 1) == 1, "MoE layers only every decoder_sparse_step layers")
    need(only == list(range(len(only))), "dense layers that are not the first ones (mlp_only_layers)")
    return dict(
        n_routed_experts=E,
        n_shared_experts=shared // mis,
        moe_intermediate_size=mis,
        first_k_dense_replace=len(only) if E > 0 else L,
        scoring_func="softmax",
        topk_method="greedy",
        norm_topk_prob=norm,
        aux_free_bias=False,
        aux_loss_alpha=float(c.get("router_aux_loss_coef", 0.0) or 0.0),
    )


def model_config(c: dict, hub: dict[str, torch.Tensor]) -> tuple[ModelConfig, str, list[str]]:
    """Translate config.json into a ModelConfig.

    Args:
        c: the parsed config.json.
        hub: the checkpoint's tensors (to count MTP layers).
    Returns:
        (ModelConfig, format, notes).
    """
    fmt = c.get("model_type")
    if fmt not in FORMATS:
        dense = (
            f" ({fmt} is a dense model: `minimoe upcycle DIR --experts N --top-k K --out RUN` builds an MoE from it)"
            if fmt in DENSE_TYPES
            else ""
        )
        raise MinimoeError(
            f"model_type {fmt!r} is not importable; minimoe imports {', '.join(FORMATS)}{dense}"
        )
    c = {**HF_DEFAULTS.get(fmt, {}), **c}
    _check_numbers(c)
    L = int(c["num_hidden_layers"])
    k = int(c.get("num_experts_per_tok") or 1)
    kw = _attention(c, fmt)
    if fmt not in ("mixtral", "olmoe"):  # their intermediate_size is the experts' width
        kw["intermediate_size"] = int(c.get("intermediate_size", 1))
    family = _deepseek_family if fmt in (*MLA_FORMATS, "deepseek", "glm4_moe") else _softmax_family
    kw.update(family(c, fmt, L, k), num_experts_per_tok=k)
    # MTP modules: the layers after the main ones that the checkpoint really holds
    notes: list[str] = []
    mtp = 0
    if fmt in ("deepseek_v3", "glm4_moe"):
        while f"model.layers.{L + mtp}.eh_proj.weight" in hub:
            mtp += 1
        listed = int(c.get("num_nextn_predict_layers", 0) or 0)
        if listed != mtp:
            notes.append(
                f"config.json lists {listed} MTP layer(s), the checkpoint holds {mtp}: imported {mtp}"
            )
    kw["mtp_depth"] = mtp
    try:
        kw = {name: _cast(name, v) for name, v in kw.items()}
        return ModelConfig(**kw).validate(), fmt, notes
    except MinimoeError as e:
        raise MinimoeError(f"the checkpoint's config does not give a valid minimoe model: {e}") from None


def _cast(name: str, v):
    """config.json numbers as the field's type (JSON may write 2048.0 for an int)."""
    default = getattr(ModelConfig, name, None)
    if isinstance(default, bool) or v is None:
        return v
    if isinstance(default, int) or name in ("num_key_value_heads", "head_dim", "q_lora_rank"):
        return int(v)
    if isinstance(default, float):
        return float(v)
    return v
