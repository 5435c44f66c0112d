"""`minimoe train --preset tiny` against a plain nanoGPT, the same CPU-minutes each, paired by seed.

SPEC section 7 asks the default small MoE to beat "a plain nanoGPT-style dense GPT, trained for the same
wall clock on the same cores". docs/RESULTS.md's headlines compare it with minimoe's own dense model of
nanoGPT's shape; this script compares it with nanoGPT itself: a GPT-2 model as nanoGPT's model.py builds
it (learned positions, LayerNorm without bias, GELU MLP of 4 x width, tied embedding, dropout 0) trained by
a loop written as nanoGPT's train.py is (`get_batch` from the token array, AdamW with decay on matrices only,
warmup then cosine to lr / 10, gradient clipping at 1, fp32 as nanoGPT runs on a CPU), with the shape and
recipe of issue 16's baseline (6 x 192, block 128, batch 16, lr 1e-3) and nanoGPT's shakespeare_char
settings otherwise (beta2 0.99, warmup 100, min lr 1e-4, weight decay 0.1). Its vocabulary is the 256 bytes.

Each seed trains the two side by side (one thread each, a CPU-time budget each), or with `--threads 2`
one after the other, each alone on the machine with two threads and a wall-clock budget (as a user with a
2-core machine would run either; the order alternates with the seed), then both are scored here by one function: held-out nats per byte over the validation text in consecutive 128-byte windows.
A nanoGPT run learns its cosine length from its own speed (its first 50 steps), as minimoe's time budget
does. Seeds already scored are kept and a seed whose two runs finished is only scored again, so a
stopped run resumes where it was (a seed stopped while training starts that seed again).

    python experiments/nanogpt_headline.py --train runs/data/shakespeare_train90.txt \
        --val runs/data/shakespeare_val10.txt --out runs/nanogpt_headline --seeds 1 2 3 4 5 --minutes 10
    python experiments/nanogpt_headline.py --train runs/data/shakespeare_train90.txt \
        --val runs/data/shakespeare_val10.txt --out runs/nanogpt_headline_2t --threads 2 --minutes 10
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

WINDOW = 128  # the block size of both models, and the scoring window


class NanoGPT(nn.Module):
    """GPT-2 as nanoGPT's model.py builds it with bias=False and dropout 0."""

    def __init__(
        self, vocab: int = 256, block: int = WINDOW, n_layer: int = 6, n_head: int = 6, d: int = 192
    ):
        super().__init__()
        self.n_head, self.block = n_head, block
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(block, d)
        self.h = nn.ModuleList(
            nn.ModuleDict(
                {
                    "ln_1": nn.LayerNorm(d, bias=False),
                    "c_attn": nn.Linear(d, 3 * d, bias=False),
                    "attn_proj": nn.Linear(d, d, bias=False),
                    "ln_2": nn.LayerNorm(d, bias=False),
                    "c_fc": nn.Linear(d, 4 * d, bias=False),
                    "mlp_proj": nn.Linear(4 * d, d, bias=False),
                }
            )
            for _ in range(n_layer)
        )
        self.ln_f = nn.LayerNorm(d, bias=False)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight
        for name, p in self.named_parameters():  # nanoGPT's init: N(0, 0.02), residual projections scaled
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        B, T = idx.shape
        x = self.wte(idx) + self.wpe(torch.arange(T))
        for b in self.h:
            q, k, v = b["c_attn"](b["ln_1"](x)).view(B, T, 3, self.n_head, -1).permute(2, 0, 3, 1, 4)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + b["attn_proj"](y.transpose(1, 2).reshape(B, T, -1))
            x = x + b["mlp_proj"](F.gelu(b["c_fc"](b["ln_2"](x))))
        return self.lm_head(self.ln_f(x))


