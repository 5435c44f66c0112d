"""Export a minimoe model to a Hugging Face folder that `AutoModelForCausalLM.from_pretrained` and
vLLM load: config.json, model.safetensors (sharded with an index above `shard_size`), tokenizer
files, generation_config.json.

The format is chosen by `minimoe.hf.formats` (DeepSeek-V3 for sigmoid-routed MLA models). Exact
re-parameterisations (below) keep the logits identical; anything a format cannot express is
refused with one sentence. Writing goes to a temporary folder that is renamed into place, so an
interrupted export never leaves a half-written model behind.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from minimoe.config import ModelConfig
from minimoe.errors import MinimoeError
from minimoe.files import as_umask_allows, fresh_temp_dir
from minimoe.hf import formats, keymap

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)\s*$", re.IGNORECASE)


@dataclass
class ExportResult:
    out_dir: Path
    format: str
    files: list[str]
    weight_bytes: int
    notes: list[str] = field(default_factory=list)  # exact re-parameterisations and omissions, for the user


def parse_size(text: str | int) -> int:
    """'5GB' -> 5_000_000_000, '500MiB' -> 524_288_000, 1000 -> 1000 (bytes)."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(str(text))
    if not m:
        raise MinimoeError(f"shard size {text!r} is not a size such as 5GB, 500MB or 2GiB")
    num, unit = float(m.group(1)), m.group(2).lower()
    base = 1024 if "i" in unit else 1000
    power = {"": 0, "b": 0, "k": 1, "m": 2, "g": 3, "t": 4}[unit[:1] if unit[:1] in "kmgt" else ""]
    size = int(num * base**power)
    if size <= 0:
        raise MinimoeError(f"shard size {text!r} must be positive")
    return size


def _bias_nonzero(sd: dict[str, torch.Tensor]) -> bool:
    return any(k.endswith("e_score_correction_bias") and bool(v.abs().max() > 0) for k, v in sd.items())


