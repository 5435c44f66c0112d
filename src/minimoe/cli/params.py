"""`minimoe params PRESET_OR_CONFIG.yaml`: exact total / activated parameters, breakdown, KV-cache bytes."""

from __future__ import annotations

import json
from pathlib import Path

from minimoe.cli.args import integer
from minimoe.config_yaml import build_run_config
from minimoe.errors import MinimoeError
from minimoe.params import count_params, memory_estimate
from minimoe.presets import NOTES, PRESETS

MEMORY_NOTES = """\
weights: each parameter (main model + MTP) at 4 bytes (fp32) or 2 (bf16).
gradients: one per weight, in the weights' dtype.
optimizer state: AdamW's two fp32 moments, 8 bytes per parameter; Muon's one
  fp32 momentum, 4 bytes, for the hidden matrices it trains (AdamW's 8 for the
  rest); AdamW8bit's two 8-bit moments, 2 bytes, for tensors of 4,096 elements
  or more. bf16 adds an fp32 master copy of the weights, 4 bytes.
training total: weights + gradients + optimizer state for one process, without
  activations (those grow with batch x sequence length). The bf16 and fp32
  totals are equal (2+2+4 = 4+4 bytes per parameter besides the optimizer's);
  bf16 saves activation memory and time, not optimizer state.
KV cache / seq: what one sequence of that many tokens adds when generating."""


def add_parser(sub) -> None:
    p = sub.add_parser("params", help="count total and activated parameters of a preset or config")
    p.add_argument("target", nargs="?", help=f"a preset ({', '.join(PRESETS)}) or a YAML config file")
    p.add_argument("--preset", help="preset name (alternative to the positional argument)")
    p.add_argument(
        "--memory",
        action="store_true",
        help="add bytes of weights, gradients, optimizer state (train.optimizer's), KV cache",
    )
    p.add_argument(
        "--context", type=integer, default=None, help="tokens per sequence for the KV-cache estimate"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "overrides", nargs="*", default=[], help="dotted overrides, e.g. model.num_hidden_layers=4"
    )


def _human(n: float, unit: str = "") -> str:
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def _bytes(n: float) -> str:
    for div, suffix in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= div:
            return f"{n / div:.2f} {suffix}"
    return f"{n:.0f} B"


def run(args) -> int:
    preset, config = args.preset, None
    target, overrides = args.target, list(args.overrides)
    if target and "=" in target:  # `minimoe params --preset x model.k=v`: first override lands here
        overrides.insert(0, target)
        target = None
    if target and preset is not None:
        raise MinimoeError(f"give either {target} or --preset {preset}, not both")
    if target:
        if target in PRESETS or not (target.endswith((".yaml", ".yml")) or Path(target).exists()):
            preset = target
        else:
            config = target
    if preset is None and config is None:
        preset = "tiny"
    if args.context is not None and args.context < 1:
        raise MinimoeError(f"--context must be at least 1 token, got {args.context}")
    run = build_run_config(preset=preset, config_path=config, overrides=overrides)
    cfg = run.model
    rep = count_params(cfg)
    out = {"name": preset or config, **rep.to_dict()}
    if preset in NOTES:  # where a seed preset departs from its document
        out["notes"] = NOTES[preset]
    if args.memory:
        out["memory"] = memory_estimate(cfg, rep, args.context, run.train.optimizer, run.train.muon_experts)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"minimoe params: {out['name']}", show_header=True)
    t.add_column("quantity")
    t.add_column("parameters", justify="right")
    t.add_column("exact", justify="right")
    rows = [
        ("total (main model)", rep.total),
        ("activated / token, without embedding lookup (V2/V3 convention)", rep.activated),
        ("activated / token, with embedding (DeepSeekMoE/Mixtral/OLMoE)", rep.activated_with_embedding),
    ]
    if cfg.mtp_depth:
        rows += [
            (f"MTP modules ({cfg.mtp_depth}), unique", rep.mtp_total),
            ("main + MTP, unique", rep.total + rep.mtp_total),
            ("as a HF DeepSeek-V3 checkpoint stores it (+ emb/head copies)", rep.hf_checkpoint_total),
        ]
    for label, n in rows:
        t.add_row(label, _human(n), f"{n:,}")
    t.add_section()
    for comp, n in rep.components.items():
        t.add_row(f"  {comp}", _human(n), f"{n:,}")
    t.add_section()
    kind = "MLA latent + RoPE key" if cfg.attn_type == "mla" else f"GQA K/V ({cfg.kv_heads} KV heads)"
    for dt in ("bf16", "fp32"):
        t.add_row(
            f"KV cache / token, {dt} ({kind})",
            _bytes(rep.kv_cache_bytes_per_token[dt]),
            f"{rep.kv_cache_bytes_per_token_per_layer[dt]:,} B/layer",
        )
    console = Console()
    console.print(t)
    if out.get("notes"):
        console.print(f"where {preset} departs from its seed document:")
        for note in out["notes"]:
            console.print(f"  - {note}", highlight=False)
    if args.memory:
        m = out["memory"]
        mt = Table(
            title=f"memory (train.optimizer={m['optimizer']}, one sequence of {m['context']:,} tokens)"
        )
        for col in ("dtype", "weights", "gradients", "optimizer state", "training total", "KV cache / seq"):
            mt.add_column(col, justify="right")
        for dt, d in m["by_dtype"].items():
            mt.add_row(
                dt,
                _bytes(d["weights"]),
                _bytes(d["gradients"]),
                _bytes(d["optimizer_state"]),
                _bytes(d["training_total"]),
                _bytes(d["kv_cache_per_sequence"]),
            )
        console.print(mt)
        console.print(MEMORY_NOTES)
    return 0
