"""`minimoe bench`: training, prefill and decode speed, peak memory and MFU of one config, optionally
side by side with its Hugging Face twin, every number taken in the same process run.

Each measurement runs once to warm up, then `repeats` times with the subjects (minimoe, hf) taking
turns within every repeat, and keeps each side's median and its rate of every repeat: a ratio is taken
within each repeat (`minimoe.bench.ratios`), where a burst of load from another process hits both alike,
and reported as the median over repeats with its spread. MFU is training FLOPs per token
(`minimoe.lab.flops`, the 6N + attention count) times tokens/s over the matmul peak that the same
run measures first on the same device, dtype and thread count.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from minimoe.bench.machine import PeakMemory, largest_cache_bytes, machine_info  # noqa: F401 (re-exported)
from minimoe.config import RunConfig
from minimoe.errors import MinimoeError
from minimoe.infer.generate import stream_batch
from minimoe.infer.sampling import SamplingParams
from minimoe.infer.slots import SlotPool
from minimoe.infer.static import StaticDecode, static_greedy
from minimoe.lab.flops import flops_per_token
from minimoe.train.balance import balance_step
from minimoe.train.optim import build_optimizer
from minimoe.train.precision import autocast_context

GREEDY = SamplingParams(temperature=0.0)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def bench_config(preset: str | None, config: str | None, overrides: list[str]) -> RunConfig:
    """The run config a benchmark measures. train.precision=auto (the trainer's choice for its host) is
    measured as fp32, the dtype both sides of a comparison share; a named precision is kept."""
    from minimoe.config_yaml import build_run_config

    rc = build_run_config(preset, config, overrides)
    if rc.train.precision == "auto":
        rc.train.precision = "fp32"
    return rc


# (batch, prompt) of the decode measurements; every one generates `new_tokens` greedy tokens
DECODE_SHAPES = {
    "decode_b1": (1, 32),
    "decode_b8": (8, 32),
    "decode_b1_p512": (1, 512),
    "decode_b8_p512": (8, 512),
}
# published dense bf16 tensor-core peaks (TFLOP/s), for GPU MFU next to the measured one
# (the first name the device's contains: the PCIe and NVL H100s before the SXM one; the T4 has no bf16
# tensor cores, so none is given)
PUBLISHED_BF16_TFLOPS = {
    "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10G": 70.0,
}  # fmt: skip


@dataclass
class BenchSettings:
    repeats: int = 5
    new_tokens: int = 64
    prefill_shape: tuple[int, int] = (8, 512)
    peak_size: int = 1024  # matmul peak: square matrices of this side
    decode_shapes: dict[str, tuple[int, int]] = field(default_factory=lambda: dict(DECODE_SHAPES))
    # also time minimoe's compiled fixed-shape decode step (`minimoe serve --compile`) at every decode
    # shape, as `<shape>_compiled`; its ratio is taken against the other side's plain decode, the two
    # taking turns within every repeat
    compiled_decode: bool = False
    compile_backend: str = "inductor"  # "eager" only traces (tests)
    # the measurements to run (the fair bench runs each group at a setting of its own): "compute" training
    # and prefill; "decode" and "batched" the plain decode of one sequence and of several; "compiled" and
    # "compiled_batched" the same through the compiled step (with compiled_decode)
    groups: tuple[str, ...] = ("compute", "decode", "batched", "compiled", "compiled_batched")

    @classmethod
    def quick(cls) -> BenchSettings:
        return cls(repeats=3, new_tokens=32, prefill_shape=(4, 256))


def check_context(rc: RunConfig, settings: BenchSettings) -> None:
    """Refuse a context with no room for a prompt before the new tokens every decode measurement
    generates (a longer prompt is cut to fit, `run_bench`), before anything is timed."""
    max_len, new = rc.model.max_position_embeddings, settings.new_tokens
    if settings.decode_shapes and max_len <= new:
        raise MinimoeError(
            f"model.max_position_embeddings ({max_len}) leaves no room for a prompt before the {new} new "
            f"tokens of the decode measurements: it must be at least {new + 1}"
        )


# ------------------------------------------------------------------------------------- hardware


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_rate(fn: Callable[[], object], work: float, repeats: int, device: torch.device) -> float:
    """`work` units per second of `fn()`: the best of `repeats` timed batches, each long enough
    (>= ~0.2 s) to hide the timer."""
    fn()
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    n = max(1, int(0.2 / max(time.perf_counter() - t0, 1e-6)))
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        _sync(device)
        best = max(best, n * work / (time.perf_counter() - t0))
    return best


def matmul_peak_gflops(device: torch.device, dtype: torch.dtype, size: int = 1024, repeats: int = 5) -> float:
    """Sustained GFLOP/s of a square (size x size) matmul through `F.linear`, the call every model layer
    makes.

    (`F.linear`, not `a @ b`: on a CPU without bf16 hardware, torch 2.13's bf16 `mm` takes a path
    20x slower than the one `linear` takes, measured 0.9 against 19.9 GFLOP/s at size 1024.)"""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    return _best_rate(lambda: F.linear(a, b), 2.0 * size**3, repeats, device) / 1e9


def matvec_bandwidth_gib_s(
    device: torch.device, dtype: torch.dtype, mib: int | None = None, repeats: int = 5
) -> float:
    """GiB/s that a weight far larger than the caches is read at, the faster of a one-row `F.linear`
    through it (decoding's access pattern at batch 1, where every activated weight is read once per
    token) and a sum over its rows (a plain read). The BLAS's matrix-vector product can stream well
    below the memory's read rate (MKL on the 2-core AMD EPYC of BENCHMARKS.md: about 16 against 33
    GiB/s), and minimoe's compiled CPU step reads at more than the BLAS does (`infer.inductor_cpu.few_row_mm`),
    so the ceiling is the read rate wherever that is higher.

    The weight is `mib` MiB, by default eight times the largest cache and at least 64: a weight twice
    the size of a 32 MiB L3 was partly read from it (two threads: 48 to 90 GiB/s from run to run on one
    host, against a steady 50-52 at 256 MiB and more)."""
    if mib is None:
        mib = max(64, 8 * largest_cache_bytes(device) // 2**20)
    k = 4096
    w = torch.full((mib * 2**20 // (k * torch.finfo(dtype).bits // 8), k), 0.01, device=device, dtype=dtype)
    x = torch.randn(1, k, device=device, dtype=dtype)
    linear = _best_rate(lambda: F.linear(x, w), w.nbytes, repeats, device)
    return max(linear, _best_rate(lambda: w.sum(-1), w.nbytes, repeats, device)) / 2**30


def decode_ceiling_tok_s(rc: RunConfig, bandwidth_gib_s: float) -> float:
    """Batch-1 decode tokens/s if reading the activated weights once per token were the only cost:
    the bandwidth over the bytes of the parameters a token passes through (`minimoe.params`'s
    activated count, LM head included, embedding lookup and MTP modules not)."""
    from minimoe.params import count_params

    itemsize = torch.finfo(DTYPES[rc.train.precision]).bits // 8
    return bandwidth_gib_s * 2**30 / (count_params(rc.model).activated * itemsize)


# ------------------------------------------------------------------------------------- subjects


class Subject:
    """One model under test: a training step, a prefill and a greedy decode, each returning the
    number of tokens it processed."""

    name = ""

    def __init__(self, model, rc: RunConfig, device: torch.device):
        self.model, self.rc, self.device = model, rc, device
        # the trainer's AdamW for both sides, whatever the preset's recipe (Muon's split of the parameters
        # knows minimoe's modules only)
        self.optimizer = build_optimizer(model, replace(rc.train, optimizer="adamw"), device)
        for g in self.optimizer.param_groups:
            g["lr"] = 1e-5  # tiny steps: the weights stay close to where the logits were checked

    def autocast(self):
        return autocast_context(self.rc.train.precision, self.device)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> int:
        self.model.train()
        with self.autocast():
            loss = self.loss(x, y)
        loss.backward()
        if self.rc.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.rc.train.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.after_step()
        return x.numel()

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def after_step(self) -> None:
        pass

    @torch.no_grad()
    def prefill(self, x: torch.Tensor) -> int:
        raise NotImplementedError

    @torch.no_grad()
    def decode(self, prompts: torch.Tensor, new_tokens: int) -> int:
        raise NotImplementedError


class MinimoeSubject(Subject):
    name = "minimoe"

    def __init__(self, model, rc: RunConfig, device: torch.device):
        super().__init__(model, rc, device)
        self.forward = torch.compile(model) if rc.train.compile else model
        self._loads: dict[int, torch.Tensor] = {}
        self.static: dict[tuple[int, int], StaticDecode] = {}  # (batch, positions) -> compiled step

    def loss(self, x, y):
        out = self.forward(x, targets=y, return_logits=False)
        self._loads = {i: s.load for i, s in out.moe_stats.items()}
        return out.loss

    def after_step(self) -> None:
        balance_step(self.model, self._loads)

    @torch.no_grad()
    def prefill(self, x):
        self.model.eval()
        cache = self.model.make_cache(x.shape[0], x.shape[1])
        with self.autocast():
            self.model(x, cache=cache, num_logits_to_keep=1)
        return x.numel()

    @torch.no_grad()
    def decode(self, prompts, new_tokens):
        self.model.eval()
        n = 0
        with self.autocast():
            for step in stream_batch(self.model, prompts.tolist(), new_tokens, GREEDY):
                n += sum(t is not None for t in step)
        return n

    @torch.no_grad()
    def decode_compiled(self, prompts: torch.Tensor, new_tokens: int, backend: str = "inductor") -> int:
        """`decode` through the compiled fixed-shape step (`minimoe.infer.static`), one compiled graph
        per (batch, prompt + new tokens) in `static`, built at the first call (its `compile_s` says how
        long that took)."""
        self.model.eval()
        key = (prompts.shape[0], prompts.shape[1] + new_tokens)
        if key not in self.static:
            # every prompt prefilled in one forward, as transformers' generate and the serving engine do
            pool = SlotPool(self.model, key[0], max_len=key[1], prefill_rows=key[0])
            self.static[key] = StaticDecode(pool, backend=backend)
            with self.autocast():
                self.static[key].warm_up()
        with self.autocast():
            return static_greedy(self.static[key], prompts.tolist(), new_tokens).numel()


class HFSubject(Subject):
    name = "hf"

    def loss(self, x, y):
        logits = self.model(input_ids=x, logits_to_keep=0).logits  # (B, T, V)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten())

    @torch.no_grad()
    def prefill(self, x):
        self.model.eval()
        with self.autocast():
            self.model(input_ids=x, use_cache=True, logits_to_keep=1)
        return x.numel()

    @torch.no_grad()
    def decode(self, prompts, new_tokens):
        self.model.eval()
        with self.autocast():
            out = self.model.generate(
                input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                max_new_tokens=new_tokens, min_new_tokens=new_tokens, use_cache=True,
            )  # fmt: skip
        return (out.shape[1] - prompts.shape[1]) * prompts.shape[0]


# ------------------------------------------------------------------------------------- the suite


def _median_rates(
    fns: dict[str, Callable[[], int]], repeats: int, device: torch.device, mem: dict[str, PeakMemory]
) -> dict[str, float]:
    """Median tokens/s per name of `_rates`."""
    return {k: statistics.median(v) for k, v in _rates(fns, repeats, device, mem).items()}


def _rates(
    fns: dict[str, Callable[[], int]], repeats: int, device: torch.device, mem: dict[str, PeakMemory]
) -> dict[str, list[float]]:
    """Warm each fn up once, then run them in turn `repeats` times (a, b, a, b, ...: repeat i of every fn
    is one round); tokens/s per name, one per repeat in order. The device is synchronised before the
    clock is read, so a GPU's queued kernels are timed, not only their launches."""
    for name, fn in fns.items():
        with mem[name]:
            fn()
    rates: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            with mem[name]:
                n = fn()
                _sync(device)
            rates[name].append(n / (time.perf_counter() - t0))
    return rates


