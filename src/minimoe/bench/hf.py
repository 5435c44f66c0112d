"""The Hugging Face twin of a minimoe model: `transformers`' DeepseekV3ForCausalLM built in memory from
the equivalent config, with the same weights copied in, so that a benchmark compares equal work.

The weights go through the exporter's own re-parameterisation and hub names (`minimoe.hf.export`),
then the per-expert hub tensors are packed into the 3-D `gate_up_proj` / `down_proj` parameters that
transformers holds in memory (it does the same packing when it loads a hub checkpoint).
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import torch

from minimoe.errors import MinimoeError
from minimoe.hf import formats
from minimoe.hf.export import hub_tensors

_EXPERT_KEY = re.compile(r"^(.*\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")


def pack_experts(hub: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hub names with one tensor per expert -> transformers' in-memory layout.

    `...experts.{e}.gate_proj.weight` (I, D) and `up_proj` (I, D) become `...experts.gate_up_proj`
    (E, 2I, D), gate rows first; `down_proj` (D, I) become `...experts.down_proj` (E, D, I).
    """
    out: dict[str, torch.Tensor] = {}
    per_layer: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
    for k, v in hub.items():
        m = _EXPERT_KEY.match(k)
        if m is None:
            out[k] = v
            continue
        prefix, e, kind = m.group(1), int(m.group(2)), m.group(3)
        per_layer.setdefault(prefix, {}).setdefault(kind, {})[e] = v
    for prefix, kinds in per_layer.items():
        stack = {kind: torch.stack([t[e] for e in sorted(t)]) for kind, t in kinds.items()}
        out[f"{prefix}.gate_up_proj"] = torch.cat([stack["gate"], stack["up"]], dim=1)  # (E, 2I, D)
        out[f"{prefix}.down_proj"] = stack["down"]  # (E, D, I)
    return out


def hf_twin(model, attn_implementation: str = "sdpa"):
    """DeepseekV3ForCausalLM computing the same function as `model` (same config, same weights).

    Args:
        model: a minimoe Transformer with MLA attention and sigmoid routing (the DeepSeek-V3 format).
        attn_implementation: transformers' attention backend ("sdpa" or "eager").
    Returns:
        the transformers model, on `model`'s device and dtype, in the same train/eval mode.
    """
    try:
        from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    except ImportError:
        raise MinimoeError("--against hf needs transformers (pip install 'minimoe[bench]')") from None
    cfg = model.cfg
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    if cfg.mtp_depth:
        raise MinimoeError(
            "--against hf needs model.mtp_depth=0: transformers' DeepseekV3 has no MTP training"
        )
    if cfg.capacity_factor is not None:
        raise MinimoeError(
            "--against hf needs a dropless model (model.capacity_factor=null), as transformers is"
        )
    fmt, why = formats.choose_format(cfg, bias_nonzero=False, fmt="deepseek_v3")
    if why is not None:
        hint = (
            " (model.attn_type=mla, or the reference config: --config benchmarks/configs/hf-reference.yaml)"
        )
        raise MinimoeError(
            f"--against hf compares with transformers' DeepseekV3, which cannot hold this model: {why}"
            + (hint if cfg.attn_type != "mla" else "")
        )
    ids = SimpleNamespace(bos_id=None, eos_id=None, pad_id=None)  # the benchmark never stops early
    conf = formats.hf_config(cfg, fmt, ids, "float32", mtp_layers=0)
    conf = {k: v for k, v in conf.items() if k not in ("architectures", "model_type", "torch_dtype", "dtype")}
    hc = DeepseekV3Config(**conf)
    hc._attn_implementation = attn_implementation
    param = next(model.parameters())
    hf = DeepseekV3ForCausalLM(hc).to(device=param.device, dtype=param.dtype)
    hub, _ = hub_tensors(sd, cfg, fmt, 0)
    # the exporter keeps the balancing bias in fp32, as checkpoints do; in memory it follows the model
    missing, unexpected = hf.load_state_dict(pack_experts(hub), strict=False)
    missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise RuntimeError(
            f"HF twin weights do not match: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf.train(model.training)


@torch.no_grad()
def max_logit_diff(model, hf, input_ids: torch.Tensor) -> float:
    """Max |logit difference| between `model` and its twin on `input_ids` (B, T), in eval mode."""
    was = model.training, hf.training
    model.eval(), hf.eval()
    try:
        return (model(input_ids).logits.float() - hf(input_ids=input_ids).logits.float()).abs().max().item()
    finally:
        model.train(was[0]), hf.train(was[1])