def cosine_lr(it: int, lr: float, min_lr: float, warmup: int, decay_iters: int) -> float:
    """nanoGPT's get_lr: linear warmup, cosine to min_lr at decay_iters, then min_lr."""
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    if it > decay_iters:
        return min_lr
    ratio = (it - warmup) / max(1, decay_iters - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def train_nanogpt(
    train_file: Path, out: Path, seed: int, minutes: float, max_iters: int | None = None, threads: int = 1
) -> NanoGPT:
    """nanoGPT's training loop for `minutes` of this process's CPU time on one thread, or of wall time on
    more (or `max_iters`); logs the train loss every 10 iterations to out/log.csv and writes out/model.pt."""
    torch.set_num_threads(threads)
    clock = time.process_time if threads == 1 else time.perf_counter
    torch.manual_seed(seed)
    data = np.frombuffer(train_file.read_bytes(), dtype=np.uint8)
    model = NanoGPT()
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": matrices, "weight_decay": 0.1}, {"params": vectors, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.99), fused=True)
    batch, budget = 16, 60.0 * minutes
    decay_iters = max_iters or 5000  # replaced by the budget's estimate after 50 iterations

    def get_batch():
        ix = torch.randint(len(data) - WINDOW, (batch,))
        x = torch.stack([torch.from_numpy(data[i : i + WINDOW].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1 : i + 1 + WINDOW].astype(np.int64)) for i in ix])
        return x, y

    out.mkdir(parents=True, exist_ok=True)
    rows, it, t0 = [], 0, clock()
    X, Y = get_batch()
    while True:
        spent = clock() - t0
        if spent >= budget or (max_iters is not None and it >= max_iters):
            break
        if it == 50 and max_iters is None:
            decay_iters = int(budget / (spent / 50))
        for g in opt.param_groups:
            g["lr"] = cosine_lr(it, 1e-3, 1e-4, 100, decay_iters)
        loss = F.cross_entropy(model(X).flatten(0, 1), Y.flatten())
        X, Y = get_batch()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if it % 10 == 0:
            rows.append((it, round(spent, 2), loss.item()))
        it += 1
    with open(out / "log.csv", "w", newline="") as f:
        csv.writer(f).writerows([("step", "seconds", "train_loss"), *rows])
    torch.save(model.state_dict(), out / "model.pt")
    summary = {"steps": it, "tokens": it * batch * WINDOW, "seconds": spent, "threads": threads}
    (out / "train.json").write_text(json.dumps({**summary, "clock": "cpu" if threads == 1 else "wall"}))
    return model


@torch.no_grad()
def held_out_nats(logits_of, ids: np.ndarray, batch: int = 32) -> float:
    """Mean next-token loss over consecutive windows of WINDOW targets (each window's inputs are the
    WINDOW ids before its targets; a last partial window is left out), the same for every model."""
    n = (len(ids) - 1) // WINDOW
    x = torch.from_numpy(ids[: n * WINDOW].astype(np.int64)).view(n, WINDOW)
    y = torch.from_numpy(ids[1 : n * WINDOW + 1].astype(np.int64)).view(n, WINDOW)
    total = 0.0
    for i in range(0, n, batch):
        logits = logits_of(x[i : i + batch]).float()
        total += F.cross_entropy(logits.flatten(0, 1), y[i : i + batch].flatten(), reduction="sum").item()
    return total / (n * WINDOW)


def score_nanogpt(run: Path, val_file: Path) -> float:
    model = NanoGPT()
    model.load_state_dict(torch.load(run / "model.pt", weights_only=True))
    return held_out_nats(model.eval(), np.frombuffer(val_file.read_bytes(), dtype=np.uint8))


def score_minimoe(run: Path, val_file: Path) -> float:
    from minimoe.train.checkpoint import load_run

    model, tokenizer, _, _ = load_run(run, which="latest")
    if tokenizer.kind != "byte":
        raise SystemExit(f"{run} was not trained on byte tokens (data.tokenizer=byte)")
    # the file's bytes as they are, as nanoGPT reads them: a document separator written in it
    # ("<|endoftext|>") is scored as its 13 bytes, though minimoe's byte tokenizer trained on it as one token
    return held_out_nats(lambda x: model(x).logits, np.frombuffer(val_file.read_bytes(), dtype=np.uint8))


