"""LoRA and QLoRA on minimoe models through PEFT.

Targets:
- "attention": q_proj / q_a_proj / q_b_proj / kv_a_proj_with_mqa (MLA), q/k/v_proj (GQA), o_proj;
  `kv_b_proj` is left out because absorbed MLA decoding reads its weight directly (a LoRA on it
  would be skipped when generating with the cache until merged);
- "experts": the stacked routed-expert tensors (E, I, D) through PEFT's `target_parameters`
  (one rank-r factor pair per expert, peft >= 0.17);
- "mlp": dense-layer and shared-expert SwiGLU projections.
Routers, norms, embedding and head stay frozen, and so does the aux-free balancing bias.

QLoRA stores the targeted nn.Linear weights in 4-bit NF4 (bitsandbytes `Linear4bit`, CUDA only)
and trains LoRA factors on top; the stacked experts have no 4-bit container there and stay in
bf16 with their LoRA factors.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from minimoe.errors import MinimoeError

TARGETS = ("attention", "experts", "mlp")
_ATTN = r"self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|k_proj|v_proj|o_proj)"
_MLP = r"mlp\.(shared_experts\.)?(gate_proj|up_proj|down_proj)"


def _peft():
    try:
        import peft
    except ImportError:
        raise MinimoeError("LoRA needs peft (pip install 'minimoe[hf]')") from None
    return peft


def target_spec(targets: tuple[str, ...] | list[str] = TARGETS) -> tuple[str | None, list[str]]:
    """(regex for `target_modules`, names for `target_parameters`) of the chosen target groups."""
    bad = [t for t in targets if t not in TARGETS]
    if bad or not targets:
        raise MinimoeError(
            f"LoRA targets must be among {', '.join(TARGETS)}, got {', '.join(targets) or 'none'}"
        )
    alts = ([_ATTN] if "attention" in targets else []) + ([_MLP] if "mlp" in targets else [])
    regex = rf".*\.({'|'.join(alts)})" if alts else None
    params = ["experts.gate_proj", "experts.up_proj", "experts.down_proj"] if "experts" in targets else []
    return regex, params


def qlora_available() -> str | None:
    """None when QLoRA can run here, else the reason in one sentence."""
    try:
        import bitsandbytes  # noqa: F401  # type: ignore[import-not-found]
    except ImportError:
        return "QLoRA needs bitsandbytes (pip install bitsandbytes), which is not installed; use plain LoRA"
    if not torch.cuda.is_available():
        return "QLoRA's 4-bit NF4 kernels run on a CUDA GPU and this machine has none; use plain LoRA"
    return None


def _quantize_linears(model: nn.Module, regex: str) -> None:
    """Swap the matched nn.Linear layers for bitsandbytes NF4 `Linear4bit` (quantized on .cuda())."""
    import re

    import bitsandbytes as bnb  # type: ignore[import-not-found]

    pattern = re.compile(regex)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and pattern.fullmatch(name):
            q = bnb.nn.Linear4bit(
                module.in_features,
                module.out_features,
                bias=False,
                compute_dtype=torch.bfloat16,
                quant_type="nf4",
            )
            q.weight = bnb.nn.Params4bit(module.weight.data.cpu(), requires_grad=False, quant_type="nf4")
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, q)
    model.cuda()


def apply_lora(model: nn.Module, r: int = 8, alpha: int = 16, targets=TARGETS, qlora: bool = False):
    """Wrap a minimoe Transformer with LoRA adapters (only they train).

    Args:
        model: a minimoe Transformer.
        r: rank; alpha: LoRA alpha (update scaled by alpha / r).
        targets: subset of TARGETS.
        qlora: quantize the targeted linear layers to 4-bit NF4 first (CUDA + bitsandbytes).
    Returns:
        The peft PeftModel; call it like the model.
    """
    peft = _peft()
    if r <= 0:
        raise MinimoeError(f"--rank must be positive, got {r}")
    regex, params = target_spec(tuple(targets))
    if params and not any(m.is_moe for m in model.layers):
        params = []  # a dense model has no stacked experts
    if qlora:
        why = qlora_available()
        if why:
            raise MinimoeError(why)
        model.to(torch.bfloat16)  # before quantizing: Params4bit quantizes what it is given on .cuda()
        if regex:
            _quantize_linears(model, regex)
    config = peft.LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=0.0,
        bias="none",
        target_modules=regex,
        target_parameters=params or None,
    )
    try:
        return peft.get_peft_model(model, config)
    except ValueError as e:
        raise MinimoeError(f"PEFT could not place LoRA adapters ({e})") from None


def save_adapter(
    peft_model, directory: str | Path, base: str | None = None, tokenizer=None, fingerprint: str | None = None
) -> Path:
    """Write the adapter (PEFT's adapter_config.json + adapter_model.safetensors), the base run, and the
    tokenizer it was trained with (its chat template), which a later merge gives the merged run.
    `fingerprint`: `base_fingerprint` of the base as it was loaded, taken before `apply_lora` (QLoRA
    casts and quantizes the weights it trains on; a merge loads them as saved); default: the model's."""
    d = Path(directory)
    peft_model.save_pretrained(str(d))
    info = {"base_run": base, "base_fingerprint": fingerprint or base_fingerprint(peft_model)}
    (d / "minimoe_base.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    if tokenizer is not None:
        tokenizer.save(d / "tokenizer")
    return d


def base_fingerprint(model: nn.Module) -> str:
    """A short hash of a model's own weights (LoRA's left out, under whatever names PEFT gave the base
    weights): which weights an adapter was trained on. Each tensor is sampled (about 1,024 values), so
    it costs little even for a large model."""
    parts = []
    for name, p in model.named_parameters():
        if "lora_" in name:
            continue
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 1024)].float().cpu().numpy().tobytes()
        parts.append((tuple(p.shape), sample))
    h = hashlib.sha256()
    for shape, sample in sorted(parts):
        h.update(repr(shape).encode())
        h.update(sample)
    return h.hexdigest()[:16]


