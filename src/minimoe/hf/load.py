"""Import a local Hugging Face checkpoint folder (DeepSeek-V3/V2, GLM-4-MoE, Mixtral, Qwen2-MoE)
into a minimoe run directory with the same logits.

Each format's config maps to one `ModelConfig`; weights are renamed by `keymap.from_hub` and the
exact re-parameterisations of the exporter are undone. A feature minimoe cannot express (attention
biases that are not zero, a learned shared-expert gate, q/k norms, sliding windows, half-split MLA
RoPE is fine: its rows are permuted) is refused with one sentence naming it.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
import yaml

from minimoe.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from minimoe.errors import MinimoeError
from minimoe.hf import keymap
from minimoe.model.rope import yarn_get_mscale

SUPPORTED = keymap.FORMATS


def read_config(hf_dir: Path) -> dict:
    """config.json of a checkpoint folder, with one clear sentence when it is missing or broken."""
    f = hf_dir / "config.json"
    if not hf_dir.exists():
        raise MinimoeError(f"{hf_dir} does not exist")
    if not hf_dir.is_dir():
        raise MinimoeError(f"{hf_dir} is not a directory")
    if not f.is_file():
        raise MinimoeError(f"{hf_dir} has no config.json, so it is not a Hugging Face checkpoint folder")
    try:
        c = json.loads(f.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise MinimoeError(f"{f} is not valid JSON") from None
    if not isinstance(c, dict):
        raise MinimoeError(f"{f} does not hold a JSON object")
    return c


def load_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of `model.safetensors` or of the shards named by `model.safetensors.index.json`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError):
            raise MinimoeError(f"{index} is not a valid safetensors index") from None
    elif (hf_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    elif any(hf_dir.glob("*.bin")):
        raise MinimoeError(f"{hf_dir} holds PyTorch .bin weights; minimoe imports safetensors only")
    else:
        raise MinimoeError(f"{hf_dir} has no model.safetensors (or model.safetensors.index.json)")
    out: dict[str, torch.Tensor] = {}
    for name in files:
        path = hf_dir / name
        if not path.is_file():
            raise MinimoeError(f"the index names {name}, which is missing from {hf_dir}")
        try:
            out.update(load_file(str(path)))
        except (SafetensorError, OSError) as e:
            raise MinimoeError(f"{path} is corrupt or truncated ({str(e).splitlines()[0]})") from None
    return out


def _rope(c: dict, attn: str) -> tuple[float, dict | None]:
    """(rope_theta, minimoe rope_scaling) from `rope_parameters` (transformers 5) or the legacy keys."""
    rp = c.get("rope_scaling") or c.get("rope_parameters") or {}
    theta = float(rp.get("rope_theta", c.get("rope_theta", 10000.0)))
    kind = rp.get("rope_type", rp.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "yarn":
        raise MinimoeError(
            f"RoPE scaling of type {kind!r} has no minimoe equivalent (only YaRN is supported)"
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
        if af is not None:
            implied = (
                yarn_get_mscale(factor, ms) / yarn_get_mscale(factor, ms_all)
                if ms and ms_all
                else yarn_get_mscale(factor)
            )
            if not math.isclose(float(af), implied, rel_tol=1e-9):
                raise MinimoeError(f"an MLA YaRN attention_factor of {af} has no minimoe equivalent")
        return theta, rs
    # GQA: q.k is scaled by attention_factor^2 (RoPE covers the whole head). minimoe gives
    # mscale(f, m)^2 with mscale = mscale_all_dim = m (cos/sin factor 1, softmax factor mscale^2).
    if af is None:
        af = (
            yarn_get_mscale(factor, ms) / yarn_get_mscale(factor, ms_all)
            if ms and ms_all
            else yarn_get_mscale(factor)
        )
    af = float(af)
    if factor > 1 and not math.isclose(af, yarn_get_mscale(factor), rel_tol=1e-12):
        m = (af - 1.0) / (0.1 * math.log(factor))
        rs["mscale"] = rs["mscale_all_dim"] = m
    elif factor <= 1 and af != 1.0:
        raise MinimoeError(f"a YaRN attention_factor of {af} with factor {factor} has no minimoe equivalent")
    return theta, rs


def _need(cond: bool, feature: str) -> None:
    if not cond:
        raise MinimoeError(f"the checkpoint uses {feature}, which minimoe cannot express")


# config.json fields that model_config reads as numbers
_NUMERIC = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "max_position_embeddings", "rms_norm_eps", "initializer_range", "intermediate_size", "q_lora_rank",
    "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "num_experts_per_tok",
    "n_routed_experts", "n_shared_experts", "moe_intermediate_size", "first_k_dense_replace", "moe_layer_freq",
    "n_group", "topk_group", "routed_scaling_factor", "num_local_experts", "router_aux_loss_coef", "num_experts",
    "shared_expert_intermediate_size", "decoder_sparse_step", "num_nextn_predict_layers",
)  # fmt: skip


def _check_numbers(c: dict) -> None:
    """One sentence naming the first config.json field that should be a number and is not."""
    for key in _NUMERIC:
        v = c.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int | float)):
            raise MinimoeError(f"config.json field {key!r} must be a number, got {v!r}")


def model_config(c: dict, hub: dict[str, torch.Tensor]) -> tuple[ModelConfig, str, list[str]]:
    """Translate config.json into a ModelConfig.

    Args:
        c: the parsed config.json.
        hub: the checkpoint's tensors (to count MTP layers and check optional tensors).
    Returns:
        (ModelConfig, format, notes).
    """
    fmt = c.get("model_type")
    if fmt in ("qwen3_moe", "olmoe"):
        raise MinimoeError(
            f"{fmt} normalises queries and keys per head (q_norm/k_norm), which minimoe attention does not have"
        )
    if fmt not in SUPPORTED:
        raise MinimoeError(f"model_type {fmt!r} is not importable; minimoe imports {', '.join(SUPPORTED)}")
    _check_numbers(c)
    notes: list[str] = []
    L = int(c["num_hidden_layers"])
    _need(
        c.get("hidden_act", "silu") == "silu",
        f"hidden_act={c.get('hidden_act')!r} (minimoe's FFNs are SwiGLU)",
    )
    _need(
        not c.get("attention_bias", False) or fmt in ("qwen2_moe",), "attention biases (attention_bias=true)"
    )
    _need(not c.get("mlp_bias", False), "MLP biases (mlp_bias=true)")
    attn = "mla" if fmt in ("deepseek_v3", "deepseek_v2") else "gqa"
    theta, rope_scaling = _rope(c, attn)
    kw = dict(
        vocab_size=int(c["vocab_size"]),
        hidden_size=int(c["hidden_size"]),
        n_layers=L,
        n_heads=int(c["num_attention_heads"]),
        max_seq_len=int(c.get("max_position_embeddings", 4096)),
        attn_type=attn,
        rope_theta=theta,
        rope_scaling=rope_scaling,
        rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
        init_std=float(c.get("initializer_range", 0.02)),
        intermediate_size=int(c.get("intermediate_size", 1)),
        router_jitter=0.0,
    )
    if attn == "mla":
        kw.update(
            q_lora_rank=c.get("q_lora_rank"),
            kv_lora_rank=int(c["kv_lora_rank"]),
            qk_nope_head_dim=int(c["qk_nope_head_dim"]),
            qk_rope_head_dim=int(c["qk_rope_head_dim"]),
            v_head_dim=int(c["v_head_dim"]),
        )
    else:
        kw.update(n_kv_heads=int(c.get("num_key_value_heads") or c["num_attention_heads"]))
        head_dim = c.get("head_dim")
        if head_dim:
            kw["head_dim"] = int(head_dim)
        _need(not c.get("use_qk_norm", False), "per-head q/k norms (use_qk_norm=true)")
        prf = (c.get("rope_parameters") or {}).get("partial_rotary_factor", c.get("partial_rotary_factor"))
        if prf is None:
            prf = 0.5 if fmt == "glm4_moe" else 1.0  # GLM's config default
        _need(float(prf) == 1.0, f"partial rotary embeddings (partial_rotary_factor={prf})")
        sliding = c.get("use_sliding_window", c.get("sliding_window") is not None and fmt == "mixtral")
        _need(not sliding, "sliding-window attention")

    k = int(c.get("num_experts_per_tok") or 1)
    if fmt in ("deepseek_v3", "deepseek_v2", "glm4_moe"):
        E = int(c.get("n_routed_experts") or 0)
        first_dense = min(int(c.get("first_k_dense_replace") or 0), L)
        _need(int(c.get("moe_layer_freq", 1)) == 1, "MoE layers only every moe_layer_freq layers")
        kw.update(
            n_routed_experts=E,
            n_shared_experts=int(c.get("n_shared_experts") or 0),
            moe_intermediate_size=int(c.get("moe_intermediate_size", 1)),
            first_k_dense=first_dense if E > 0 else L,
            n_group=int(c.get("n_group") or 1),
            topk_group=int(c.get("topk_group") or 1),
            routed_scaling_factor=float(c.get("routed_scaling_factor", 1.0)),
        )
        if fmt == "deepseek_v2":
            method = c.get("topk_method", "greedy")
            _need(method in ("greedy", "group_limited_greedy"), f"topk_method={method!r}")
            if method == "greedy":
                kw.update(n_group=1, topk_group=1)
            kw.update(scoring_func="softmax", norm_topk_prob=False, aux_free_bias=False)
        else:
            norm = bool(c.get("norm_topk_prob", True))
            _need(
                not (norm and k == 1), "top-1 routing with norm_topk_prob=true (every weight is a constant)"
            )
            kw.update(scoring_func="sigmoid", norm_topk_prob=norm, aux_free_bias=True)
    elif fmt == "mixtral":
        _need(k > 1, "top-1 Mixtral routing (its renormalised weight is a constant 1)")
        kw.update(
            n_routed_experts=int(c["num_local_experts"]),
            n_shared_experts=0,
            moe_intermediate_size=int(c["intermediate_size"]),
            first_k_dense=0,
            scoring_func="softmax",
            norm_topk_prob=True,
            aux_free_bias=False,
            aux_loss_alpha=float(c.get("router_aux_loss_coef", 0.0) or 0.0),
        )
    elif fmt == "qwen2_moe":
        E = int(c.get("num_experts") or 0)
        mis = int(c.get("moe_intermediate_size", 1))
        shared = int(c.get("shared_expert_intermediate_size") or 0)
        _need(shared % mis == 0, "a shared expert whose width is not a multiple of moe_intermediate_size")
        only = sorted(int(i) for i in (c.get("mlp_only_layers") or []))
        _need(int(c.get("decoder_sparse_step", 1)) == 1, "MoE layers only every decoder_sparse_step layers")
        _need(only == list(range(len(only))), "dense layers that are not the first ones (mlp_only_layers)")
        norm = bool(c.get("norm_topk_prob", False))
        _need(not (norm and k == 1), "top-1 routing with norm_topk_prob=true (every weight is a constant)")
        kw.update(
            n_routed_experts=E,
            n_shared_experts=shared // mis,
            moe_intermediate_size=mis,
            first_k_dense=len(only) if E > 0 else L,
            scoring_func="softmax",
            norm_topk_prob=norm,
            aux_free_bias=False,
            aux_loss_alpha=float(c.get("router_aux_loss_coef", 0.0) or 0.0),
        )
    kw["num_experts_per_tok"] = k
    # MTP modules: the layers after the main ones that the checkpoint really holds
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
        return ModelConfig(**kw).validate(), fmt, notes
    except MinimoeError as e:
        raise MinimoeError(f"the checkpoint's config does not give a valid minimoe model: {e}") from None


def _deinterleave_rows(w: torch.Tensor, heads: int, head_dim: int, nope: int, rope: int) -> torch.Tensor:
    """Permute the RoPE rows of a projection from the half-split layout (pairs i, i + d/2) to the
    interleaved one (pairs 2i, 2i+1). q.k is unchanged: both sides get the same permutation."""
    perm = torch.arange(rope).view(2, rope // 2).t().reshape(-1)  # new row 2i <- i, 2i+1 <- i + d/2
    w = w.view(heads, head_dim, -1)  # (H, nope+rope, in)
    w = torch.cat([w[:, :nope], w[:, nope:][:, perm]], dim=1)
    return w.reshape(heads * head_dim, -1)


def _undo_reparameterisation(hub: dict, c: dict, cfg: ModelConfig, fmt: str) -> tuple[dict, set[str]]:
    """Fold format-specific tensors back into minimoe's parameterisation; returns (hub, names handled)."""
    hub = dict(hub)
    handled: set[str] = set()
    L = cfg.n_layers
    for i in range(L + cfg.mtp_depth):
        pre = f"model.layers.{i}."
        if fmt == "qwen2_moe" and cfg.is_moe_layer(i):
            gate = hub.get(pre + "mlp.shared_expert_gate.weight")
            if gate is not None:
                handled.add(pre + "mlp.shared_expert_gate.weight")
                if cfg.n_shared_experts > 0:
                    _need(
                        bool((gate == 0).all()),
                        "a learned sigmoid gate on the shared expert (shared_expert_gate)",
                    )
                    d = pre + "mlp.shared_expert.down_proj.weight"
                    hub[d] = hub[d] * 0.5  # sigmoid(0) = 1/2, a power of two: exact
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            b = pre + f"self_attn.{proj}.bias"
            if b in hub:
                _need(bool((hub[b] == 0).all()), f"attention biases ({proj}.bias is not zero)")
                handled.add(b)
        if cfg.n_shared_experts == 0:  # zero-size shared experts, as HF saves them
            handled.update(
                n for n in hub if n.startswith(pre) and "shared_expert" in n and hub[n].numel() == 0
            )
            if fmt == "qwen2_moe":
                handled.add(pre + "mlp.shared_expert_gate.weight")
        if fmt in ("deepseek_v3", "glm4_moe") and i >= L:
            handled.update({pre + "embed_tokens.weight", pre + "shared_head.head.weight"})
        if fmt == "deepseek_v3" and c.get("rope_interleave", True) is False:
            H, nope, rope = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
            q = pre + ("self_attn.q_proj.weight" if cfg.q_lora_rank is None else "self_attn.q_b_proj.weight")
            if q in hub:
                hub[q] = _deinterleave_rows(hub[q], H, nope + rope, nope, rope)
                kv = pre + "self_attn.kv_a_proj_with_mqa.weight"
                hub[kv] = _deinterleave_rows(hub[kv], 1, cfg.kv_lora_rank + rope, cfg.kv_lora_rank, rope)
    return hub, handled


