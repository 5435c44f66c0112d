"""Sparse upcycling: initialise a GQA MoE from a dense Llama-family checkpoint (Komatsuzaki et al.,
"Sparse Upcycling"; fine-grained splitting as in DeepSeekMoE / Qwen1.5-MoE).

Embedding, attention, norms and head are copied. Each MoE layer's experts come from the layer's
dense SwiGLU MLP: with granularity G the intermediate dimension I is cut into G slices of I/G, and
expert e is slice e mod G (copies when experts > G). Because SwiGLU is separable over the
intermediate dimension, dense(x) = sum of the G slice-MLPs. The router is fresh.

At initialisation the MoE reproduces the dense model exactly when
- G = 1 and the top-k weights sum to 1 (norm_topk_prob with k > 1, or a single softmax-scored expert;
  a sigmoid top-1 weight is sigmoid(score), about 1/2): every expert is the same MLP;
- G = experts = k and the router is uniform (`router_std=0`) with routed_scaling_factor = G: every
  slice is selected with weight 1.
Otherwise it starts close to the dense model and training does the rest. Llama's RoPE is the
half-split layout, so the result uses minimoe's GQA attention (same layout).
"""

from __future__ import annotations

from pathlib import Path

import torch

from minimoe.config import ModelConfig, RunConfig
from minimoe.config_yaml import set_dotted
from minimoe.errors import MinimoeError
from minimoe.files import check_new_run_dir
from minimoe.hf.import_config import DENSE_TYPES, read_rope
from minimoe.hf.load import _tokenizer, load_tensors, read_config
from minimoe.train.checkpoint import write_run

# fields fixed by the dense checkpoint and the command's options; overrides may change the rest
_FIXED = {
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "attn_type", "intermediate_size",
    "n_routed_experts", "moe_intermediate_size", "first_k_dense_replace", "num_experts_per_tok", "tie_word_embeddings",
    "n_shared_experts", "expert_act", "rope_theta", "rope_scaling", "rms_norm_eps",
}  # fmt: skip


_REQUIRED = object()


def _reader(c: dict):
    """num(key, cast=int, default): c[key] as a number; a missing required key or a value that is not a
    number is one sentence naming the key."""

    def num(key: str, cast=int, default=_REQUIRED):
        v = c.get(key)
        if v is None:
            if default is _REQUIRED:
                raise MinimoeError(f"config.json has no {key!r}, which upcycling needs")
            return default
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise MinimoeError(f"config.json field {key!r} must be a number, got {v!r}")
        return cast(v)

    return num


