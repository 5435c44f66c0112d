"""`minimoe inspect RUN_DIR`: which experts tokens go to (--text), and routing statistics (--corpus)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from minimoe.cli.args import CHECKPOINTS, add_checkpoint_arg, integer
from minimoe.errors import MinimoeError, describe_os_error, require


def add_parser(sub) -> None:
    p = sub.add_parser(
        "inspect",
        help="show expert routing for a text, or routing statistics over a corpus sample",
        description="--text: per-token, per-layer expert assignment (colour-coded terminal view, "
        "--html for a page). --corpus: top tokens per expert, routing entropy, expert co-activation "
        "(--coact-png), share of tokens per routed and shared expert, dead and dominant experts.",
    )
    p.add_argument("run_dir", help="run or checkpoint directory")
    p.add_argument("--text", help="text to route token by token")
    p.add_argument("--html", help="with --text: write an HTML page here")
    p.add_argument("--corpus", help="text source to sample (file, folder, .jsonl, .parquet)")
    p.add_argument(
        "--max-tokens", type=integer, default=20000, help="tokens read from --corpus (default 20000)"
    )
    p.add_argument("--top", type=integer, default=8, help="top tokens listed per expert (default 8)")
    p.add_argument("--coact-png", help="with --corpus: write the co-activation heatmaps here")
    add_checkpoint_arg(p)
    # the spelling before every command said --checkpoint; still accepted
    p.add_argument("--which", dest="checkpoint", choices=CHECKPOINTS, help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")


def _layer_name(key: str, num_hidden_layers: int) -> str:
    """Blocks after the last layer are the MTP modules."""
    i = int(key)
    return f"layer {i}" if i < num_hidden_layers else f"MTP module {i - num_hidden_layers + 1}"


def _print_corpus(console, stats: dict, num_hidden_layers: int) -> None:
    from rich import box
    from rich.table import Table

    console.print("columns: share of routed slots, tokens visiting, share of all expert work")
    n_shared = stats["n_shared_experts"]
    console.print(
        f"[bold]{stats['tokens']:,} tokens[/bold], {stats['n_routed_experts']} routed experts"
        + (f" + {n_shared} shared (every token)" if n_shared else "")
    )
    for name, layer in stats["layers"].items():
        ent = layer["entropy"]
        console.print(
            f"\n[bold]{_layer_name(name, num_hidden_layers)}[/bold]: MaxVio {layer['max_vio']:.3f}, load entropy "
            f"{ent['load_normalised']:.3f} of max,\n  mean per-token score entropy {ent['mean_token_nats']:.3f} "
            f"nats ({ent['mean_token_normalised']:.3f} of max)"
        )
        # one line per expert in 80 columns: short headers, the top tokens cut with an ellipsis
        t = Table(show_header=True, header_style="bold", box=box.SIMPLE, pad_edge=False)
        t.add_column("expert", no_wrap=True, min_width=8)
        for col in ("share", "visits", "work"):
            t.add_column(col, justify="right", no_wrap=True, min_width=6)
        t.add_column("top tokens (count, share of that token)", no_wrap=True, overflow="ellipsis", ratio=1)
        for e, share in enumerate(layer["routed_share"]):
            tops = "  ".join(
                f"{x['token']!r} {x['count']} ({x['frac_of_token']:.0%})" for x in layer["top_tokens"][e][:5]
            )
            flag = " [red]dead[/red]" if e in layer["dead_experts"] else ""
            flag += " [yellow]dominant[/yellow]" if e in layer["dominant_experts"] else ""
            t.add_row(
                f"{e}{flag}", f"{share:.3f}", f"{layer['token_frac'][e]:.3f}",
                f"{layer['slot_share']['routed'][e]:.3f}", tops,
            )  # fmt: skip
        for s in range(n_shared):
            t.add_row(f"shared {s}", "–", "1.000", f"{layer['slot_share']['shared'][s]:.3f}", "(every token)")
        console.print(t)
        console.print(
            f"dead experts: {layer['dead_experts'] or 'none'}; dominant (> 2x fair share): "
            f"{layer['dominant_experts'] or 'none'}"
        )


def run(args) -> int:
    from minimoe.lab.inspect import (
        corpus_ids,
        corpus_stats,
        rich_text_view,
        route_text,
        save_coactivation,
        text_html,
    )
    from minimoe.train.checkpoint import load_run

    if args.text is None and args.corpus is None:
        raise MinimoeError("give --text TEXT and/or --corpus PATH")
    if args.html and args.text is None:
        raise MinimoeError("--html needs --text")
    if args.coact_png and args.corpus is None:
        raise MinimoeError("--coact-png needs --corpus")
    if args.coact_png:
        require("--coact-png", "matplotlib")
    if args.top < 1:
        raise MinimoeError(f"--top must be at least 1, got {args.top}")
    model, tokenizer, cfg, _ = load_run(args.run_dir, which=args.checkpoint)
    out: dict = {}
    from rich.console import Console

    console = Console()
    if args.text is not None:
        tr = route_text(model, tokenizer, args.text)
        out["text"] = tr.to_dict()
        if args.html:
            path = Path(args.html)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text_html(tr, f"routing: {Path(args.run_dir).name}"), encoding="utf-8")
            except OSError as e:
                raise MinimoeError(
                    f"cannot write the HTML page ({describe_os_error(e) or e.strerror})"
                ) from None
            out["html"] = str(path)
        if not args.json:
            # ids in the text unless colour can carry them (a pipe, a file, an 8-colour terminal)
            plain = not console.is_terminal or console.color_system not in ("256", "truecolor")
            console.print(rich_text_view(tr, ids=plain))
            if args.html:
                console.print(f"HTML: {args.html}")
    if args.corpus is not None:
        ids = corpus_ids(args.corpus, tokenizer, args.max_tokens)
        stats = corpus_stats(model, tokenizer, ids, seq_len=cfg.train.seq_len, top_n=args.top)
        out["corpus"] = stats
        if args.coact_png:
            out["coactivation_png"] = str(save_coactivation(stats, args.coact_png))
        if not args.json:
            _print_corpus(console, stats, cfg.model.num_hidden_layers)
            if args.coact_png:
                console.print(f"co-activation: {out['coactivation_png']}")
    if args.json:
        print(json.dumps(out))
    return 0