def import_state_dict(hf_dir: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], str, list[str]]:
    """Read a checkpoint folder into (ModelConfig, minimoe fp32 state dict, format, notes)."""
    from minimoe.model.transformer import Transformer

    hf_dir = Path(hf_dir)
    c = read_config(hf_dir)
    hub = load_tensors(hf_dir)
    try:
        cfg, fmt, notes = model_config(c, hub)
    except KeyError as e:  # a field model_config needs for this model_type
        raise MinimoeError(f"{hf_dir / 'config.json'} has no {e.args[0]!r}") from None
    hub, handled = _undo_reparameterisation(hub, c, cfg, fmt)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(cfg).state_dict().items()}
    sd, used = keymap.from_hub(hub, shapes, cfg.n_layers, fmt, cfg.tie_word_embeddings)
    leftover = set(hub) - used - handled
    if cfg.tie_word_embeddings:
        leftover.discard("lm_head.weight")  # some tools save the tied head too
    leftover = sorted(n for n in leftover if not n.endswith("rotary_emb.inv_freq"))
    if leftover:
        raise MinimoeError(
            f"the checkpoint has weight {leftover[0]}, which has no place in the minimoe model"
        )
    sd = {
        k: v.to(torch.float32) if k.endswith("e_score_correction_bias") or v.is_floating_point() else v
        for k, v in sd.items()
    }
    return cfg, sd, fmt, notes