def upcycle_config(
    c: dict, experts: int, top_k: int, granularity: int, dense_layers: int, scoring: str, overrides: list[str]
) -> ModelConfig:
    """The MoE ModelConfig for a dense config.json.

    Args:
        c: the dense model's config.json.
        experts, top_k: routed experts per MoE layer and experts per token.
        granularity: slices of the dense intermediate dimension (G).
        dense_layers: leading layers kept dense.
        scoring: "softmax" or "sigmoid".
        overrides: dotted `model.KEY=VALUE` overrides for routing / balancing / training fields.
    """
    mt = c.get("model_type")
    if mt not in DENSE_TYPES:
        raise MinimoeError(
            f"upcycling reads dense Llama-family checkpoints ({', '.join(DENSE_TYPES)}), not {mt!r}"
        )
    if c.get("hidden_act", "silu") != "silu":
        raise MinimoeError(f"the dense MLP uses {c.get('hidden_act')!r}, not SwiGLU (silu)")
    if c.get("mlp_bias"):
        raise MinimoeError("the dense MLP has biases (mlp_bias=true), which minimoe experts do not have")
    if c.get("sliding_window") and c.get("use_sliding_window", mt == "mistral"):
        raise MinimoeError("the checkpoint uses sliding-window attention, which minimoe does not have")
    num = _reader(c)
    inter = num("intermediate_size")
    if granularity < 1 or inter % granularity:
        raise MinimoeError(f"--granularity {granularity} does not divide intermediate_size ({inter})")
    if experts < 1 or experts % granularity:
        raise MinimoeError(
            f"--experts ({experts}) must be a positive multiple of --granularity ({granularity})"
        )
    L = num("num_hidden_layers")
    if not 0 <= dense_layers < L:
        raise MinimoeError(f"--dense-layers must be between 0 and {L - 1}, got {dense_layers}")
    theta, rope_scaling = read_rope(c, "gqa")
    cfg = ModelConfig(
        vocab_size=num("vocab_size"),
        hidden_size=num("hidden_size"),
        num_hidden_layers=L,
        num_attention_heads=num("num_attention_heads"),
        num_key_value_heads=num("num_key_value_heads", default=num("num_attention_heads")),
        head_dim=num("head_dim", default=None),
        max_position_embeddings=num("max_position_embeddings", default=2048),
        attn_type="gqa",
        rope_theta=theta,
        rope_scaling=rope_scaling,
        intermediate_size=inter,
        first_k_dense_replace=dense_layers,
        n_routed_experts=experts,
        n_shared_experts=0,
        num_experts_per_tok=top_k,
        moe_intermediate_size=inter // granularity,
        scoring_func=scoring,
        norm_topk_prob=True,
        # each selected slice carries ~G/k of the dense MLP's weight: with k = G and a uniform router, exactly 1
        routed_scaling_factor=float(granularity),
        rms_norm_eps=num("rms_norm_eps", float, 1e-6),
        tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
        initializer_range=num("initializer_range", float, 0.02),
    )
    holder = RunConfig(model=cfg)
    for item in overrides:
        key, eq, value = item.partition("=")
        key = key.strip()
        if not key.startswith("model.") or not eq:
            raise MinimoeError(f"override {item!r} must be model.KEY=VALUE")
        if key.removeprefix("model.") in _FIXED:
            raise MinimoeError(f"{key} is fixed by the dense checkpoint or by the command's options")
        set_dotted(holder, key, value)
    return cfg.validate()


def upcycle_state_dict(
    dense: dict[str, torch.Tensor], cfg: ModelConfig, granularity: int, router_std: float, seed: int = 0
) -> dict[str, torch.Tensor]:
    """minimoe weights from dense hub-named weights.

    Args:
        dense: the dense checkpoint's tensors (hub names).
        cfg: the MoE config from `upcycle_config`.
        granularity: G, slices of the intermediate dimension.
        router_std: std of the fresh router weights (0 = uniform routing at the start).
        seed: for the router.
    Returns:
        A state dict for `Transformer(cfg)` (fp32).
    """
    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def take(name: str, *shape: int) -> torch.Tensor:
        if name not in dense:
            raise MinimoeError(f"the dense checkpoint has no weight {name}")
        if tuple(dense[name].shape) != shape:  # a config.json that does not describe these weights
            raise MinimoeError(
                f"weight {name} has shape {tuple(dense[name].shape)}, the config implies {shape}"
            )
        return dense[name].to(torch.float32)

    D, V, inter = cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.gqa_head_dim, cfg.kv_heads * cfg.gqa_head_dim
    proj_shapes = dict(q_proj=(q, D), k_proj=(kv, D), v_proj=(kv, D), o_proj=(D, q))
    sd["embed_tokens.weight"] = take("model.embed_tokens.weight", V, D)
    sd["norm.weight"] = take("model.norm.weight", D)
    if not cfg.tie_word_embeddings:
        sd["lm_head.weight"] = take("lm_head.weight", V, D)
    I, E = cfg.moe_intermediate_size, cfg.n_routed_experts
    for i in range(cfg.num_hidden_layers):
        pre, ours = f"model.layers.{i}.", f"layers.{i}."
        for name in ("input_layernorm", "post_attention_layernorm"):
            sd[f"{ours}{name}.weight"] = take(f"{pre}{name}.weight", D)
        for proj, shape in proj_shapes.items():
            sd[f"{ours}self_attn.{proj}.weight"] = take(f"{pre}self_attn.{proj}.weight", *shape)
            bias = dense.get(f"{pre}self_attn.{proj}.bias")
            if bias is not None and bool((bias != 0).any()):
                raise MinimoeError(
                    f"the dense model has attention biases ({proj}.bias), which minimoe does not have"
                )
        gate, up = (take(f"{pre}mlp.{p}.weight", inter, D) for p in ("gate_proj", "up_proj"))
        down = take(f"{pre}mlp.down_proj.weight", D, inter)
        if not cfg.is_moe_layer(i):
            sd.update(
                {
                    f"{ours}mlp.gate_proj.weight": gate,
                    f"{ours}mlp.up_proj.weight": up,
                    f"{ours}mlp.down_proj.weight": down,
                }
            )
            continue
        slice_of = [e % granularity for e in range(E)]
        gate_GID = gate.view(granularity, I, -1)  # (G, I/G, D): row slices of the intermediate dim
        up_GID = up.view(granularity, I, -1)
        down_GDI = down.view(down.shape[0], granularity, I).transpose(0, 1)  # (G, D, I/G)
        sd[f"{ours}mlp.experts.gate_proj"] = gate_GID[slice_of].clone()  # (E, I/G, D)
        sd[f"{ours}mlp.experts.up_proj"] = up_GID[slice_of].clone()
        sd[f"{ours}mlp.experts.down_proj"] = down_GDI[slice_of].contiguous()  # (E, D, I/G)
        sd[f"{ours}mlp.gate.weight"] = torch.randn(E, cfg.hidden_size, generator=gen) * router_std
        if cfg.aux_free_bias:
            sd[f"{ours}mlp.gate.e_score_correction_bias"] = torch.zeros(E)
    return sd


