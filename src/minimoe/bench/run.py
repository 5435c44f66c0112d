"""One benchmark of one config on this machine: the matmul peak, then training, prefill and decode
tokens/s and peak memory of minimoe (and, against="hf", of transformers' DeepseekV3 with the same
weights), and MFU. `minimoe bench` prints what `benchmark` returns."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

import torch

from minimoe.bench import measure as M
from minimoe.bench.ratios import add_ratio, per_round, spread
from minimoe.config import RunConfig
from minimoe.infer.common import num_threads


def steps_of(settings: M.BenchSettings, against: str | None = None) -> int:
    """How many times `benchmark` calls on_step (for a progress bar)."""
    subjects = 2 if against else 1
    names = M.measurements(settings)
    # a compiled decode takes turns with the other side's plain decode, counted with it where that is run
    timed = sum(1 if k.endswith("_compiled") else subjects for k in names)
    timed += sum(subjects - 1 for k in names if k.endswith("_compiled") and M.baseline_key(k) not in names)
    return 1 + timed * (settings.repeats + 1)


def benchmark(
    rc: RunConfig,
    name: str,
    settings: M.BenchSettings,
    against: str | None = None,
    on_step: Callable[[str], None] | None = None,
    on_note: Callable[[str], None] | None = None,
) -> dict:
    """Measure `rc` with random weights.

    Args:
        rc: the config; train.batch_size x train.seq_len is the training batch, train.precision the dtype.
        name: what the result calls the config (preset name or YAML path).
        settings: repeats and sizes (BenchSettings.quick() for a fast run).
        against: "hf" to measure transformers' DeepseekV3 with the same weights too.
        on_step: called with a measurement's name after each timed run.
        on_note: called with a sentence worth showing (e.g. no bf16 arithmetic in hardware).
    Returns:
        One flat dict: machine and config facts, `<measurement>_tok_s` (the median over repeats) and
        `peak_mem_<measurement>_mib` (and `hf_...` when compared, with `<measurement>_ratio`: the median of
        the per-repeat ratios, and their spread as `minimoe.bench.ratios.add_ratio` writes it),
        `matmul_peak_gflops`, `mfu`.
    """
    from minimoe.dist.init import resolve_device
    from minimoe.model.transformer import Transformer

    step = on_step or (lambda key: None)
    device = resolve_device(rc.train.device)
    if rc.train.precision == "auto":  # as M.bench_config: the dtype both sides of a comparison share
        rc.train.precision = "fp32"
    dtype = M.DTYPES[rc.train.precision]
    M.check_context(rc, settings)
    result: dict = {
        "config": name,
        "device": str(device),
        "threads": torch.get_num_threads(),
        # the OpenMP wait policy this process started under (the CLI picks it from the machine's load; it
        # moves the in-process decode ratios: BENCHMARKS.md), "unset" for the runtime's default
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
        "dtype": rc.train.precision,
        "batch": [rc.train.batch_size, rc.train.seq_len],
        **M.machine_info(device),
    }
    # everything that can refuse the config happens before the first timed run
    torch.manual_seed(rc.train.seed)
    model = Transformer(rc.model).to(device)
    subjects: list[M.Subject] = [M.MinimoeSubject(model, rc, device)]
    if against == "hf":
        from minimoe.bench.hf import hf_twin, max_logit_diff

        hf = hf_twin(model)
        probe = torch.randint(
            0, rc.model.vocab_size, (2, min(64, rc.model.max_position_embeddings)), device=device
        )
        result["logits_max_abs_diff"] = diff = max_logit_diff(model, hf, probe)
        if not diff < 1e-3:
            raise RuntimeError(f"the HF twin computes a different function (max logit difference {diff:.3g})")
        subjects.append(M.HFSubject(hf, rc, device))

    bandwidth = machine_bandwidth_gib_s(device, dtype)  # again at the end: the ceiling takes the higher
    result["matmul_peak_gflops"] = M.matmul_peak_gflops(device, dtype, settings.peak_size)
    if dtype != torch.float32:
        fp32 = M.matmul_peak_gflops(device, torch.float32, settings.peak_size)
        result["matmul_peak_fp32_gflops"] = fp32
        if result["matmul_peak_gflops"] < 0.5 * fp32 and on_note is not None:
            on_note(
                f"{rc.train.precision} matmuls run at {result['matmul_peak_gflops']:.1f} GFLOP/s here against "
                f"{fp32:.1f} in fp32 (no {rc.train.precision} arithmetic in hardware); expect every "
                "measurement to be slower than fp32"
            )
    step("matmul peak")
    rates: dict[str, list[float]] = {}  # tokens/s of every repeat, by measurement
    for key, values in M.run_bench(subjects, rc, device, settings, on_step=step):
        rates.update({k: values.pop(k) for k in [k for k in values if k.endswith("_rates")]})
        result.update(values)
        if against:  # the ratio of every repeat (the sides took turns in it), their median and spread
            theirs = rates[f"hf_{M.baseline_key(key)}_rates"]
            add_ratio(result, f"{key}_ratio", per_round(rates[f"{key}_rates"], theirs))
    add_decode_ceiling(result, rc, device, dtype, (bandwidth,))
    result["mfu"] = M.mfu(rc, result["train_tok_s"], result["matmul_peak_gflops"])
    if against:
        result["hf_mfu"] = M.mfu(rc, result["hf_train_tok_s"], result["matmul_peak_gflops"])
    published = M.published_peak_tflops(device)
    if published is not None:
        result["published_peak_tflops"] = published
        result["mfu_published"] = result["mfu"] * result["matmul_peak_gflops"] / (published * 1e3)
    return result


def machine_bandwidth_gib_s(device: torch.device, dtype: torch.dtype) -> float:
    """`matvec_bandwidth_gib_s` with every core, whatever thread count the caller holds: the ceiling is
    the machine's, not that of the thread count a decode ran at (on the 2-core host of BENCHMARKS.md one
    thread read about 30 GiB/s, two 33-52, moving with the load of other tenants)."""
    with num_threads(os.cpu_count() or 1) if device.type == "cpu" else contextlib.nullcontext():
        return M.matvec_bandwidth_gib_s(device, dtype)


def add_decode_ceiling(
    r: dict, rc: RunConfig, device: torch.device, dtype: torch.dtype, earlier: tuple[float, ...] = ()
) -> None:
    """Measure the machine's bandwidth here (`machine_bandwidth_gib_s`) and add the highest of it and
    the `earlier` measurements of the same run (the memory's speed moves with other tenants' load: the
    ceiling is the best it gave), the batch-1 decode ceiling that gives for `rc`, and
    `<decode at batch 1>_ceiling_fraction` (tokens/s over that ceiling) for every decode measurement at
    batch 1 already in `r`."""
    r["matvec_bandwidth_gib_s"] = max(machine_bandwidth_gib_s(device, dtype), *earlier)
    r["decode_ceiling_tok_s"] = M.decode_ceiling_tok_s(rc, r["matvec_bandwidth_gib_s"])
    for key in [k for k in r if k.startswith(("decode_b1", "hf_decode_b1")) and k.endswith("_tok_s")]:
        r[key.removesuffix("_tok_s") + "_ceiling_fraction"] = r[key] / r["decode_ceiling_tok_s"]


def format_table(r: dict, against: bool) -> str:
    """The result as a Markdown table: one row per measurement, ratios when compared."""
    policy = f", OMP_WAIT_POLICY={r['omp_wait_policy']}" if "omp_wait_policy" in r else ""
    lines = [
        f"{r['config']} on {r.get('gpu') or r['cpu']} ({r['device']}, {r['threads']} threads{policy}, {r['dtype']}), "
        f"torch {r['torch']}"
        + (f", transformers {r['transformers']}" if against and "transformers" in r else ""),
        f"matmul peak {r['matmul_peak_gflops']:.1f} GFLOP/s; training MFU {r['mfu']:.1%}"
        + (f" (hf {r['hf_mfu']:.1%})" if against else ""),
        "",
        "| measurement | minimoe tok/s | peak MiB |"
        + (" hf tok/s | hf peak MiB | minimoe / hf |" if against else ""),
        "|---|---:|---:|" + ("---:|---:|---:|" if against else ""),
    ]
    keys = [k[: -len("_tok_s")] for k in r if k.endswith("_tok_s") and f"peak_mem_{k[:-6]}_mib" in r]
    for k in keys:
        prompt = r.get(f"{M.baseline_key(k)}_prompt")  # a prompt cut to fit a short context
        row = f"| {k}{f' (prompt {prompt})' if prompt else ''} | {r[k + '_tok_s']:,.0f} | {r[f'peak_mem_{k}_mib']:,.0f} |"
        if against:
            h = M.baseline_key(k)
            ratio = f"{r[f'{k}_ratio']:.2f}x{spread(r, f'{k}_ratio')}"
            row += f" {r[f'hf_{h}_tok_s']:,.0f} | {r[f'hf_peak_mem_{h}_mib']:,.0f} | {ratio} |"
        lines.append(row)
    if against and any(k.endswith("_ratio_min") for k in r):
        lines.append(
            "\nminimoe / hf: the median of the ratios of the rounds in which the two sides took turns, with their "
            "min-max and, from 3 rounds, the 95% interval of their geometric mean"
        )
    if "decode_ceiling_tok_s" in r:
        fracs = ", ".join(
            f"{k.removesuffix('_ceiling_fraction')} {v:.0%}"
            for k, v in r.items()
            if k.endswith("_ceiling_fraction")
        )
        lines += [
            "",
            f"batch-1 decode ceiling {r['decode_ceiling_tok_s']:,.0f} tok/s (activated weights read once per token "
            f"at the measured {r['matvec_bandwidth_gib_s']:.1f} GiB/s); reached: {fracs}",
        ]
    compiles = {k.removesuffix("_compile_s"): v for k, v in r.items() if k.endswith("_compile_s")}
    if compiles:
        lines.append("compile seconds (first call, not in tok/s): "
                     + ", ".join(f"{k} {v:.1f}" for k, v in compiles.items()))  # fmt: skip
    return "\n".join(lines)
