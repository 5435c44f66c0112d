"""What bf16 autocast buys each part of a training step on this CPU, measured in one process.

    python benchmarks/autocast_parts.py              # the `tiny` preset's parts (byte vocabulary)
    python benchmarks/autocast_parts.py --threads 2

For each part (the attention sub-block, the MoE layer, a dense SwiGLU layer, the fused LM head and
loss, and the whole model) it times forward + backward in fp32 and under bf16
autocast, alternating the two, and prints the CPU time of each and their ratio (median over rounds).
It answers why one model gains more from bf16 than another: bf16 speeds up the matrix multiplies,
not the gathers, scatters and casts around them. On a CPU without native bf16 (no AVX-512 BF16 or
AMX) expect ratios under 1: `train.precision=auto` then stays fp32.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from minimoe.config_yaml import build_run_config
from minimoe.model.experts import MLP
from minimoe.model.loss import linear_cross_entropy
from minimoe.model.moe import MoE
from minimoe.model.transformer import Transformer
from minimoe.train.precision import native_bf16

BATCH, SEQ = 16, 128  # the tiny recipe's batch


def timed(fn, bf16: bool) -> float:
    """CPU seconds of one forward + backward of `fn` (fp32, or under bf16 autocast)."""
    t0 = time.process_time()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = fn()
    out.float().sum().backward()
    return time.process_time() - t0


def moe_name(cfg) -> str:
    """The MoE layer's row label from its config, e.g. "MoE layer (8 x 128 top-2 + shared)"."""
    shared = f" + {cfg.n_shared_experts} shared" if cfg.n_shared_experts else ""
    return f"MoE layer ({cfg.n_routed_experts} x {cfg.moe_intermediate_size} top-{cfg.num_experts_per_tok}{shared})"


def parts(model: Transformer) -> dict:
    D = model.cfg.hidden_size
    cos, sin = model.rope_cos[:SEQ], model.rope_sin[:SEQ]
    moe_block = next(b for b in model.layers if isinstance(b.mlp, MoE))
    dense_block = next((b for b in model.layers if isinstance(b.mlp, MLP)), None)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    # fresh inputs every call, as in training: the experts' row counts change from call to call (with
    # repeated inputs oneDNN's per-shape kernels would be reused and bf16 would look faster than it is)
    def leaf():
        return torch.randn(BATCH, SEQ, D, requires_grad=True)

    def ids():
        return torch.randint(0, model.cfg.vocab_size, (BATCH, SEQ))

    def step():
        tokens = ids()
        out = model(tokens, targets=tokens.roll(-1, 1), return_logits=False)
        opt.zero_grad(set_to_none=True)  # the caller's backward fills the grads; step them next turn
        return out.loss

    found = {
        f"attention ({'MLA' if model.cfg.attn_type == 'mla' else 'GQA/MHA'}) + its norm": lambda: (
            moe_block.self_attn(moe_block.input_layernorm(leaf()), cos, sin)
        ),
        moe_name(model.cfg): lambda: moe_block.mlp(leaf())[0],
        "LM head + cross-entropy (fused)": lambda: linear_cross_entropy(leaf(), model.lm_head.weight, ids()),
        "whole model, forward + backward": step,
    }
    if dense_block is not None:
        found[f"dense SwiGLU layer (width {model.cfg.intermediate_size})"] = lambda: dense_block.mlp(leaf())
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--preset", default="tiny")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = build_run_config(args.preset, None, ["model.vocab_size=320", "model.mtp_depth=0"]).validate()
    model = Transformer(cfg.model)
    print(
        f"{args.preset}, batch {BATCH} x {SEQ}, byte vocabulary (320), {args.threads} thread(s), torch "
        f"{torch.__version__}, native bf16: {native_bf16(torch.device('cpu'))}; CPU ms, median of {args.rounds} "
        "alternating rounds"
    )
    print("| part | fp32 ms | bf16 autocast ms | fp32 / bf16 |")
    print("|---|---|---|---|")
    for name, fn in parts(model).items():
        for bf16 in (False, True, False, True):  # warm-up
            timed(fn, bf16)
        t = {False: [], True: []}
        for _ in range(args.rounds):
            for bf16 in (False, True):
                t[bf16].append(timed(fn, bf16))
        a, b = statistics.median(t[False]) * 1e3, statistics.median(t[True]) * 1e3
        print(f"| {name} | {a:.1f} | {b:.1f} | {a / b:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
