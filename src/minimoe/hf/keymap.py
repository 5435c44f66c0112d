"""Weight names: minimoe state dict <-> Hugging Face hub checkpoints.

minimoe already uses HF DeepSeek-V3 names inside a layer, so the table is short. What differs:
- the `model.` prefix on everything but `lm_head`;
- routed experts: one stacked tensor per projection here (`experts.gate_proj` [E, I, D]), one
  tensor per expert on the hub (`experts.{j}.gate_proj.weight`); transformers 5.x fuses them again
  on load (its conversion mapping), vLLM reads the per-expert names;
- the MoE block, gate/up/down and shared-expert names per format (table `MOE_NAMES`);
- MTP modules (DeepSeek-V3, GLM-4.5): module k is the decoder layer `num_hidden_layers + k` with
  `enorm`, `hnorm`, `eh_proj`, `shared_head.norm` and copies of `embed_tokens` and `shared_head.head`.

config.json keys follow the same rule: a ModelConfig field keeps its name there unless `config_key`
says otherwise (six fields everywhere, a few per format).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from minimoe.errors import MinimoeError

FORMATS = ("deepseek_v3", "deepseek_v2", "deepseek", "glm4_moe", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
MLA_FORMATS = ("deepseek_v3", "deepseek_v2")

# ModelConfig fields carry the Hugging Face names; these are the ones a format names its own way
_ROUTER = {"n_routed_experts": "num_experts", "aux_loss_alpha": "router_aux_loss_coef"}
# (Mixtral and OLMoE experts use `intermediate_size`)
FORMAT_RENAMED = {
    "mixtral": {
        **_ROUTER,
        "n_routed_experts": "num_local_experts",
        "moe_intermediate_size": "intermediate_size",
    },
    "olmoe": {**_ROUTER, "moe_intermediate_size": "intermediate_size"},
    "qwen2_moe": _ROUTER,
    "qwen3_moe": _ROUTER,
}


def config_key(field: str, fmt: str) -> str:
    """The config.json key of ModelConfig `field` in format `fmt`."""
    return FORMAT_RENAMED.get(fmt, {}).get(field, field)


@dataclass(frozen=True)
class MoENames:
    block: str  # the MoE module inside a decoder layer
    expert_proj: tuple[str, str, str]  # per-expert names of our gate_proj, up_proj, down_proj
    shared: str | None  # shared-expert MLP module, None when the format has none
    mtp: bool  # whether the format keeps MTP layers after the main ones


MOE_NAMES = {
    "deepseek_v3": MoENames("mlp", ("gate_proj", "up_proj", "down_proj"), "shared_experts", True),
    "deepseek_v2": MoENames("mlp", ("gate_proj", "up_proj", "down_proj"), "shared_experts", False),
    "deepseek": MoENames("mlp", ("gate_proj", "up_proj", "down_proj"), "shared_experts", False),
    "glm4_moe": MoENames("mlp", ("gate_proj", "up_proj", "down_proj"), "shared_experts", True),
    "qwen2_moe": MoENames("mlp", ("gate_proj", "up_proj", "down_proj"), "shared_expert", False),
    "qwen3_moe": MoENames("mlp", ("gate_proj", "up_proj", "down_proj"), None, False),
    "olmoe": MoENames("mlp", ("gate_proj", "up_proj", "down_proj"), None, False),
    "mixtral": MoENames("block_sparse_moe", ("w1", "w3", "w2"), None, False),
}
_PROJ = ("gate_proj", "up_proj", "down_proj")
# MTP module parts outside the decoder block: minimoe name -> hub name under model.layers.{L+k}.
_MTP_PARTS = {"enorm": "enorm", "hnorm": "hnorm", "eh_proj": "eh_proj", "norm": "shared_head.norm"}


def _layer_key(fmt: str, layer: int, rest: str) -> str | list[str]:
    """Hub name(s) of one key inside decoder layer `layer` (`rest` is relative to the block)."""
    names = MOE_NAMES[fmt]
    pre = f"model.layers.{layer}."
    m = re.fullmatch(r"mlp\.experts\.(gate_proj|up_proj|down_proj)", rest)
    if m:  # stacked: the caller splits it per expert
        return f"{pre}{names.block}.experts.{{j}}.{names.expert_proj[_PROJ.index(m.group(1))]}.weight"
    if rest.startswith("mlp.gate."):
        return pre + names.block + rest[len("mlp") :]
    if rest.startswith("mlp.shared_experts."):
        if names.shared is None:
            raise MinimoeError(f"the {fmt} format has no shared experts")
        return pre + f"{names.block}.{names.shared}." + rest[len("mlp.shared_experts.") :]
    return pre + rest


def to_hub(
    sd: dict[str, torch.Tensor], num_hidden_layers: int, fmt: str, tied: bool
) -> dict[str, torch.Tensor]:
    """Rename a minimoe state dict to hub names (no numeric change).

    Args:
        sd: minimoe `state_dict()` (persistent tensors only).
        num_hidden_layers: main decoder layers; MTP module k becomes layer `num_hidden_layers + k`.
        fmt: one of FORMATS.
        tied: the LM head is the embedding (then no `lm_head.weight` is written, as HF does).
    Returns:
        hub name -> contiguous tensor; stacked experts become E tensors, MTP layers get their own
        copies of the embedding and head.
    """
    out: dict[str, torch.Tensor] = {}
    emb, head = sd["embed_tokens.weight"], sd.get("lm_head.weight", sd["embed_tokens.weight"])
    for key, t in sd.items():
        if key == "embed_tokens.weight":
            out["model.embed_tokens.weight"] = t
        elif key == "norm.weight":
            out["model.norm.weight"] = t
        elif key == "lm_head.weight":
            if not tied:
                out["lm_head.weight"] = t
        elif m := re.fullmatch(r"layers\.(\d+)\.(.+)", key):
            _put(out, _layer_key(fmt, int(m.group(1)), m.group(2)), t)
        elif m := re.fullmatch(r"mtp\.(\d+)\.(.+)", key):
            if not MOE_NAMES[fmt].mtp:
                continue  # the exporter refuses or drops MTP before getting here
            layer, rest = num_hidden_layers + int(m.group(1)), m.group(2)
            if rest.startswith("block."):
                _put(out, _layer_key(fmt, layer, rest[len("block.") :]), t)
            else:
                part, _, leaf = rest.partition(".")
                out[f"model.layers.{layer}.{_MTP_PARTS[part]}.{leaf}"] = t
                if part == "enorm":  # once per module: the hub layout repeats the shared weights
                    out[f"model.layers.{layer}.embed_tokens.weight"] = emb.clone()
                    out[f"model.layers.{layer}.shared_head.head.weight"] = head.clone()
        else:
            raise MinimoeError(f"no Hugging Face name for parameter {key}")
    return {k: v.contiguous() for k, v in out.items()}


def _put(out: dict, name: str, t: torch.Tensor) -> None:
    if "{j}" in name:
        for j, w in enumerate(t.unbind(0)):
            out[name.format(j=j)] = w
    else:
        out[name] = t


def from_hub(
    hub: dict[str, torch.Tensor],
    expected: dict[str, torch.Size],
    num_hidden_layers: int,
    fmt: str,
    tied: bool,
) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Collect a minimoe state dict from hub-named tensors.

    Accepts per-expert names and transformers' fused in-memory layout (`experts.gate_up_proj`
    [E, 2I, D] with gate rows first, `experts.down_proj` [E, D, I]).

    Args:
        hub: hub name -> tensor (all of the checkpoint).
        expected: minimoe key -> shape, from the target model's `state_dict()`.
        num_hidden_layers: main decoder layers.
        fmt: one of FORMATS.
        tied: the target model ties the head to the embedding.
    Returns:
        (minimoe state dict, the hub names that were used). Raises MinimoeError naming the first
        missing weight or a shape mismatch.
    """
    sd: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for key, shape in expected.items():
        if key == "lm_head.weight" and tied:
            continue
        name = _hub_name_of(key, num_hidden_layers, fmt)
        if "{j}" in name:
            t = _stacked(hub, name, shape, used)
        else:
            if name not in hub and ".block_sparse_moe." in name:
                # transformers' in-memory Mixtral layout (save_pretrained(save_original_format=False))
                # names the MoE block `mlp`, as it does for the fused experts below
                alt = name.replace(".block_sparse_moe.", ".mlp.")
                name = alt if alt in hub else name
            if name not in hub and key == "lm_head.weight" and "lm_head.weight" not in hub:
                raise MinimoeError("the checkpoint has no lm_head.weight but its config does not tie it")
            if name not in hub:
                raise MinimoeError(f"the checkpoint has no weight {name}")
            t = hub[name]
            used.add(name)
        if tuple(t.shape) != tuple(shape):
            raise MinimoeError(f"weight {name} has shape {tuple(t.shape)}, the config implies {tuple(shape)}")
        sd[key] = t
    return sd, used