def _tokenizer(hf_dir: Path, spec: str | None):
    from minimoe.data import Tokenizer, resolve_tokenizer

    if spec is not None:
        return resolve_tokenizer(spec)
    if (hf_dir / "tokenizer.json").is_file():
        return Tokenizer.load(hf_dir)
    raise MinimoeError(
        f"{hf_dir} has no tokenizer.json; pass --tokenizer (byte, or a folder holding a tokenizer.json)"
    )


def import_hf(
    hf_dir: str | Path, out_dir: str | Path, tokenizer: str | None = None, force: bool = False
) -> tuple[Path, str, list[str]]:
    """Turn a Hugging Face checkpoint folder into a minimoe run directory (config.yaml, tokenizer/,
    checkpoints/step_00000000/) that `load_run` and `minimoe generate` read.

    Args:
        hf_dir: the checkpoint folder (config.json + safetensors).
        out_dir: the run directory to create.
        tokenizer: tokenizer spec when the folder has none (`byte` or a path).
        force: write into an existing run directory.
    Returns:
        (checkpoint directory, source format, notes).
    """
    from minimoe.model.transformer import Transformer

    hf_dir, out = Path(hf_dir), Path(out_dir)
    if (out / "checkpoints").exists() and any((out / "checkpoints").iterdir()) and not force:
        raise MinimoeError(f"{out} already holds a run; choose another --out or pass --force")
    cfg, sd, fmt, notes = import_state_dict(hf_dir)
    tok = _tokenizer(hf_dir, tokenizer)
    if tok.vocab_size > cfg.vocab_size:
        raise MinimoeError(
            f"the tokenizer has {tok.vocab_size} tokens but the model only {cfg.vocab_size} embeddings"
        )
    model = Transformer(cfg)
    model.load_state_dict(sd, strict=not cfg.tie_word_embeddings)
    return write_run(out, model, tok, {"source": str(hf_dir.resolve()), "format": fmt}), fmt, notes