def check_adapter_base(model: nn.Module, directory: str | Path) -> None:
    """MinimoeError when the adapter in `directory` was trained on weights other than `model`'s (another
    run, or another checkpoint of it). Adapters saved before the fingerprint was recorded pass."""
    try:
        info = json.loads((Path(directory) / "minimoe_base.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    want = info.get("base_fingerprint") if isinstance(info, dict) else None
    if want and want != base_fingerprint(model):
        trained_on = info.get("base_run") or "another run"
        raise MinimoeError(
            f"the adapter {directory} was trained on other weights ({trained_on}); give the run and "
            "--checkpoint it was trained on"
        )


def load_adapter(model: nn.Module, directory: str | Path):
    """Attach a saved adapter to a freshly loaded base model (inference mode)."""
    peft = _peft()
    d = Path(directory)
    if not (d / "adapter_config.json").is_file():
        raise MinimoeError(f"{d} is not a LoRA adapter folder (no adapter_config.json)")
    if not (d / "adapter_model.safetensors").is_file():
        # PEFT would fall back to a pickled adapter_model.bin; minimoe reads weights from safetensors only
        raise MinimoeError(
            f"{d} has no adapter_model.safetensors (minimoe loads adapter weights from safetensors only)"
        )
    return peft.PeftModel.from_pretrained(model, str(d))


def merge_lora(peft_model) -> nn.Module:
    """Fold the adapters into the base weights and return the plain minimoe Transformer."""
    merged = peft_model.merge_and_unload()
    for p in merged.parameters():
        p.requires_grad_(True)
    return merged


def merge_saved_adapter(
    run_dir: str | Path, adapter: str | Path, out_dir: str | Path, which: str = "best"
) -> Path:
    """Load the base run, attach a saved adapter, merge it, and write the result as a new run.

    Returns:
        The checkpoint directory written.
    """
    from minimoe.train.checkpoint import CKPT, check_not_quantized, load_run, write_run

    out = Path(out_dir)
    if (out / CKPT).exists() and any((out / CKPT).iterdir()):
        raise MinimoeError(f"{out} already holds a run; choose another --out")
    model, tok, cfg, meta = load_run(run_dir, which)
    check_not_quantized(model, meta, "merged with a LoRA adapter")
    check_adapter_base(model, adapter)
    if (Path(adapter) / "tokenizer").is_dir():  # the adapter's: the chat template it was trained with
        from minimoe.data import Tokenizer

        tok = Tokenizer.load(Path(adapter) / "tokenizer")
    merged = merge_lora(load_adapter(model, adapter))
    info = {"source": str(Path(meta["path"]).resolve()), "adapter": str(Path(adapter).resolve())}
    return write_run(out, merged, tok, info, run_cfg=cfg)


def compare_exported_adapter(
    model: nn.Module, adapter_dir: str | Path, hf_dir: str | Path, input_ids: torch.Tensor
) -> float:
    """Max |logit difference| between `model` with a saved adapter and the exported model with the
    adapter `minimoe.hf.export.export_adapter` wrote to hf_dir/adapter, loaded by PEFT (both fp32;
    `model` is copied)."""
    import copy

    from minimoe.hf.export import load_hf_fp32

    ours = load_adapter(copy.deepcopy(model).float(), adapter_dir).eval()
    theirs = _peft().PeftModel.from_pretrained(load_hf_fp32(hf_dir), str(Path(hf_dir) / "adapter")).eval()
    with torch.no_grad():
        return (ours(input_ids).logits - theirs(input_ids).logits).abs().max().item()
