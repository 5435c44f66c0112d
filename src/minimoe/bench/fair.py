"""`minimoe bench --against hf --fair`: each model at its own best CPU setting, each in its own process.

The in-process comparison runs transformers under whatever OpenMP settings minimoe's process has
(the CLI sets OMP_WAIT_POLICY=PASSIVE, which helps minimoe's one-thread decode and slows
transformers' many small multi-threaded kernels). The wait policy is read once, when the OpenMP
runtime starts, so a fair comparison needs processes:

1. choose: for each side, a short probe runs in a fresh process under every setting (OMP_WAIT_POLICY
   PASSIVE / ACTIVE / unset x 1 thread / every core): a decode at batch 1 and at batch 8 (prompt 32)
   and a prefill. Each picks the setting of its measurements: the batch-1 decode rows, the batch-8
   ones, training and prefill (a small decode step may want one thread where matrix products want
   every core). With --compiled-decode, minimoe's compiled step is probed the same way for settings of
   its own;
2. measure: each side runs the suite in its own processes at its settings (one process for the
   measurements that share a setting; the compiled decode in processes of its own); the sides take
   turns `rounds` times (process after process), the median of each side's measurement is kept, and
   each ratio is the median of the rounds' ratios (a round's minimoe process over its HF process), with
   their min-max and, from 3 rounds, their 95% interval (`minimoe.bench.ratios`);
3. check: in every round, right after the HF side's batch-1 decode process, transformers alone, in a
   process that imports only torch and transformers, loads the same weights (saved by the HF side) and
   times `generate` at batch 1 at the HF side's setting, with the prompt length, new tokens and repeats
   of the bench's decode_b1 row; the bench's HF side over it, per round (`hf_alone_ratio`, the median
   with its spread), should be near 1.

Every process builds the same random weights from the config's seed. `python -m minimoe.bench.fair`
is the worker each process runs (one JSON line on stdout).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from minimoe.bench.ratios import add_ratio, per_round

POLICIES = ("PASSIVE", "ACTIVE", "unset")  # unset: the OpenMP runtime's default (libgomp: spin, then sleep)
SIDES = ("minimoe", "hf")
RAN_UNDER = ("omp_wait_policy", "threads")  # a worker's answer: the setting it really ran under
COMPILED = "minimoe compiled"  # the settings and probes of minimoe's compiled decode step (--compiled-decode)
# A side's settings: its name alone for the batch-1 decode rows, with a suffix for the others
BATCHED = " batch 8"  # decode rows of several sequences (a batch-8 decode probe)
COMPUTE = " training and prefill"  # training and prefill (a prefill probe)
# measurement group (`BenchSettings.groups`) -> (the probe's answer that picks its setting, the setting's suffix)
PLAIN_GROUPS = {"decode": ("decode_b1_tok_s", ""), "batched": ("decode_b8_tok_s", BATCHED),
                "compute": ("prefill_tok_s", COMPUTE)}  # fmt: skip
COMPILED_GROUPS = {"compiled": ("decode_b1_tok_s", ""), "compiled_batched": ("decode_b8_tok_s", BATCHED)}

# transformers alone: nothing of minimoe is imported, only the saved HF model is loaded
HF_ALONE = """
import json, sys, time, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
new, repeats, prompt = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
ids = torch.randint(0, model.config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(0))
kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new, min_new_tokens=new,
          use_cache=True, eos_token_id=None, pad_token_id=0)
rates = []
with torch.no_grad():
    model.generate(ids, **kw)
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = model.generate(ids, **kw)
        rates.append((out.shape[1] - ids.shape[1]) / (time.perf_counter() - t0))
