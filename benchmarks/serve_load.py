"""Load test of `minimoe serve`: one client against 32 concurrent clients, on a real server on 127.0.0.1.

    python benchmarks/serve_load.py                        # the reference config, random weights
    python benchmarks/serve_load.py --quick                # fewer requests (about a minute)
    python benchmarks/serve_load.py --run-dir runs/x       # serve an existing run instead

The server is `python -m minimoe serve` in a subprocess. Each client sends non-streaming completions
one after another (a prompt of `--prompt-tokens` tokens, `--max-tokens` new tokens, greedy). The two
loads take turns, `--repeats` times, and the median of each is kept, so a burst of load from other
processes hits both alike. Reported: total completion tokens/s, requests/s, p50 and p99 latency, and
the ratio of the 32-client throughput to the 1-client throughput (continuous batching makes it > 1:
every running sequence advances in the same forward pass). Then the amplification request of issue
17 ({"prompt": ["a"] * 20000, "n": 32, "max_tokens": 500}) is sent while a small request runs; the
time to its 400 and the small request's latency are reported. Markdown on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import queue
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

CONFIG = Path(__file__).parent / "configs" / "hf-reference.yaml"
NAME = "bench"


def make_run(config: Path, root: Path) -> Path:
    """A run directory holding the config's model with random weights (seed 0) and the byte tokenizer;
    throughput does not depend on what the weights say."""
    from minimoe.config import RunConfig
    from minimoe.config_yaml import dataclass_from_dict, load_yaml
    from minimoe.data import Tokenizer
    from minimoe.model.transformer import Transformer
    from minimoe.train.checkpoint import save_checkpoint

    cfg = dataclass_from_dict(RunConfig, load_yaml(config)).validate()
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    run = root / "run"
    save_checkpoint(run, 0, model, {}, {"step": 0}, config.read_text(), Tokenizer.byte(), is_best=True)
    return run


def start_server(run: Path, args: list[str]) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "minimoe", "serve", str(run), "--port", "0", "--model-name", NAME]
    proc = subprocess.Popen(cmd + args + ["--log-level", "warning"], stdout=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()

    def read() -> None:
        for x in proc.stdout:
            lines.put(x)
        lines.put(None)  # the server exited (its one-sentence reason went to stderr)

    threading.Thread(target=read, daemon=True).start()
    first = lines.get(timeout=120)
    if first is None:
        raise SystemExit(
            f"serve_load: `minimoe serve {run}` exited with status {proc.wait()} before it listened"
        )
    url = first.strip().rsplit(" ", 1)[-1].removesuffix("/v1")
    deadline = time.time() + 60
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.TransportError:
            if time.time() > deadline:
                raise
            time.sleep(0.2)


def prompt_text(rng: random.Random, n_tokens: int) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(n_tokens))  # byte tokens


async def run_load(url: str, clients: int, requests_each: int, prompt_tokens: int, max_tokens: int) -> dict:
    """`clients` concurrent clients, each sending `requests_each` requests in turn."""
    rng = random.Random(clients)
    latencies: list[float] = []
    tokens = 0

    async def client(c: httpx.AsyncClient) -> None:
        nonlocal tokens
        for _ in range(requests_each):
            body = {"model": NAME, "prompt": prompt_text(rng, prompt_tokens), "max_tokens": max_tokens}
            body["temperature"] = 0
            t0 = time.perf_counter()
            r = await c.post(f"{url}/v1/completions", json=body, timeout=600)
            latencies.append(time.perf_counter() - t0)
            r.raise_for_status()
            tokens += r.json()["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(limits=limits) as c:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(c) for _ in range(clients)))
        wall = time.perf_counter() - t0
    latencies.sort()
    return {
        "tokens_per_s": tokens / wall,
        "requests_per_s": len(latencies) / wall,
        "p50": latencies[len(latencies) // 2],
        "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
    }


async def amplification(url: str) -> tuple[float, float, int]:
    """(seconds to refuse the 100 KB request, the concurrent small request's latency, its status)."""
    big = {"model": NAME, "prompt": ["a"] * 20000, "n": 32, "max_tokens": 500}
    small = {"model": NAME, "prompt": "the cat sat", "max_tokens": 8, "temperature": 0}
    async with httpx.AsyncClient() as c:

        async def timed(body):
            t0 = time.perf_counter()
            r = await c.post(f"{url}/v1/completions", json=body, timeout=120)
            return time.perf_counter() - t0, r.status_code

        (t_small, s_small), (t_big, s_big) = await asyncio.gather(timed(small), timed(big))
    assert s_big == 400, s_big
    return t_big, t_small, s_small


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=CONFIG, help="model config (random weights)")
    ap.add_argument("--run-dir", type=Path, default=None, help="serve this run instead of --config")
    ap.add_argument("--clients", type=int, default=32, help="concurrent clients of the second load")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="fewer requests per client")
    ap.add_argument("--server-args", default="", help="extra `minimoe serve` flags, e.g. '--threads 4'")
    args = ap.parse_args()
    if args.run_dir is not None and not args.run_dir.exists():
        raise SystemExit(f"serve_load: the run {args.run_dir} does not exist")
    tmp = tempfile.TemporaryDirectory()
    run = args.run_dir or make_run(args.config, Path(tmp.name))
    proc, url = start_server(run, args.server_args.split())
    try:
        # the single client sends as many requests as the 32 clients send in their first round
        n1, n32 = (8, 1) if args.quick else (args.clients, 2)
        asyncio.run(run_load(url, 2, 1, args.prompt_tokens, args.max_tokens))  # warm-up
        results: dict[str, list[dict]] = {"1": [], str(args.clients): []}
        for _ in range(args.repeats):
            results["1"].append(asyncio.run(run_load(url, 1, n1, args.prompt_tokens, args.max_tokens)))
            results[str(args.clients)].append(
                asyncio.run(run_load(url, args.clients, n32, args.prompt_tokens, args.max_tokens))
            )
        med = {k: {m: statistics.median(r[m] for r in rs) for m in rs[0]} for k, rs in results.items()}
        t_big, t_small, s_small = asyncio.run(amplification(url))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        tmp.cleanup()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    )
    print(
        f"model: {args.run_dir or args.config}; prompt {args.prompt_tokens} tokens, max_tokens {args.max_tokens}, greedy"
    )
    print(f"median of {args.repeats} turns each\n")
    print("| clients | completion tokens/s | requests/s | p50 latency (s) | p99 latency (s) |")
    print("|---|---|---|---|---|")
    for k, m in med.items():
        print(
            f"| {k} | {m['tokens_per_s']:.1f} | {m['requests_per_s']:.2f} | {m['p50']:.2f} | {m['p99']:.2f} |"
        )
    ratio = med[str(args.clients)]["tokens_per_s"] / med["1"]["tokens_per_s"]
    print(f"\n{args.clients} clients / 1 client total tokens/s: {ratio:.2f}x")
    print(
        f"amplification request refused in {t_big * 1000:.0f} ms; the concurrent small request: "
        f"status {s_small} in {t_small * 1000:.0f} ms"
    )
    print(json.dumps({"ratio": ratio, "median": med, "amplification_s": t_big}), file=sys.stderr)


if __name__ == "__main__":
    main()