def upcycle(
    dense_dir: str | Path,
    out_dir: str | Path,
    experts: int,
    top_k: int,
    granularity: int = 1,
    dense_layers: int = 0,
    scoring: str = "softmax",
    router_std: float | None = None,
    tokenizer: str | None = None,
    overrides: list[str] | None = None,
    seed: int = 0,
    force: bool = False,
) -> Path:
    """Write an upcycled MoE run directory from a dense Hugging Face Llama-family folder.

    Args:
        dense_dir: the dense checkpoint folder (config.json + safetensors).
        out_dir: run directory to create.
        experts, top_k, granularity, dense_layers, scoring: see `upcycle_config`.
        router_std: fresh router std (None = the config's initializer_range; 0 = uniform).
        tokenizer: tokenizer spec when the folder has no tokenizer.json.
        overrides: dotted `model.KEY=VALUE` overrides.
        seed: router initialisation seed.
        force: write into an existing run directory, or a non-empty folder (replacing its config.yaml, tokenizer/).
    Returns:
        The checkpoint directory written.
    """
    from minimoe.model.transformer import Transformer

    dense_dir, out = Path(dense_dir), Path(out_dir)
    if router_std is not None and not 0 <= router_std < float("inf"):  # NaN too
        raise MinimoeError(f"--router-std must be a finite number >= 0, got {router_std}")
    check_new_run_dir(out, force)
    c = read_config(dense_dir)
    cfg = upcycle_config(c, experts, top_k, granularity, dense_layers, scoring, list(overrides or []))
    tok = _tokenizer(dense_dir, tokenizer)
    if tok.vocab_size > cfg.vocab_size:
        raise MinimoeError(
            f"the tokenizer has {tok.vocab_size} tokens but the model only {cfg.vocab_size} embeddings"
        )
    std = cfg.initializer_range if router_std is None else router_std
    sd = upcycle_state_dict(load_tensors(dense_dir), cfg, granularity, std, seed)
    torch.manual_seed(seed)  # MTP modules, if asked for by an override, start fresh
    model = Transformer(cfg)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    fresh = [
        k
        for k in missing
        if not k.startswith("mtp.") and not (k == "lm_head.weight" and cfg.tie_word_embeddings)
    ]
    if fresh or unexpected:
        raise MinimoeError(f"upcycling produced a mismatched state dict ({(fresh or unexpected)[0]})")
    info = {
        "source": str(dense_dir.resolve()),
        "upcycled": {"experts": experts, "top_k": top_k, "granularity": granularity},
    }
    return write_run(out, model, tok, info)