rates.sort()
print(json.dumps({"decode_b1_tok_s": rates[len(rates) // 2]}))
"""


def bench_settings(quick: bool, repeats: int | None = None):
    """The `BenchSettings` a worker measures with (`--quick`, `--repeats N`)."""
    from minimoe.bench.measure import BenchSettings

    settings = BenchSettings.quick() if quick else BenchSettings()
    if repeats:
        settings.repeats = repeats
    return settings


def settings_of(base: list[str]):
    """The `BenchSettings` of the workers that `base` (fair_compare's worker arguments) starts."""
    repeats = int(base[base.index("--repeats") + 1]) if "--repeats" in base else None
    return bench_settings("--quick" in base, repeats)


def hf_alone(saved: str, setting: dict, prompt: int, new_tokens: int, repeats: int) -> float:
    """Batch-1 decode tokens/s of transformers alone (`HF_ALONE`) on the model saved in `saved`, under the
    HF side's `setting` ({"omp_wait_policy", "threads"})."""
    cmd = [sys.executable, "-c", HF_ALONE, saved, str(new_tokens), str(repeats), str(prompt)]
    env = omp_env(setting["omp_wait_policy"], setting["threads"])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"transformers alone failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["decode_b1_tok_s"]


def settings_to_try(cores: int | None = None) -> list[tuple[str, int]]:
    """(OMP_WAIT_POLICY, threads) pairs: each policy at 1 thread and at every core."""
    cores = cores or os.cpu_count() or 1
    return [(policy, threads) for policy in POLICIES for threads in sorted({1, cores})]


def omp_env(policy: str, threads: int) -> dict[str, str]:
    """This process's environment with the OpenMP wait policy and thread count of a setting."""
    env = {**os.environ, "OMP_WAIT_POLICY": policy, "OMP_NUM_THREADS": str(threads)}
    if policy == "unset":
        del env["OMP_WAIT_POLICY"]
    return env


def run_worker(
    worker_args: list[str],
    policy: str,
    threads: int,
    timeout: float = 3600,
    module: str = "minimoe.bench.fair",
) -> dict:
    """Run `python -m MODULE WORKER_ARGS --threads N` under the setting; its JSON answer (last line). An
    answer that names the setting it ran under (`omp_wait_policy`, `threads`) must name this one."""
    cmd = [sys.executable, "-m", module, *worker_args, "--threads", str(threads)]
    proc = subprocess.run(cmd, env=omp_env(policy, threads), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"the benchmark process failed ({' '.join(worker_args[:2])}): {tail[0]}")
    answer = json.loads(proc.stdout.strip().splitlines()[-1])
    ran = {k: answer[k] for k in RAN_UNDER if k in answer}
    if ran and ran != {"omp_wait_policy": policy, "threads": threads}:
        raise RuntimeError(
            f"the benchmark process ({' '.join(worker_args[:2])}) ran under {ran}, not the setting it was given "
            f"(OMP_WAIT_POLICY={policy}, {threads} threads)"
        )
    return answer


def choose_setting(
    side: str,
    base: list[str],
    settings: list[tuple[str, int]],
    module: str = "minimoe.bench.fair",
    key: str = "decode_b1_tok_s",
) -> tuple[tuple[str, int], dict]:
    """The fastest setting for one side's probe (`python -m MODULE probe SIDE BASE`, its answer's `key`:
    by default the batch-1 decode probe); (setting, {"POLICY/threads": tok/s})."""
    return fastest(probe_settings(side, base, settings, module), key)


def probe_settings(
    side: str, base: list[str], settings: list[tuple[str, int]], module: str = "minimoe.bench.fair"
) -> dict[tuple[str, int], dict]:
    """One side's probe (`python -m MODULE probe SIDE BASE`) in a fresh process under every setting:
    {setting: its answer}."""
    return {(policy, threads): run_worker(["probe", side, *base], policy, threads, module=module)
            for policy, threads in settings}  # fmt: skip


def fastest(answers: dict[tuple[str, int], dict], key: str) -> tuple[tuple[str, int], dict]:
    """The setting whose probe answered the most `key` tokens/s; (setting, {"POLICY/threads": tok/s})."""
    probes = {f"{policy}/{threads}": answer[key] for (policy, threads), answer in answers.items()}
    best = max(answers, key=lambda s: probes[f"{s[0]}/{s[1]}"])
    return best, probes


def fair_compare(base: list[str], rounds: int = 3, settings: list[tuple[str, int]] | None = None) -> dict:
    """The whole fair comparison (steps 1-3 above).

    Args:
        base: worker arguments naming the config: ["--preset", P] or ["--config", C], plus
            "--quick", "--repeats N", "--compiled-decode" and overrides as `minimoe bench` takes them.
        rounds: processes per side in step 2 (median kept).
        settings: the (policy, threads) pairs to try (default `settings_to_try()`).
    Returns:
        the `minimoe bench --json` keys for both sides ({key}_tok_s, hf_{key}_tok_s, {key}_ratio with
        its per-round ratios and spread, peak memory), plus `settings`, `probes`,
        `hf_alone_decode_b1_tok_s` (the median over rounds), `hf_alone_ratio` (with its per-round ratios and
        spread) and `bandwidth_gib_s` (the memory's read rate before the probes and after the
        measurements).
    """
    settings = settings or settings_to_try()
    result: dict = {"settings": {}, "probes": {}}
    plain = [a for a in base if a != "--compiled-decode"]

    def bandwidth() -> float:
        """The memory's read rate, in a process at every core, spinning (not in this one: see
        `minimoe bench --fair`)."""
        cores = max(threads for _, threads in settings)
        return run_worker(["bandwidth", "minimoe", *plain], "ACTIVE", cores)["bandwidth_gib_s"]

    def choose(name: str, answers: dict, key: str) -> tuple[str, int]:
        best, result["probes"][name] = fastest(answers, key)
        result["settings"][name] = {"omp_wait_policy": best[0], "threads": best[1]}
        return best

    result["bandwidth_gib_s"] = [bandwidth()]
    plans = {side: (side, plain, PLAIN_GROUPS) for side in SIDES}
    if plain != base:
        # minimoe's compiled step is a mode of its own: its settings come from probes of its own (the eager
        # decode's best setting is one thread, the compiled step's can be every core)
        plans[COMPILED] = ("minimoe", [*plain, "--compiled-decode"], COMPILED_GROUPS)
    # suite name -> (side, worker arguments, the measurement groups it runs, their setting): the groups of
    # one plan that share a setting run in one process, the plan's first under the plan's name
    suites: dict[str, tuple[str, list[str], str, tuple[str, int]]] = {}
    for name, (side, args, groups) in plans.items():
        answers = probe_settings(side, args, settings)
        by_setting: dict[tuple[str, int], list[str]] = {}
        for group, (key, suffix) in groups.items():
            by_setting.setdefault(choose(name + suffix, answers, key), []).append(group)
        for k, (setting, them) in enumerate(by_setting.items()):
            suites[name if k == 0 else f"{name} ({'+'.join(them)})"] = (side, args, ",".join(them), setting)
    runs: dict[str, list[dict]] = {name: [] for name in suites}
    from minimoe.bench.measure import DECODE_SHAPES, baseline_key

    bench = settings_of(plain)  # transformers alone decodes as the bench's decode_b1 row does
    alone: list[float] = []  # its tokens/s in every round
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for name, (side, args, groups, (policy, threads)) in suites.items():
                extra = ["--save", tmp] if name == "hf" and r == 0 else []
                runs[name].append(
                    run_worker(["suite", side, *args, "--groups", groups, *extra], policy, threads)
                )
                if name == "hf":  # the HF side's batch-1 decode process: transformers alone next to it
                    prompt = runs["hf"][-1].get("decode_b1_prompt", DECODE_SHAPES["decode_b1"][1])
                    alone.append(
                        hf_alone(tmp, result["settings"]["hf"], prompt, bench.new_tokens, bench.repeats)
                    )
        for name in [n for n in suites if n not in SIDES]:  # join each side's other processes to its own
            for own, other in zip(runs[suites[name][0]], runs.pop(name)):
                own.update(other)
        result["bandwidth_gib_s"].append(bandwidth())
    for side in SIDES:
        prefix = "" if side == "minimoe" else "hf_"
        for key in [k for k in runs[side][0] if k not in RAN_UNDER]:  # (checked by run_worker)
            result[prefix + key] = statistics.median(run[key] for run in runs[side])
    for key in [k[: -len("_tok_s")] for k in runs["minimoe"][0] if k.endswith("_tok_s")]:
        # the ratio of each round (the sides' processes took turns in it), their median and spread
        ours = [run[f"{key}_tok_s"] for run in runs["minimoe"]]
        add_ratio(
            result, f"{key}_ratio", per_round(ours, [run[f"{baseline_key(key)}_tok_s"] for run in runs["hf"]])
        )
    result["hf_alone_decode_b1_tok_s"] = statistics.median(alone)
    add_ratio(result, "hf_alone_ratio", per_round([run["decode_b1_tok_s"] for run in runs["hf"]], alone))
    return result


# ------------------------------------------------------------------------------------- the worker


def _worker(argv: list[str]) -> dict:
    p = argparse.ArgumentParser(prog="python -m minimoe.bench.fair")
    p.add_argument("task", choices=["probe", "suite", "bandwidth"])
    p.add_argument("side", choices=SIDES)
    p.add_argument("--preset")
    p.add_argument("--config")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--save", help="(hf side) save the transformers model here for the alone check")
    p.add_argument("--compiled-decode", action="store_true", help="(minimoe side) also the compiled decode")
    p.add_argument(
        "--groups",
        default=",".join([*PLAIN_GROUPS, *COMPILED_GROUPS]),
        help="(suite) the measurement groups to run",
    )
    p.add_argument("overrides", nargs="*", default=[])
    args = p.parse_intermixed_args(argv)  # overrides come after the options

    import torch

    from minimoe.bench import measure as M
    from minimoe.model.transformer import Transformer

    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    if args.task == "bandwidth":
        return {"bandwidth_gib_s": M.matvec_bandwidth_gib_s(device, torch.float32)}
    rc = M.bench_config(args.preset, args.config, list(args.overrides))
    torch.manual_seed(rc.train.seed)
    model = Transformer(rc.model)
    if args.side == "hf":
        from minimoe.bench.hf import hf_twin

        hf = hf_twin(model)
        del model
        if args.save:
            hf.save_pretrained(args.save)
        subject = M.HFSubject(hf, rc, device)
    else:
        subject = M.MinimoeSubject(model, rc, device)
    settings = bench_settings(args.quick, args.repeats)
    settings.compiled_decode = args.compiled_decode and args.side == "minimoe"
    # what the process really ran under, so that `run_worker` can check the setting took effect
    ran_under = {
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
        "threads": torch.get_num_threads(),
    }
    if args.task == "probe":
        mem = {subject.name: M.PeakMemory(device)}
        gen, out = torch.Generator().manual_seed(0), {}
        for key in ("decode_b1", "decode_b8"):  # the decode rows' settings: one sequence, several
            prompts = torch.randint(0, rc.model.vocab_size, M.DECODE_SHAPES[key], generator=gen)
            if settings.compiled_decode:  # the compiled step's probe (compiled before it is timed)
                subject.decode_compiled(prompts, settings.new_tokens)
                fn = {subject.name: lambda p=prompts: subject.decode_compiled(p, settings.new_tokens)}
            else:
                fn = {subject.name: lambda p=prompts: subject.decode(p, settings.new_tokens)}
            out[f"{key}_tok_s"] = M._median_rates(fn, settings.repeats, device, mem)[subject.name]
        if not settings.compiled_decode:  # training and prefill's setting (a prefill of quick's shape)
            x = torch.randint(0, rc.model.vocab_size, M.BenchSettings.quick().prefill_shape, generator=gen)
            prefill = {subject.name: lambda: subject.prefill(x)}
            out["prefill_tok_s"] = M._median_rates(prefill, settings.repeats, device, mem)[subject.name]
        return {**out, **ran_under}
    out = dict(ran_under)
    prefix = "" if args.side == "minimoe" else "hf_"
    settings.groups = tuple(args.groups.split(","))
    for _, values in M.run_bench([subject], rc, device, settings):
        # `<shape>_prompt` has no prefix; the per-repeat rates stay in the process (a round is a process here)
        out.update({k.removeprefix(prefix): v for k, v in values.items() if not k.endswith("_rates")})
    return out


if __name__ == "__main__":
    print(json.dumps(_worker(sys.argv[1:])))