def _moe_prefixes(cfg: ModelConfig, mtp_layers: int) -> list[str]:
    main = [f"layers.{i}.mlp." for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
    mtp = [f"mtp.{k}.block.mlp." for k in range(mtp_layers) if cfg.is_moe_layer(cfg.num_hidden_layers + k)]
    return main + mtp


def hub_tensors(
    sd: dict[str, torch.Tensor], cfg: ModelConfig, fmt: str, mtp_layers: int
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Re-parameterise a minimoe state dict exactly for `fmt`, then rename it to hub names.

    - routed_scaling_factor, where the format has none (all but the DeepSeek and GLM ones), multiplies
      every routed expert's down_proj (the routed sum is linear in it);
    - qwen2_moe gates its shared expert by sigmoid(w.x): w = 0 gives 1/2, so down_proj is doubled
      (a power of two: bit-exact);
    - formats whose MoE block always has shared experts / a bias get zero-size / zero tensors,
      as transformers itself saves them.

    Returns:
        (hub name -> tensor, notes describing the re-parameterisations).
    """
    sd = {k: v for k, v in sd.items() if not (k.startswith("mtp.") and int(k.split(".")[1]) >= mtp_layers)}
    notes = []
    D, inter = cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts
    fold = fmt not in ("deepseek_v3", "deepseek_v2", "glm4_moe") and cfg.routed_scaling_factor != 1.0
    if fold:
        notes.append(
            f"routed_scaling_factor {cfg.routed_scaling_factor} is folded into the routed experts' down_proj "
            f"({fmt} has no such factor)"
        )
    for p in _moe_prefixes(cfg, mtp_layers):
        if fold:
            sd[p + "experts.down_proj"] = sd[p + "experts.down_proj"] * cfg.routed_scaling_factor
        if fmt in ("deepseek_v3", "glm4_moe"):
            sd.setdefault(p + "gate.e_score_correction_bias", torch.zeros(cfg.n_routed_experts))
        else:
            sd.pop(p + "gate.e_score_correction_bias", None)  # zero (refused otherwise): no effect
        if keymap.MOE_NAMES[fmt].shared is None:
            continue
        if cfg.n_shared_experts == 0:
            dt = sd[p + "experts.up_proj"].dtype
            sd[p + "shared_experts.gate_proj.weight"] = torch.zeros(0, D, dtype=dt)
            sd[p + "shared_experts.up_proj.weight"] = torch.zeros(0, D, dtype=dt)
            sd[p + "shared_experts.down_proj.weight"] = torch.zeros(D, 0, dtype=dt)
        if fmt == "qwen2_moe":
            sd[p + "shared_experts.down_proj.weight"] = sd[p + "shared_experts.down_proj.weight"] * 2.0
            sd[p + "gate.shared_expert_gate"] = torch.zeros(1, D, dtype=sd[p + "experts.up_proj"].dtype)
    if fmt == "qwen2_moe" and cfg.n_routed_experts > 0:
        notes.append(
            "qwen2_moe gates the shared expert by sigmoid(shared_expert_gate . x): the gate is written as "
            f"zeros (a constant 1/2) and the shared expert's down_proj doubled (intermediate size {inter})"
        )
    # qwen2_moe's shared_expert_gate sits beside the gate, not inside it: move it after renaming
    gates = {k: sd.pop(k) for k in [k for k in sd if k.endswith("gate.shared_expert_gate")]}
    hub = keymap.to_hub(sd, cfg.num_hidden_layers, fmt, cfg.tie_word_embeddings)
    for k, v in gates.items():
        layer = re.search(r"layers\.(\d+)\.", k) or re.search(r"mtp\.(\d+)\.", k)
        idx = int(layer.group(1)) + (cfg.num_hidden_layers if k.startswith("mtp.") else 0)
        hub[f"model.layers.{idx}.mlp.shared_expert_gate.weight"] = v
    return hub, notes


def save_sharded(
    tensors: dict[str, torch.Tensor], out_dir: Path, shard_size: int, metadata: dict[str, str] | None = None
) -> list[str]:
    """Write `model.safetensors`, or `model-0000i-of-0000n.safetensors` plus `model.safetensors.index.json`
    when the total exceeds `shard_size` bytes (tensors kept whole, in key order).

    Returns:
        The file names written.
    """
    from safetensors.torch import save_file

    meta = {"format": "pt", **(metadata or {})}
    sizes = {k: t.numel() * t.element_size() for k, t in tensors.items()}
    total = sum(sizes.values())
    if total <= shard_size:
        save_file(tensors, str(out_dir / "model.safetensors"), metadata=meta)
        as_umask_allows(out_dir / "model.safetensors")
        return ["model.safetensors"]
    shards: list[list[str]] = [[]]
    used = 0
    for k in tensors:
        if shards[-1] and used + sizes[k] > shard_size:
            shards.append([])
            used = 0
        shards[-1].append(k)
        used += sizes[k]
    n = len(shards)
    names, weight_map = [], {}
    for i, keys in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{n:05d}.safetensors"
        save_file({k: tensors[k] for k in keys}, str(out_dir / name), metadata=meta)
        as_umask_allows(out_dir / name)
        names.append(name)
        weight_map.update(dict.fromkeys(keys, name))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    return names + ["model.safetensors.index.json"]


def write_tokenizer_files(tokenizer, out_dir: Path, model_max_length: int) -> list[str]:
    """tokenizer.json, tokenizer_config.json, special_tokens_map.json (AutoTokenizer loads them
    offline as a PreTrainedTokenizerFast), and minimoe's own tokenizer metadata."""
    tokenizer.save(out_dir)  # tokenizer.json + minimoe_tokenizer.json
    special = {"eos_token": tokenizer.eos_token, "pad_token": tokenizer.pad_token}
    if tokenizer.bos_token is not None:
        special["bos_token"] = tokenizer.bos_token
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
    }
    if tokenizer.chat_template:
        config["chat_template"] = tokenizer.chat_template
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    return ["tokenizer.json", "minimoe_tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


def _generation_config(tokenizer) -> dict:
    g = {"eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
    if tokenizer.bos_id is not None:
        g["bos_token_id"] = tokenizer.bos_id
    return g


def export_model(
    model,
    tokenizer,
    out_dir: str | Path,
    *,
    fmt: str | None = None,
    shard_size: int | str = "5GB",
    dtype: str = "float32",
    dropless: bool = False,
    force: bool = False,
) -> ExportResult:
    """Write `model` and `tokenizer` as a Hugging Face checkpoint folder.

    Args:
        model: a minimoe Transformer (any device; weights are copied to the CPU).
        tokenizer: its minimoe Tokenizer.
        out_dir: the folder to create (must not exist, or be empty, unless `force`).
        fmt: a format name from `formats.ARCHITECTURES`; None picks the first that fits.
        shard_size: split the weights into files of at most this size ("5GB", "500MiB", bytes).
        dtype: weight dtype on disk: float32, bfloat16 or float16 (the balancing bias stays fp32).
        dropless: accept that the exported model routes every token (HF has no capacity limit)
            when the model was trained with `capacity_factor`.
        force: replace an existing `out_dir`.
    Returns:
        ExportResult with the chosen format, files, weight bytes and notes.
    """
    cfg: ModelConfig = model.cfg
    if getattr(model, "quantization", None):
        raise MinimoeError(
            "the run holds the int8/int4 weights of `minimoe quantize`, which no Hugging Face format here "
            "stores; export the run it was quantized from"
        )
    if fmt is not None and fmt not in formats.ARCHITECTURES:
        raise MinimoeError(f"unknown export format {fmt!r}; choose one of {', '.join(formats.ARCHITECTURES)}")
    if dtype not in DTYPES:
        raise MinimoeError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if cfg.capacity_factor is not None and not dropless:
        raise MinimoeError(
            f"the model was trained dropping tokens over capacity (capacity_factor={cfg.capacity_factor}), which no "
            "Hugging Face format does; pass --dropless to export it routing every token (as minimoe's eval mode does)"
        )
    if tokenizer.vocab_size > cfg.vocab_size:
        raise MinimoeError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {cfg.vocab_size} embeddings"
        )
    sd = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    fmt, why = formats.choose_format(cfg, _bias_nonzero(sd), fmt)
    if why is not None:
        raise MinimoeError(f"cannot export to a Hugging Face format: {why}")
    notes = []
    mtp_layers = cfg.mtp_depth if keymap.MOE_NAMES[fmt].mtp else 0
    if cfg.mtp_depth and not mtp_layers:
        notes.append(
            f"the {cfg.mtp_depth} MTP module(s) are not exported: {fmt} has no place for them (logits unchanged)"
        )
    if cfg.capacity_factor is not None:
        notes.append("exported dropless: Hugging Face models have no expert capacity")
    hub, more = hub_tensors(sd, cfg, fmt, mtp_layers)
    notes += more
    target = DTYPES[dtype]
    hub = {
        k: (
            v if k.endswith("e_score_correction_bias") or not v.is_floating_point() else v.to(target)
        ).contiguous()
        for k, v in hub.items()
    }

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise MinimoeError(f"{out} already exists and is not empty; choose another --out or pass --force")
    tmp = fresh_temp_dir(out, "export")
    try:
        files = save_sharded(hub, tmp, parse_size(shard_size))
        config = formats.hf_config(cfg, fmt, tokenizer, dtype, mtp_layers)
        (tmp / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        (tmp / "generation_config.json").write_text(json.dumps(_generation_config(tokenizer), indent=2))
        files += ["config.json", "generation_config.json"]
        files += write_tokenizer_files(tokenizer, tmp, cfg.max_position_embeddings)
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    nbytes = sum(t.numel() * t.element_size() for t in hub.values())
    return ExportResult(out_dir=out, format=fmt, files=files, weight_bytes=nbytes, notes=notes)


def compare_logits(model, hf_dir: str | Path, input_ids: torch.Tensor) -> float:
    """Max |logit difference| between `model` and the Hugging Face model in `hf_dir` on `input_ids`
    (B, T), both in fp32 on the CPU. Needs `transformers`."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise MinimoeError("checking the export needs transformers (pip install 'minimoe[hf]')") from None
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # transformers calls an MTP layer that is not layer 61 "unexpected"
    try:
        hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    finally:
        hf_logging.set_verbosity(level)
    with torch.no_grad():
        ours = model.float().eval()(input_ids).logits
        theirs = hf(input_ids).logits
    return (ours - theirs).abs().max().item()