def measurements(settings: BenchSettings) -> list[str]:
    """The measurements `run_bench` makes with these settings, in its order (the groups interleave)."""
    out = ["train", "prefill"] if "compute" in settings.groups else []
    for key, (b, _) in settings.decode_shapes.items():
        plain, compiled = decode_groups(b)
        out += [key] if plain in settings.groups else []
        out += [f"{key}_compiled"] if settings.compiled_decode and compiled in settings.groups else []
    return out


def decode_groups(batch: int) -> tuple[str, str]:
    """The measurement groups of a decode shape of `batch` sequences: (plain, compiled)."""
    return ("decode", "compiled") if batch == 1 else ("batched", "compiled_batched")


def baseline_key(key: str) -> str:
    """The other side's measurement a minimoe measurement is compared with (the plain decode for a
    compiled one: transformers runs its own default decode)."""
    return key.removesuffix("_compiled")


def run_bench(
    subjects: list[Subject], rc: RunConfig, device: torch.device, settings: BenchSettings, on_step=None
) -> Iterator[tuple[str, dict]]:
    """Measure every subject; yields (measurement, {key: value}) as each finishes.

    Keys are `{measurement}_tok_s` (the median over repeats) and `{measurement}_rates` (tokens/s of every
    repeat, in order) for minimoe and `hf_{measurement}_...` for the twin, plus `peak_mem_{measurement}_mib`
    (and the hf_ form); a compiled decode's keys come with the other side's plain decode of the same
    rounds. `on_step(measurement)` is called after every call.
    """
    gen = torch.Generator().manual_seed(0)
    V, tc = rc.model.vocab_size, rc.train
    max_len = rc.model.max_position_embeddings

    def tick(key: str, fn: Callable[[], int]) -> Callable[[], int]:
        def wrapped() -> int:
            n = fn()
            if on_step is not None:
                on_step(key)
            return n

        return wrapped

    def prefix(s: Subject) -> str:
        return "" if s.name == "minimoe" else f"{s.name}_"

    def timed(runs: list[tuple[Subject, str, Callable[[], int]]]) -> dict[str, dict]:
        """Time (subject, measurement, fn) runs in turns, one round per repeat; {name: its keys}, each with
        `<name>_rates`, its tokens/s per round, besides the median `<name>_tok_s`."""
        names = {f"{prefix(s)}{key}": (s, key, fn) for s, key, fn in runs}
        mem = {n: PeakMemory(device) for n in names}
        fns = {n: tick(key, fn) for n, (_, key, fn) in names.items()}
        rates = _rates(fns, settings.repeats, device, mem)
        return {
            n: {f"{n}_tok_s": statistics.median(rates[n]), f"{n}_rates": rates[n],
                f"{prefix(s)}peak_mem_{key}_mib": mem[n].mib}
            for n, (s, key, _) in names.items()
        }  # fmt: skip

    def measure(key: str, make: Callable[[Subject], Callable[[], int]]) -> tuple[str, dict]:
        out: dict = {}
        for values in timed([(s, key, make(s)) for s in subjects]).values():
            out.update(values)
        return key, out

    groups = settings.groups
    seq = torch.randint(0, V, (tc.batch_size, tc.seq_len + 1), generator=gen).to(device)
    x, y = seq[:, :-1], seq[:, 1:]
    if "compute" in groups:
        yield measure("train", lambda s: lambda: s.train_step(x, y))
    b, p = settings.prefill_shape
    pre = torch.randint(0, V, (b, min(p, max_len)), generator=gen).to(device)
    if "compute" in groups:
        yield measure("prefill", lambda s: lambda: s.prefill(pre))
    new = settings.new_tokens
    for key, (b, nominal) in settings.decode_shapes.items():
        p = min(nominal, max_len - new)  # a short context cuts the prompt: recorded below
        cut = {f"{key}_prompt": p} if p != nominal else {}
        prompts = torch.randint(0, V, (b, p), generator=gen).to(device)
        plain, compiled = decode_groups(b)
        with_compiled = settings.compiled_decode and compiled in groups
        ours = [s for s in subjects if isinstance(s, MinimoeSubject)]
        # the compiled decode takes turns with the plain ones in the same rounds: the other side's plain
        # decode is its ratio's denominator (timed for that alone where the plain group is not run)
        plains = (
            subjects if plain in groups else [s for s in subjects if s not in ours] if with_compiled else []
        )
        runs = [(s, key, lambda s=s, p=prompts: s.decode(p, new)) for s in plains]
        if with_compiled:
            compile_backend = settings.compile_backend
            runs += [(s, f"{key}_compiled", lambda s=s, p=prompts, c=compile_backend: s.decode_compiled(p, new, c))
                     for s in ours]  # fmt: skip
        if not runs:
            continue
        out = timed(runs)
        others = {k: v for s in plains if s not in ours for k, v in out[f"{prefix(s)}{key}"].items()}
        if plain in groups:
            yield key, {**{k: v for s in ours for k, v in out[key].items()}, **others, **cut}
        if with_compiled:
            values = {**out[f"{key}_compiled"], **others, **cut}
            values[f"{key}_compile_s"] = ours[0].static[(b, p + new)].compile_s
            yield f"{key}_compiled", values


def mfu(rc: RunConfig, train_tok_s: float, peak_gflops: float) -> float:
    """Model FLOPs utilisation: training FLOPs/s over the measured matmul peak."""
    per_token = flops_per_token(rc.model, rc.train.seq_len).train_per_token
    return train_tok_s * per_token / (peak_gflops * 1e9)


def published_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PUBLISHED_BF16_TFLOPS.items() if k in name), None)