def _hub_name_of(key: str, num_hidden_layers: int, fmt: str) -> str:
    if key == "embed_tokens.weight":
        return "model.embed_tokens.weight"
    if key == "norm.weight":
        return "model.norm.weight"
    if key == "lm_head.weight":
        return "lm_head.weight"
    if m := re.fullmatch(r"layers\.(\d+)\.(.+)", key):
        return _layer_key(fmt, int(m.group(1)), m.group(2))
    if m := re.fullmatch(r"mtp\.(\d+)\.(.+)", key):
        layer, rest = num_hidden_layers + int(m.group(1)), m.group(2)
        if rest.startswith("block."):
            return _layer_key(fmt, layer, rest[len("block.") :])
        part, _, leaf = rest.partition(".")
        return f"model.layers.{layer}.{_MTP_PARTS[part]}.{leaf}"
    raise MinimoeError(f"no Hugging Face name for parameter {key}")


def _stacked(hub: dict, name: str, shape: torch.Size, used: set[str]) -> torch.Tensor:
    """Stack per-expert tensors into (E, ...), or cut them out of transformers' fused tensors."""
    E = shape[0]
    per_expert = [name.format(j=j) for j in range(E)]
    if all(n in hub for n in per_expert):
        used.update(per_expert)
        return torch.stack([hub[n] for n in per_expert])
    # fused in-memory layout: `<block>.experts.gate_up_proj` / `<block>.experts.down_proj`
    prefix, proj = name.split(".{j}.")
    proj = proj.removesuffix(".weight")
    fused_prefix = prefix.replace("block_sparse_moe", "mlp")
    if proj in ("down_proj", "w2"):
        fused = f"{fused_prefix}.down_proj"
        if fused in hub:
            used.add(fused)
            return hub[fused]
    else:
        fused = f"{fused_prefix}.gate_up_proj"
        if fused in hub:
            used.add(fused)
            gate, up = hub[fused].chunk(2, dim=1)  # (E, I, D) each; transformers concatenates gate, up
            return gate if proj in ("gate_proj", "w1") else up
    missing = next(n for n in per_expert if n not in hub)
    raise MinimoeError(f"the checkpoint has no weight {missing}")
