"""Export a minimoe model to a Hugging Face folder that `AutoModelForCausalLM.from_pretrained` and
vLLM load: config.json, model.safetensors (sharded with an index above `shard_size`), tokenizer
files, generation_config.json.

The format is chosen by `minimoe.hf.formats` (DeepSeek-V3 for sigmoid-routed MLA models). Exact
re-parameterisations (below) keep the logits identical; anything a format cannot express is
refused with one sentence. Writing goes to a temporary folder that is fsynced and renamed into place,
so an interrupted export or a power loss never leaves a half-written model behind.
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
from minimoe.data.chat_template import PLAIN_CHAT_TEMPLATE
from minimoe.errors import MinimoeError
from minimoe.files import as_umask_allows, fresh_temp_dir, fsync_dir, fsync_tree
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
    # a run without a template (pre-training) gets the plain one `minimoe serve` formats its chat with, so
    # transformers' apply_chat_template gives the prompt the server would
    config["chat_template"] = tokenizer.chat_template or PLAIN_CHAT_TEMPLATE
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
    if out.exists() and not out.is_dir():  # --force replaces a folder, never a file
        raise MinimoeError(f"{out} is a file; --out names the folder to create")
    if out.exists() and any(out.iterdir()) and not force:
        raise MinimoeError(f"{out} already exists and is not empty; choose another --out or pass --force")
    tmp = fresh_temp_dir(out, "export")
    try:
        files = save_sharded(hub, tmp, parse_size(shard_size))
        config = formats.hf_config(cfg, fmt, tokenizer, dtype, mtp_layers)
        (tmp / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        (tmp / "generation_config.json").write_text(json.dumps(_generation_config(tokenizer), indent=2))
        files += ["config.json", "generation_config.json"]
        files += write_tokenizer_files(tokenizer, tmp, cfg.max_position_embeddings)
        fsync_tree(tmp)  # on the disk before the rename, so a power loss leaves no empty files behind
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(out.parent)
    nbytes = sum(t.numel() * t.element_size() for t in hub.values())
    return ExportResult(out_dir=out, format=fmt, files=files, weight_bytes=nbytes, notes=notes)


def load_hf_fp32(hf_dir: str | Path):
    """The exported model loaded by transformers, fp32, eval mode."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise MinimoeError("checking the export needs transformers (pip install 'minimoe[hf]')") from None
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # transformers calls an MTP layer that is not layer 61 "unexpected"
    try:
        return AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    finally:
        hf_logging.set_verbosity(level)


def compare_logits(model, hf_dir: str | Path, input_ids: torch.Tensor) -> float:
    """Max |logit difference| between `model` and the Hugging Face model in `hf_dir` on `input_ids`
    (B, T), both in fp32 on the CPU (an fp32 copy of `model`). Needs `transformers`."""
    import copy

    hf = load_hf_fp32(hf_dir)
    with torch.no_grad():
        ours = copy.deepcopy(model).float().eval()(input_ids).logits
        theirs = hf(input_ids).logits
    return (ours - theirs).abs().max().item()


def _lora_factors(pm, prefix: str) -> dict[tuple[str, str | None], str]:
    """(module path without wrappers, parameter name or None) -> the saved key stem of its factors."""
    return {
        (n.removeprefix(prefix).replace(".base_layer", ""), getattr(m, "parameter_name", None)): n
        for n, m in pm.named_modules()
        if "default" in getattr(m, "lora_A", {})
    }


def _adapter_factors(adapter_dir: str | Path, cfg: ModelConfig):
    """The saved adapter's LoraConfig and its factors on the minimoe model (`_lora_factors`); MinimoeError
    for dense or shared-expert MLP targets, which PEFT cannot load on a transformers MoE model."""
    from peft import LoraConfig, get_peft_model

    from minimoe.model.transformer import Transformer

    lora_cfg = LoraConfig.from_pretrained(str(adapter_dir))
    with torch.device("meta"):
        factors = _lora_factors(get_peft_model(Transformer(cfg), lora_cfg), "base_model.model.")
    mlp = sorted(p for p, pname in factors if pname is None and ".mlp." in p and not p.startswith("mtp."))
    if mlp:
        raise MinimoeError(
            f"the adapter adapts {mlp[0]}, which PEFT cannot load on a Hugging Face MoE model (it maps every "
            "gate/up/down_proj target to the fused experts); train it with --targets attention,experts"
        )
    return lora_cfg, factors


ADAPTER_FORMATS = ("deepseek_v3", "deepseek_v2", "glm4_moe")


def _refuse_format(fmt: str) -> None:
    if fmt not in ADAPTER_FORMATS:
        raise MinimoeError(f"a LoRA adapter exports with {', '.join(ADAPTER_FORMATS)} models, not {fmt}")


