"""What the experts do: per-token routing of a text, and routing statistics over a corpus sample.

Routing decisions are read from the model's own routers with forward hooks on every
`layers[i].mlp.gate` (a `Router`, whose output holds the (T, K) chosen experts and gate weights); the
model code is not changed and the hooks are removed afterwards. Scores for the entropy are recomputed
from the hooked router input with the router's weight and `router_scores`, the same pure function the
router uses.

Shares (per MoE layer):
- `routed_share[e]`: share of the layer's routed (token, slot) pairs that went to routed expert e;
  sums to 1 over routed experts.
- `token_frac[e]`: share of tokens that visited expert e (sums to K); a shared expert's is 1.
- `slot_share`: every expert's share of all expert applications, routed and shared together: a token
  makes K routed and S shared applications, so a shared expert gets 1 / (K + S) and routed expert e
  gets routed_share[e] * K / (K + S); sums to 1.

Shape suffixes: B batch, S sequence, T tokens, D hidden, E routed experts, K experts per token.
"""

from __future__ import annotations

import functools
import html
import math
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from minimoe.errors import MinimoeError
from minimoe.model.moe import MoE, max_vio
from minimoe.model.router import expert_counts, router_scores


@dataclass
class LayerRouting:
    """Routing of one MoE layer for T tokens."""

    topk_idx: torch.Tensor  # (T, K) int64 chosen experts, best first
    topk_weight: torch.Tensor  # (T, K) gate weights
    probs: torch.Tensor  # (T, E) unbiased scores normalised to sum to 1 per token


def moe_gates(model) -> dict[int, torch.nn.Module]:
    """Routers of the main model's MoE layers (MTP blocks are left out), by layer index."""
    return {i: b.mlp.gate for i, b in enumerate(model.layers) if isinstance(b.mlp, MoE)}


@contextmanager
def record_routing(model):
    """Collect routing decisions of every forward inside the block.

    Yields:
        dict layer -> list of LayerRouting, one per forward call, appended as the model runs.
    """
    gates = moe_gates(model)
    if not gates:
        raise MinimoeError("this model has no MoE layers (dense), so there is no routing to inspect")
    records: dict[int, list[LayerRouting]] = {i: [] for i in gates}
    handles = []

    def hook_for(i):
        def hook(module, inputs, output):
            x_BSD = inputs[0]
            logits_TE = F.linear(x_BSD.reshape(-1, x_BSD.shape[-1]).float(), module.weight.float())  # (T, E)
            scores_TE = router_scores(logits_TE, module.cfg.scoring_func)
            probs_TE = scores_TE / scores_TE.sum(-1, keepdim=True).clamp_min(1e-20)
            records[i].append(
                LayerRouting(
                    output.topk_idx.detach().cpu(), output.topk_weight.detach().float().cpu(), probs_TE.cpu()
                )
            )

        return hook

    try:
        for i, gate in gates.items():
            handles.append(gate.register_forward_hook(hook_for(i)))
        yield records
    finally:
        for h in handles:
            h.remove()


def _cat(parts: list[LayerRouting]) -> LayerRouting:
    return LayerRouting(
        torch.cat([p.topk_idx for p in parts]),
        torch.cat([p.topk_weight for p in parts]),
        torch.cat([p.probs for p in parts]),
    )


@torch.no_grad()
def route_ids(model, ids_BS: torch.Tensor) -> dict[int, LayerRouting]:
    """Routing of every MoE layer for a batch of token ids (eval mode: no jitter, no bias updates).

    Args:
        model: a Transformer.
        ids_BS: (B, S) token ids, S <= max_position_embeddings.
    Returns:
        layer -> LayerRouting over T = B * S tokens in row-major order.
    """
    was_training = model.training
    model.eval()
    try:
        with record_routing(model) as rec:
            model(ids_BS.to(next(model.parameters()).device))
    finally:
        model.train(was_training)
    return {i: _cat(v) for i, v in rec.items()}


def token_strings(tokenizer, ids: list[int]) -> list[str]:
    """A printable string per token (bytes that are not whole characters show as \\xNN)."""
    out = []
    for i in ids:
        if tokenizer.kind == "byte" and i < 256:
            b = bytes([i])
            out.append(b.decode("utf-8") if i < 128 else f"\\x{i:02x}")
        else:
            out.append(tokenizer.decode([i], skip_special_tokens=False))
    return out


@dataclass
class TextRouting:
    tokens: list[str]  # printable token strings
    ids: list[int]
    layers: dict[int, LayerRouting]  # T = len(ids)
    n_experts: int
    n_shared: int

    def to_dict(self) -> dict:
        return {
            "tokens": self.tokens,
            "ids": self.ids,
            "n_routed_experts": self.n_experts,
            "n_shared_experts": self.n_shared,
            "layers": {
                str(i): {
                    "experts": r.topk_idx.tolist(),
                    "weights": [[round(w, 4) for w in row] for row in r.topk_weight.tolist()],
                }
                for i, r in self.layers.items()
            },
        }