def minimoe_command(
    train: Path, val: Path, out: Path, seed: int, minutes: float, max_steps: int | None, threads: int = 1
) -> list[str]:
    """The MoE run: `tiny` as the CLI gives it, on byte tokens, with only budget, thread and logging settings
    (one thread: a CPU-time budget; more: wall time, counted from the command's start as the CLI does)."""
    return [
        sys.executable, "-m", "minimoe", "train", "--preset", "tiny", "--data", str(train), "--val-data", str(val),
        "--out", str(out), "--no-progress", "--no-sample", "data.tokenizer=byte", "data.workers=1",
        f"train.seed={seed}", f"train.threads={threads}", f"train.clock={'cpu' if threads == 1 else 'wall'}",
        f"train.max_minutes={minutes}",
        f"train.max_steps={max_steps or 1_000_000}", "train.eval_every=1000000", "train.keep_last=1",
    ]  # fmt: skip


def trained(moe_dir: Path, gpt_dir: Path, args) -> bool:
    """Both runs of a seed finished training (a seed stopped while scoring is scored again, not retrained)."""
    from minimoe.lab.sweep import run_state

    done = run_state(moe_dir, args.max_steps or 1_000_000, args.minutes) == "done"
    return done and (gpt_dir / "train.json").exists()


def waves(moe_cmd: list[str], gpt_cmd: list[str], threads: int, seed: int) -> list[list[list[str]]]:
    """The training commands grouped into waves that run at once: both together on one thread each; on more
    threads one at a time, each alone on the machine, the order alternating with the seed so that a drift in
    the host's speed falls on both models alike."""
    if threads == 1:
        return [[moe_cmd, gpt_cmd]]
    return [[moe_cmd], [gpt_cmd]] if seed % 2 else [[gpt_cmd], [moe_cmd]]


def run_seed(args, seed: int) -> dict:
    """Both models of one seed trained (side by side on one thread each, or one after the other on more),
    then both scored."""
    moe_dir, gpt_dir = args.out / f"tiny-{seed}", args.out / f"nanogpt-{seed}"
    gpt_cmd = [sys.executable, __file__, "--worker", "--train", str(args.train), "--out", str(gpt_dir),
               "--seeds", str(seed), "--minutes", str(args.minutes), "--threads", str(args.threads)]  # fmt: skip
    if args.max_steps:
        gpt_cmd += ["--max-steps", str(args.max_steps)]
    moe_cmd = minimoe_command(args.train, args.val, moe_dir, seed, args.minutes, args.max_steps, args.threads)
    if not trained(moe_dir, gpt_dir, args):  # a seed stopped while training starts again from scratch
        budget = "CPU-minutes" if args.threads == 1 else f"minutes on {args.threads} threads, one at a time"
        print(f"seed {seed}: training both, {args.minutes} {budget} each", flush=True)
        for d in (moe_dir, gpt_dir):
            shutil.rmtree(d, ignore_errors=True)
        for wave in waves(moe_cmd, gpt_cmd, args.threads, seed):
            procs = [subprocess.Popen(c, stdout=subprocess.DEVNULL) for c in wave]
            try:
                if any([p.wait() for p in procs]):
                    raise SystemExit(f"seed {seed}: a training run failed (see its output above)")
            finally:  # stopped (Ctrl-C, SIGTERM) or failed: no run goes on training alone
                for p in procs:
                    p.kill()
    torch.set_num_threads(1)
    moe_meta = json.loads(sorted(moe_dir.glob("checkpoints/*/meta.json"))[-1].read_text())
    return {
        "seed": seed,
        "threads": args.threads,
        "tiny": score_minimoe(moe_dir, args.val) / math.log(2),
        "nanogpt": score_nanogpt(gpt_dir, args.val) / math.log(2),
        "tiny_tokens": moe_meta.get("tokens"),
        "nanogpt_tokens": json.loads((gpt_dir / "train.json").read_text())["tokens"],
    }