def write_run(out: Path, model, tokenizer, info: dict, run_cfg: RunConfig | None = None) -> Path:
    """Write `model` as step 0 of a new run directory (shared by import, upcycle and adapter merging).

    Checkpoints already in `out` are replaced (the callers ask for --force first).

    Args:
        out: the run directory.
        model: a minimoe Transformer.
        tokenizer: saved in RUN/tokenizer and in the checkpoint.
        info: extra checkpoint metadata (source, format, ...).
        run_cfg: train/data settings to record; default TrainConfig with seq_len <= max_seq_len.
    Returns:
        The checkpoint directory.
    """
    from minimoe.train.checkpoint import CKPT, save_checkpoint

    cfg = model.cfg
    if run_cfg is None:
        train = TrainConfig(seq_len=min(TrainConfig.seq_len, cfg.max_seq_len))
        run_cfg = RunConfig(model=cfg, train=train, data=DataConfig())
    run_cfg.model = cfg
    text = yaml.safe_dump(run_cfg.validate().to_dict(), sort_keys=False)
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / CKPT, ignore_errors=True)  # save_checkpoint would keep an existing step_00000000
    (out / "config.yaml").write_text(text, encoding="utf-8")
    tokenizer.save(out / "tokenizer")
    meta = {"step": 0, "tokens": 0, "val_loss": None, **info}
    return save_checkpoint(out, 0, model, {"step": 0}, meta, text, tokenizer, is_best=True)