def check_adapter_exportable(model, adapter_dir: str | Path, fmt: str | None = None) -> None:
    """Raise MinimoeError when `export_adapter` would refuse the adapter for the format
    `export_model(model, fmt=fmt)` picks (one that re-parameterises the experts) or for its targets
    (dense or shared-expert MLP factors), so `minimoe export --adapter` can say so before writing."""
    if fmt is None or fmt in formats.ARCHITECTURES:  # else export_model names the formats
        fmt, why = formats.choose_format(model.cfg, _bias_nonzero(model.state_dict()), fmt)
        if why is None:  # else export_model says why the model does not export
            _refuse_format(fmt)
    _adapter_factors(adapter_dir, model.cfg)


def export_adapter(
    adapter_dir: str | Path, cfg: ModelConfig, hf_dir: str | Path, out_dir: str | Path
) -> Path:
    """Rewrite a minimoe LoRA adapter (`minimoe lora`'s OUT/adapter) for the model `export_model` wrote
    to `hf_dir`, so `peft.PeftModel.from_pretrained(hf_model, out_dir)` gives the adapted logits.

    The rewrite is exact. transformers fuses each layer's routed gate and up projections
    (`experts.gate_up_proj` (E, 2I, D)), so their two rank-r factor pairs become one rank-2r pair per
    expert (A stacked, B block-diagonal); every other factor pair gets r zero rows / columns and
    lora_alpha doubles, which keeps the scale alpha / r. MTP adapters are dropped (transformers has no
    MTP layer). Refused: formats that re-parameterise the experts (routed_scaling_factor folded, a gated
    shared expert), and dense or shared-expert MLP adapters, which PEFT's loader turns into expert
    adapters on transformers 5 MoE models.

    Args:
        adapter_dir: the saved adapter (adapter_config.json + adapter_model.safetensors).
        cfg: the config of the base model the adapter was trained on.
        hf_dir: the exported base model.
        out_dir: the folder to write (PEFT's adapter files).
    Returns:
        out_dir.
    """
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_dir, out = Path(hf_dir), Path(out_dir)
    fmt = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))["model_type"]
    _refuse_format(fmt)
    ours_cfg, ours = _adapter_factors(adapter_dir, cfg)
    saved = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(hf_dir)))
    # the adapted linear layers by full name (same inside a layer; transformers prefixes `model.`)
    linears = sorted(f"model.{p}" for p, pname in ours if pname is None and not p.startswith("mtp."))
    experts = ["experts.gate_up_proj", "experts.down_proj"] if ours_cfg.target_parameters else None
    hf_cfg = LoraConfig(
        r=2 * ours_cfg.r, lora_alpha=2 * ours_cfg.lora_alpha, lora_dropout=0.0, bias="none",
        target_modules=linears or None, target_parameters=experts,
    )  # fmt: skip
    hf_pm = get_peft_model(hf, hf_cfg)
    want = set(get_peft_model_state_dict(hf_pm))

    def pair(key: tuple[str, str | None]) -> tuple[torch.Tensor, torch.Tensor]:
        if key not in ours:
            raise MinimoeError(f"the adapter has no factors for {key[0]} {key[1] or ''}".rstrip())
        used.add(key)
        return saved[f"{ours[key]}.lora_A.weight"], saved[f"{ours[key]}.lora_B.weight"]

    r, E = ours_cfg.r, cfg.n_routed_experts
    tensors, used = {}, set()
    for (path, pname), stem in _lora_factors(hf_pm, "base_model.model.model.").items():
        if pname == "gate_up_proj":  # A: (E*2r, D) per expert [A_gate; A_up]; B: (2I, 2r, E) block-diagonal
            (ag, bg), (au, bu) = pair((path, "gate_proj")), pair((path, "up_proj"))
            a = torch.cat([ag.view(E, r, -1), au.view(E, r, -1)], 1).reshape(E * 2 * r, -1)
            inter = bg.shape[0]
            b = bg.new_zeros(2 * inter, 2 * r, E)
            b[:inter, :r], b[inter:, r:] = bg.view(inter, r, E), bu.view(inter, r, E)
            b = b.reshape(2 * inter, 2 * r * E)
        else:  # zero-padded to rank 2r: per expert for the stacked down_proj, else one pair
            n = E if pname == "down_proj" else 1
            a0, b0 = pair((path, "down_proj" if pname == "down_proj" else None))
            a = torch.cat([a0.view(n, r, -1), torch.zeros_like(a0).view(n, r, -1)], 1).reshape(n * 2 * r, -1)
            b = torch.cat([b0.view(b0.shape[0], r, n), torch.zeros_like(b0).view(b0.shape[0], r, n)], 1)
            b = b.reshape(b0.shape[0], 2 * r * n)
        tensors[f"{stem}.lora_A.weight"], tensors[f"{stem}.lora_B.weight"] = a.contiguous(), b.contiguous()
    left = sorted(p for p, _ in set(ours) - used if not p.startswith("mtp."))
    if left:
        raise MinimoeError(f"the adapter's factors for {left[0]} have no place in the {fmt} model")
    if set(tensors) != want:
        raise MinimoeError(
            f"PEFT expects adapter tensors {sorted(want - set(tensors))[:1]} that were not written"
        )
    out.mkdir(parents=True, exist_ok=True)
    hf_cfg.base_model_name_or_path = str(hf_dir)
    hf_cfg.save_pretrained(str(out))
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out