def report(results: list[dict], out: Path) -> str:
    from minimoe.lab.report import paired_stats

    lines = [
        "| seed | `tiny` MoE bits/byte | nanoGPT bits/byte | MoE - nanoGPT | tokens (MoE / nanoGPT) |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['seed']} | {r['tiny']:.4f} | {r['nanogpt']:.4f} | {r['tiny'] - r['nanogpt']:+.4f} | "
            f"{r['tiny_tokens'] or 0:,} / {r['nanogpt_tokens']:,} |"
        )
    st = paired_stats([r["tiny"] - r["nanogpt"] for r in results])
    if st:
        lines.append(
            f"\nMoE - nanoGPT, paired by seed: {st['mean']:+.4f} ± {st['se']:.4f} bits/byte "
            f"(95% interval [{st['lo']:+.4f}, {st['hi']:+.4f}], {st['n']} seeds; mean = {abs(st['mean']) / st['se']:.1f} SE)"
        )
    _figure(results, out / "nanogpt_headline.png", results[0].get("threads", 1) if results else 1)
    return "\n".join(lines)


def _figure(results: list[dict], path: Path, threads: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    for r in results:
        ax.plot([0, 1], [r["nanogpt"], r["tiny"]], "o-", color="tab:gray", alpha=0.7)
    ax.set_xticks([0, 1], ["nanoGPT (dense, fp32)", "minimoe tiny (MoE)"])
    ax.set_ylabel("held-out bits/byte (lower is better)")
    same = "same CPU-minutes" if threads == 1 else f"same minutes alone on {threads} threads"
    ax.set_title(f"{same}, paired by seed", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=Path, required=True)
    ap.add_argument("--val", type=Path)
    ap.add_argument("--out", type=Path, default=Path("runs/nanogpt_headline"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    ap.add_argument("--minutes", type=float, default=10.0, help="minutes per run (CPU time on one thread)")
    ap.add_argument(
        "--threads", type=int, default=1, help="threads per run: 1 runs the two side by side, more in turn"
    )
    ap.add_argument("--max-steps", type=int, help="stop each run after this many steps too (smoke runs)")
    ap.add_argument(
        "--worker", action="store_true", help=argparse.SUPPRESS
    )  # one nanoGPT run, --out is its folder
    args = ap.parse_args()
    if args.worker:
        train_nanogpt(args.train, args.out, args.seeds[0], args.minutes, args.max_steps, args.threads)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    results_file = args.out / "results.jsonl"
    done = (
        [json.loads(line) for line in results_file.read_text().splitlines()] if results_file.exists() else []
    )
    if args.threads < 1:
        raise SystemExit(f"--threads must be at least 1, not {args.threads}")
    if any(r.get("threads", 1) != args.threads for r in done):
        raise SystemExit(f"{results_file} holds runs at another thread count; give --out a folder of its own")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so run_seed's `finally` stops both runs
    todo = [s for s in args.seeds if not any(r["seed"] == s for r in done)]
    start = time.monotonic()
    for i, seed in enumerate(todo):
        eta = ""
        if i:
            left = (time.monotonic() - start) / i * (len(todo) - i)
            eta = f", done at about {time.strftime('%H:%M', time.localtime(time.time() + left))}"
        print(f"seed {seed} ({i + 1} of {len(todo)}){eta}", flush=True)
        r = run_seed(args, seed)
        done.append(r)
        with open(results_file, "a") as f:
            f.write(json.dumps(r) + "\n")
        print(f"seed {seed}: tiny {r['tiny']:.4f}, nanoGPT {r['nanogpt']:.4f} bits/byte", flush=True)
    text = report([r for r in done if r["seed"] in args.seeds], args.out)
    (args.out / "report.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
