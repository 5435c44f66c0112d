"""Import a local Hugging Face checkpoint folder (DeepSeek-V3/V2, DeepSeekMoE, Moonlight, GLM-4-MoE,
Mixtral, Qwen2/Qwen3-MoE, OLMoE) into a minimoe run directory with the same logits.

Each format's config maps to one `ModelConfig` (`import_config`); weights are renamed by
`keymap.from_hub` and the exact re-parameterisations of the exporter are undone. A feature minimoe
cannot express (attention biases that are not zero, a learned shared-expert gate, sliding windows;
half-split MLA RoPE is fine: its rows are permuted) is refused with one sentence naming it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from minimoe.config import ModelConfig
from minimoe.errors import MinimoeError
from minimoe.files import check_new_run_dir, read_json_object
from minimoe.hf import keymap
from minimoe.hf.import_config import model_config, need
from minimoe.train.checkpoint import write_run

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
    return read_json_object(f)


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
    L = cfg.num_hidden_layers
    for i in range(L + cfg.mtp_depth):
        pre = f"model.layers.{i}."
        if fmt == "qwen2_moe" and cfg.is_moe_layer(i):
            gate = hub.get(pre + "mlp.shared_expert_gate.weight")
            if gate is not None:
                handled.add(pre + "mlp.shared_expert_gate.weight")
                if cfg.n_shared_experts > 0:
                    need(
                        bool((gate == 0).all()),
                        "a learned sigmoid gate on the shared expert (shared_expert_gate)",
                    )
                    d = pre + "mlp.shared_expert.down_proj.weight"
                    hub[d] = hub[d] * 0.5  # sigmoid(0) = 1/2, a power of two: exact
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            b = pre + f"self_attn.{proj}.bias"
            if b in hub:
                need(bool((hub[b] == 0).all()), f"attention biases ({proj}.bias is not zero)")
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
            H, nope, rope = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
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
    # FP8 with block scales (DeepSeek-V3/R1 as published), GPTQ, AWQ, ...: refused before any weight is read
    quant = c.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "unknown") if isinstance(quant, dict) else quant
        raise MinimoeError(
            f"the checkpoint is quantized (quantization_config, quant_method={method!r}); minimoe imports "
            "unquantized bf16/fp16/fp32 weights, so dequantize it first"
        )
    hub = load_tensors(hf_dir)
    try:
        cfg, fmt, notes = model_config(c, hub)
    except KeyError as e:  # a field model_config needs for this model_type
        raise MinimoeError(f"{hf_dir / 'config.json'} has no {e.args[0]!r}") from None
    hub, handled = _undo_reparameterisation(hub, c, cfg, fmt)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(cfg).state_dict().items()}
    sd, used = keymap.from_hub(hub, shapes, cfg.num_hidden_layers, fmt, cfg.tie_word_embeddings)
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
        force: write into an existing run directory, or a non-empty folder (replacing its config.yaml, tokenizer/).
    Returns:
        (checkpoint directory, source format, notes).
    """
    from minimoe.model.transformer import Transformer

    hf_dir, out = Path(hf_dir), Path(out_dir)
    check_new_run_dir(out, force)
    cfg, sd, fmt, notes = import_state_dict(hf_dir)
    tok = _tokenizer(hf_dir, tokenizer)
    if tok.vocab_size > cfg.vocab_size:
        raise MinimoeError(
            f"the tokenizer has {tok.vocab_size} tokens but the model only {cfg.vocab_size} embeddings"
        )
    model = Transformer(cfg)
    model.load_state_dict(sd, strict=not cfg.tie_word_embeddings)
    return write_run(out, model, tok, {"source": str(hf_dir.resolve()), "format": fmt}), fmt, notes
