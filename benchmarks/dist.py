"""Distributed training: tokens/s with 1 process against 2 (DDP, FSDP2, expert parallelism) at the same
global batch, and the all-to-all volume of expert parallelism per step.

    python benchmarks/dist.py            # prints Markdown tables
    python benchmarks/dist.py --quick    # fewer steps

Every run goes through `minimoe train`'s own code path (`train_from_config`, launched with `torchrun`
for 2 processes) on generated text with the byte tokenizer. Tokens/s is the trainer's steady-state
number (the second logging window; the first holds start-up). On the CPU the backend is gloo and each
of the 2 processes gets one thread (torchrun's default) while the single process gets both, so the
ratio says what splitting the same cores between ranks costs or gains; with GPUs (NCCL), 2 processes
need 2 GPUs and the comparison is skipped otherwise. All numbers in one table come from one run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

MODEL = [
    "model.hidden_size=128", "model.num_hidden_layers=4", "model.num_attention_heads=4", "model.kv_lora_rank=32",
    "model.qk_nope_head_dim=32", "model.qk_rope_head_dim=16", "model.v_head_dim=32",
    "model.intermediate_size=256", "model.first_k_dense_replace=1", "model.n_routed_experts=8",
    "model.num_experts_per_tok=2", "model.moe_intermediate_size=64", "model.n_shared_experts=1",
    "model.mtp_depth=0", "model.max_position_embeddings=128",
]  # fmt: skip
TRAIN = [
    "train.seq_len=128", "train.batch_size=8", "train.eval_batches=1", "train.sample_tokens=0",
    "data.tokenizer=byte", "data.workers=0", "train.warmup_steps=2",
]  # fmt: skip
CORES = os.cpu_count() or 2
LAUNCHES = {  # name -> (processes, CPU threads per process, extra overrides)
    "1 process, 1 thread": (1, 1, []),
    f"1 process, {CORES} threads": (1, CORES, []),
    "2 x DDP": (2, max(1, CORES // 2), ["dist.strategy=ddp"]),
    "2 x FSDP2": (2, max(1, CORES // 2), ["dist.strategy=fsdp"]),
    "2 x EP (4 experts/rank)": (2, max(1, CORES // 2), ["dist.expert_parallel=2"]),
}


def make_corpus(path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    words = "the a cat dog sat ran on to red big ball mat bird sang while and of in it was".split()
    lines = [
        " ".join(words[i] for i in torch.randint(0, len(words), (16,), generator=g)) for _ in range(3000)
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------- workers


def worker_train(args) -> None:
    """One training run (every rank calls this; rank 0 reports the steady-state tokens/s)."""
    from minimoe.train.run import train_from_config

    half = args.steps // 2
    overrides = MODEL + TRAIN + args.overrides
    overrides += [f"data.path={args.corpus}", f"train.max_steps={args.steps}", f"train.log_every={half}"]
    overrides += [f"train.eval_every={args.steps}"]
    res = train_from_config(overrides=overrides, run_dir=args.run_dir, progress=False, sample=False)
    if res.is_main:
        rows = [json.loads(line) for line in (Path(args.run_dir) / "metrics.jsonl").read_text().splitlines()]
        steady = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][-1]
        Path(args.result).write_text(json.dumps({"tokens_per_s": steady}))


def worker_ep(args) -> None:
    """A few EP training steps on random tokens; rank 0 reports the bytes sent per rank and step."""
    from minimoe.config_yaml import build_run_config
    from minimoe.dist.ep import dispatchers
    from minimoe.dist.init import init_distributed, shutdown
    from minimoe.dist.parallel import parallelize
    from minimoe.model.transformer import Transformer

    cfg = build_run_config(None, None, MODEL + TRAIN + ["dist.expert_parallel=2", "model.vocab_size=320"])
    ctx = init_distributed("auto")
    torch.manual_seed(0)
    model = Transformer(cfg.model).to(ctx.device)
    par = parallelize(model, cfg, ctx)
    B, T = cfg.train.batch_size // par.dp_size, cfg.train.seq_len
    g = torch.Generator().manual_seed(ctx.rank)
    steps = 3
    for _ in range(steps):
        x = torch.randint(0, 256, (B, T + 1), generator=g).to(ctx.device)
        out = par.forward(x[:, :-1], targets=x[:, 1:])
        out.loss.backward()
        par.finish_grads()
        model.zero_grad(set_to_none=True)
    eps = dispatchers(model)
    fwd = sum(d.bytes_sent for d in eps) / steps
    if ctx.is_main:
        mc = cfg.model
        tokens = B * T
        # balanced routing: each of the K slots of a token leaves the rank with probability (R-1)/R, and
        # its output comes back the same way
        R = cfg.dist.expert_parallel
        bytes_per = 4  # fp32 activations
        est = 2 * tokens * mc.num_experts_per_tok * (R - 1) / R * mc.hidden_size * bytes_per * len(eps)
        counts = (R - 1) * (mc.n_routed_experts // R) * 8 * len(eps)  # int64 counts to the other ranks
        result = {"fwd_bytes": fwd, "est_fwd_bytes": est, "layers": len(eps), "tokens_per_rank": tokens}
        Path(args.result).write_text(json.dumps({**result, "counts_bytes": counts}))
    shutdown(ctx)


# ---------------------------------------------------------------------------------------- driver


def launch(nproc: int, threads: int, worker: str, result: Path, extra: list[str]) -> dict:
    script = [str(Path(__file__).resolve()), "--worker", worker, "--result", str(result), *extra]
    if nproc == 1:
        cmd = [sys.executable, *script]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), *script]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{worker} with {nproc} processes failed:\n{proc.stderr[-3000:]}")
    return json.loads(result.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps")
    ap.add_argument("--worker", choices=["train", "ep"], help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--corpus", help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=12, help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", default=[], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker == "train":
        return worker_train(args)
    if args.worker == "ep":
        return worker_ep(args)

    steps, rounds = (6, 1) if args.quick else (12, 2)
    gpus = torch.cuda.device_count()
    device = f"{gpus} x {torch.cuda.get_device_name(0)}" if gpus else f"CPU ({CORES} cores, gloo)"
    launches = dict(LAUNCHES)
    if gpus:  # NCCL: one GPU per process, and CPU threads hardly matter
        launches = {k: v for k, v in LAUNCHES.items() if v[0] <= gpus and k != f"1 process, {CORES} threads"}
    best: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ.setdefault("MINIMOE_CACHE", str(tmp / "cache"))
        corpus = tmp / "corpus.txt"
        make_corpus(corpus)
        # rounds interleave the launches, and each keeps its best: a burst of load from other
        # programs then hits one sample, not one launch
        for r in range(rounds):
            for i, (name, (nproc, threads, extra)) in enumerate(launches.items()):
                run_args = [
                    "--corpus",
                    str(corpus),
                    "--run-dir",
                    str(tmp / f"run{r}-{i}"),
                    "--steps",
                    str(steps),
                ]
                res = launch(nproc, threads, "train", tmp / f"r{r}-{i}.json", [*run_args, *extra])
                best[name] = max(best.get(name, 0.0), res["tokens_per_s"])
        ep = launch(2, max(1, CORES // 2), "ep", tmp / "ep.json", []) if not gpus or gpus >= 2 else None

    one = best[next(iter(best))]
    allc = best.get(f"1 process, {CORES} threads", one)
    print(f"### Training throughput, same global batch ({device}, torch {torch.__version__})\n")
    print("model: hidden 128, 4 layers (1 dense + 3 MoE, 8 experts top-2 + 1 shared), MLA, seq 128,")
    print(f"global batch 8, fp32, {steps} steps, steady-state tokens/s (second half), best of {rounds}\n")
    print(f"| launch | tokens/s | vs 1 process, 1 thread | vs 1 process, {CORES} threads |")
    print("| --- | ---: | ---: | ---: |")
    for name, tps in best.items():
        print(f"| {name} | {tps:,.0f} | {tps / one:.2f}x | {tps / allc:.2f}x |")
    if ep is not None:
        print("\n### Expert-parallel all-to-all volume (2 ranks, 4 of 8 experts each)\n")
        print("| per rank and step | bytes |")
        print("| --- | ---: |")
        print(
            f"| token rows sent, forward (dispatch + combine, {ep['layers']} MoE layers) | {ep['fwd_bytes']:,.0f} |"
        )
        print(f"| same, forward + backward | {2 * ep['fwd_bytes']:,.0f} |")
        print(f"| estimate for balanced routing, forward | {ep['est_fwd_bytes']:,.0f} |")
        print(f"| expert counts exchanged, forward | {ep['counts_bytes']:,.0f} |")
        print(f"\n{ep['tokens_per_rank']} tokens per rank per step, hidden 128, fp32 rows.")


if __name__ == "__main__":
    main()