def route_text(model, tokenizer, text: str) -> TextRouting:
    """Which experts each token of `text` goes to in each MoE layer (one sequence; longer texts are cut
    into max_position_embeddings windows that are routed independently)."""
    ids = tokenizer.encode(text)
    if not ids:
        raise MinimoeError("the text is empty after tokenization")
    L = model.cfg.max_position_embeddings
    parts: dict[int, list[LayerRouting]] = {}
    for start in range(0, len(ids), L):
        chunk = torch.tensor([ids[start : start + L]])  # (1, S)
        for i, r in route_ids(model, chunk).items():
            parts.setdefault(i, []).append(r)
    return TextRouting(
        token_strings(tokenizer, ids),
        ids,
        {i: _cat(v) for i, v in parts.items()},
        model.cfg.n_routed_experts,
        model.cfg.n_shared_experts,
    )


# ---------------------------------------------------------------- corpus statistics


def entropy(p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Shannon entropy in nats along `dim` (0 log 0 = 0)."""
    return -(p * p.clamp_min(1e-30).log()).sum(dim)


def layer_stats(
    r: LayerRouting, ids: list[int], tokenizer, n_shared: int, top_n: int = 8, dominant_factor: float = 2.0
) -> dict:
    """Statistics of one layer over T tokens.

    Args:
        r: the layer's routing of T tokens.
        ids: the T token ids.
        tokenizer: for printing the top tokens.
        n_shared: shared experts (each sees every token).
        top_n: top tokens listed per expert.
        dominant_factor: an expert is dominant when its routed share exceeds this many times 1 / E.
    Returns:
        JSON-ready dict (see the module docstring for the share definitions).
    """
    T, K = r.topk_idx.shape
    E = r.probs.shape[1]
    counts_E = expert_counts(r.topk_idx, E, torch.float64)
    routed_share = counts_E / (T * K)
    # co-activation: tokens that chose both i and j; a token's K experts are distinct, so
    # sum_j coact[i, j] (j != i) = count_i * (K - 1)
    onehot_TE = torch.zeros(T, E, dtype=torch.float64)
    onehot_TE.scatter_(1, r.topk_idx, 1.0)
    coact_EE = onehot_TE.T @ onehot_TE
    coact_EE.fill_diagonal_(0)
    per_token_H = entropy(r.probs.double())
    ids_T = torch.tensor(ids)
    total_by_token = Counter(ids)
    top_tokens = []
    for e in range(E):
        mask_T = (r.topk_idx == e).any(1)
        c = Counter(ids_T[mask_T].tolist())
        top = []
        for tid, n in c.most_common(top_n):
            tok = token_strings(tokenizer, [tid])[0]
            top.append(
                {"token": tok, "id": tid, "count": n, "frac_of_token": round(n / total_by_token[tid], 4)}
            )
        top_tokens.append(top)
    slot_den = K + n_shared
    fair = 1.0 / E
    return {
        "tokens": T,
        "top_k": K,
        "routed_share": routed_share.tolist(),
        "token_frac": (counts_E / T).tolist(),
        "shared_token_frac": [1.0] * n_shared,
        "slot_share": {
            "routed": (routed_share * K / slot_den).tolist(),
            "shared": [1.0 / slot_den] * n_shared,
        },
        "entropy": {
            "mean_token_nats": per_token_H.mean().item(),  # how spread one token's scores are
            "mean_token_normalised": (per_token_H.mean() / math.log(E)).item() if E > 1 else 0.0,
            "load_normalised": (entropy(routed_share) / math.log(E)).item() if E > 1 else 0.0,
        },
        "max_vio": max_vio(counts_E).item(),
        "coactivation": (coact_EE / T).tolist(),  # share of tokens that chose both experts
        "dead_experts": [e for e in range(E) if counts_E[e] == 0],
        "dominant_experts": [e for e in range(E) if routed_share[e] > dominant_factor * fair],
        "top_tokens": top_tokens,
    }


def corpus_ids(source: str, tokenizer, max_tokens: int) -> list[int]:
    """The first `max_tokens` token ids of a text source (a file, folder, JSONL/Parquet: see open_source),
    documents joined with EOS."""
    from minimoe.data import open_source

    if max_tokens <= 0:
        raise MinimoeError(f"--max-tokens must be positive, got {max_tokens}")
    corpus = open_source(source)
    if getattr(corpus, "pretokenized", False):
        raise MinimoeError(f"{source} holds token ids; give a text source to inspect")
    ids: list[int] = []
    for text, end in corpus.segments():
        ids.extend(tokenizer.encode(text))
        if end:
            ids.append(tokenizer.eos_id)
        if len(ids) >= max_tokens:
            break
    if not ids:
        raise MinimoeError(f"{source} holds no text")
    return ids[:max_tokens]


def corpus_stats(
    model, tokenizer, ids: list[int], seq_len: int | None = None, batch_size: int = 8, top_n: int = 8
) -> dict:
    """Routing statistics of every MoE layer over a token sample, routed in windows of `seq_len`.

    Args:
        model: a Transformer with MoE layers.
        tokenizer: its tokenizer.
        ids: the sample's token ids.
        seq_len: window length (default: the model's max_position_embeddings).
        batch_size: windows per forward.
        top_n: top tokens listed per expert.
    Returns:
        {"tokens", "n_routed_experts", "n_shared_experts", "layers": {layer: layer_stats}}
    """
    S = min(seq_len or model.cfg.max_position_embeddings, model.cfg.max_position_embeddings)
    windows = [ids[i : i + S] for i in range(0, len(ids), S)]
    parts: dict[int, list[LayerRouting]] = {}
    kept: list[int] = []
    # full windows in batches, then the ragged tail alone (no padding, so no pad token is counted)
    full = [w for w in windows if len(w) == S]
    tail = [w for w in windows if len(w) != S]
    for b in range(0, len(full), batch_size):
        batch = full[b : b + batch_size]
        for i, r in route_ids(model, torch.tensor(batch)).items():
            parts.setdefault(i, []).append(r)
        kept.extend(t for w in batch for t in w)
    for w in tail:
        for i, r in route_ids(model, torch.tensor([w])).items():
            parts.setdefault(i, []).append(r)
        kept.extend(w)
    n_shared = model.cfg.n_shared_experts
    return {
        "tokens": len(kept),
        "n_routed_experts": model.cfg.n_routed_experts,
        "n_shared_experts": n_shared,
        "layers": {
            str(i): layer_stats(_cat(v), kept, tokenizer, n_shared, top_n=top_n)
            for i, v in sorted(parts.items())
        },
    }


# ---------------------------------------------------------------- rendering


_LEVELS = (0, 95, 135, 175, 215, 255)  # the xterm 256-colour cube's channel values


@functools.cache
def terminal_palette() -> tuple[int, ...]:
    """xterm 256-colour indices light enough for black text, ordered so that each next colour is the
    one farthest from all before it: the first n are well apart for any n, and distinct indices stay
    distinct colours on a 256-colour terminal (where nearby hex colours can collapse into one)."""

    def luminance(c: tuple[int, int, int]) -> float:
        return 0.2126 * _LEVELS[c[0]] + 0.7152 * _LEVELS[c[1]] + 0.0722 * _LEVELS[c[2]]

    cube = [(r, g, b) for r in range(6) for g in range(6) for b in range(6)]
    cube = [c for c in cube if 110 <= luminance(c) <= 235]  # black text stays readable; no near-white
    rgb = {c: tuple(_LEVELS[x] for x in c) for c in cube}
    order = [(5, 1, 1)]
    dist = {c: sum((a - b) ** 2 for a, b in zip(rgb[c], rgb[order[0]])) for c in cube}
    while len(order) < len(cube):
        nxt = max((c for c in cube if c not in order), key=lambda c: dist[c])
        order.append(nxt)
        for c in cube:
            dist[c] = min(dist[c], sum((a - b) ** 2 for a, b in zip(rgb[c], rgb[nxt])))
    return tuple(16 + 36 * r + 6 * g + b for r, g, b in order)


def _index_hex(idx: int) -> str:
    v = idx - 16
    r, g, b = _LEVELS[v // 36], _LEVELS[v // 6 % 6], _LEVELS[v % 6]
    return f"#{r:02x}{g:02x}{b:02x}"


def expert_color(e: int, n: int) -> str:
    """A hex colour per expert, distinct for every expert count: the terminal palette's colours while
    there are enough of them (so the HTML page and the terminal agree), then hue steps."""
    import colorsys

    pal = terminal_palette()
    if n <= len(pal):
        return _index_hex(pal[e])
    r, g, b = colorsys.hls_to_rgb((e / n) % 1.0, 0.55, 0.65)
    return f"#{round(r * 255):02x}{round(g * 255):02x}{round(b * 255):02x}"


def _visible(tok: str) -> str:
    return tok.replace("\n", "⏎").replace("\t", "⇥")


def rich_text_view(tr: TextRouting, ids: bool = False):
    """A rich renderable: for each MoE layer, the text with every token on its top-1 expert's colour,
    followed by a legend. With `ids` (output that is not a colour terminal, or more experts than
    distinct colours) each token is followed by its expert id, `tok[3]`, so the view reads without
    colour. Returns a rich Group."""
    from rich.console import Group
    from rich.text import Text

    pal = terminal_palette()
    ids = ids or tr.n_experts > len(pal)

    def style(e: int) -> str:
        return (
            f"black on color({pal[e]})"
            if tr.n_experts <= len(pal)
            else f"black on {expert_color(e, tr.n_experts)}"
        )

    items = []
    for i, r in tr.layers.items():
        line = Text(f"layer {i}: ", style="bold")
        for t, row in enumerate(r.topk_idx.tolist()):
            line.append(_visible(tr.tokens[t]), style=style(row[0]))
            if ids:
                line.append(f"[{row[0]}]", style="dim")
        items.append(line)
    legend = Text("top-1 expert" + (" (id in brackets after each token): " if ids else ": "))
    for e in range(tr.n_experts):
        legend.append(f" {e} ", style=style(e))
        legend.append(" ")
    items.append(legend)
    return Group(*items)


def text_html(tr: TextRouting, title: str = "minimoe routing") -> str:
    """A self-contained HTML page: one row per MoE layer, each token coloured by its top-1 expert, with
    all K experts and their gate weights in the tooltip."""
    rows = []
    for i, r in tr.layers.items():
        spans = []
        for t, (experts, weights) in enumerate(zip(r.topk_idx.tolist(), r.topk_weight.tolist())):
            tip = ", ".join(f"expert {e}: {w:.3f}" for e, w in zip(experts, weights))
            tok = html.escape(_visible(tr.tokens[t]))
            color = expert_color(experts[0], tr.n_experts)
            spans.append(
                f'<span class="tok" style="background:{color}" title="{html.escape(tip)}">{tok}</span>'
            )
        rows.append(
            f'<div class="layer"><div class="name">layer {i}</div><div class="text">{"".join(spans)}</div></div>'
        )
    legend = "".join(
        f'<span class="tok" style="background:{expert_color(e, tr.n_experts)}">expert {e}</span> '
        for e in range(tr.n_experts)
    )
    shared = f" plus {tr.n_shared} shared expert(s) that see every token" if tr.n_shared else ""
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
.layer {{ margin-bottom: 1.2em; }} .name {{ font-weight: bold; margin-bottom: .3em; }}
.text {{ font-family: monospace; white-space: pre-wrap; line-height: 1.9; }}
.tok {{ padding: 1px 0; border-radius: 2px; color: #000; }}
</style></head><body>
<h2>{html.escape(title)}</h2>
<p>{len(tr.ids)} tokens; colour = top-1 routed expert of {tr.n_experts}{shared}. Hover a token for all
chosen experts and gate weights.</p>
<p>{legend}</p>
{"".join(rows)}
</body></html>
"""


def coactivation_figure(stats: dict):
    """Expert co-activation per MoE layer: share of tokens that chose both experts i and j (diagonal
    blank). Returns a Figure with one heatmap per layer plus a colour bar."""
    from minimoe.lab.plot import _plt

    plt = _plt()
    layers = list(stats["layers"])
    n = len(layers)
    E = stats["n_routed_experts"]
    size = max(3.2, 0.3 * E + 1.5)
    fig, axes = plt.subplots(1, n, figsize=(size * n + 1, size), squeeze=False, constrained_layout=True)
    mats = []
    for name in layers:
        m = torch.tensor(stats["layers"][name]["coactivation"])
        m.fill_diagonal_(float("nan"))
        mats.append(m)
    vmax = max(float(torch.nan_to_num(m, nan=0.0).max()) for m in mats) or 1.0
    im = None
    for ax, name, m in zip(axes[0], layers, mats):
        im = ax.imshow(m.numpy(), cmap="magma", vmin=0, vmax=vmax, interpolation="nearest")
        ax.set_title(f"layer {name}", fontsize=10)
        ax.set_xlabel("expert j")
        ax.set_ylabel("expert i")
        ticks = list(range(0, E, max(1, E // 16)))
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_yticks(ticks, [str(t) for t in ticks])
    cbar = fig.colorbar(im, ax=list(axes[0]), shrink=0.9)
    cbar.set_label("share of tokens routed to both i and j")
    fig.suptitle(f"expert co-activation over {stats['tokens']:,} tokens")
    return fig


def save_coactivation(stats: dict, path: str | Path) -> Path:
    from minimoe.lab.plot import _plt

    path = Path(path)
    if not path.suffix:  # matplotlib would add it, and the caller would name a file that is not there
        path = path.with_name(path.name + ".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = coactivation_figure(stats)
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path
