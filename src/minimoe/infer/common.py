"""What the decoders share (plain generation, beam search, speculative decoding, the serving engine):
the stats record, prompt fitting, per-row generators, padding masks and the decode thread choice."""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from minimoe.errors import MinimoeError


@dataclass
class GenerationStats:
    """What a generation cost. Fill one by passing it as `stats=`; several calls accumulate."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    forward_calls: int = 0
    cache_bytes_allocated: int = 0  # largest cache allocated (all layers, padding included)
    cache_bytes_used: int = 0  # largest part of it holding tokens
    drafted: int = 0  # speculative: tokens proposed by the MTP head
    accepted: int = 0  # ... and accepted by the main model

    @property
    def seconds(self) -> float:
        return self.prefill_s + self.decode_s

    @property
    def tokens_per_s(self) -> float:
        """New tokens per second of wall time, prefill included."""
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None

    def note_cache(self, cache) -> None:
        """Record the cache's allocated bytes and the bytes holding its `pos` tokens."""
        allocated = cache.nbytes()
        capacity = cache.layers[0].a.shape[1] if cache.layers else 1
        self.cache_bytes_allocated = max(self.cache_bytes_allocated, allocated)
        self.cache_bytes_used = max(self.cache_bytes_used, allocated * cache.pos // max(capacity, 1))


# Below this many FLOPs per decode step, CPU decoding under OMP_WAIT_POLICY=PASSIVE runs on one
# intra-op thread: a decoded token is ~100 tiny kernels per layer, and with passive waiting every
# parallel kernel first wakes the sleeping workers, which costs more than the extra cores save on
# memory-bound matrix-vector products (the measurement is in BENCHMARKS.md). About 20 ms of
# single-core work: past it, the cores pay off. Under a spinning policy (ACTIVE, or libgomp's default
# of spinning a while before sleeping) the workers are awake between kernels and every step keeps the
# caller's threads: measured equal at batch 1 and 1.2-1.4x faster at batch 32-64 on two cores.
SINGLE_THREAD_DECODE_FLOPS = 1e9


def passive_openmp() -> bool:
    """Whether this process's OpenMP workers sleep between parallel regions (OMP_WAIT_POLICY=PASSIVE),
    so that waking them costs more than a small kernel."""
    return os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE"


def release_openmp_threads() -> bool:
    """Let the calling thread's idle OpenMP workers go (libgomp's `omp_pause_resource_all`); True if it
    did. Call it from a thread that is about to hand all tensor work to another thread (the serving
    engine's worker): libgomp keeps one pool of workers per thread that ever ran a parallel region, and
    while the caller's pool stays parked, the other thread's workers count as oversubscribed and barely
    spin (or, under ACTIVE, the parked ones spin on a core forever): two-thread decode steps of a worker
    thread measured 1.5-2x slower than the same steps on the main thread until the pool was released.
    A later parallel region on the calling thread starts a new pool. Only libgomp (torch's CPU wheels
    on Linux) is handled; elsewhere it does nothing."""
    path = _loaded_libgomp()
    if path is None:
        return False
    try:
        lib = ctypes.CDLL(path)
        return lib.omp_pause_resource_all(2) == 0  # 2: omp_pause_hard
    except (OSError, AttributeError):
        return False


def _loaded_libgomp() -> str | None:
    """The path of the libgomp this process has loaded, from /proc/self/maps (Linux), else None;
    torch's own copy when there are several (the one its kernels run on)."""
    found = []
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            for line in f:
                path = line.split(maxsplit=5)[-1].strip()
                if "/libgomp" in path and ".so" in path and path not in found:
                    found.append(path)
    except OSError:
        return None
    return next((p for p in found if "/torch/" in p), found[0] if found else None)


def decode_flops(model, batch: int) -> float:
    """2 x activated matrix entries x rows: the FLOPs of one decode step (routed experts at top-k/E).

    The same count as `minimoe.lab.flops.matmul_params`, taken from the live parameters in well under
    a millisecond instead of building a meta-device model on every call."""
    cfg = model.cfg
    share = cfg.num_experts_per_tok / cfg.n_routed_experts if cfg.n_routed_experts else 1.0
    n = 0
    # remove_duplicate=False: a tied LM head is listed under its own name too, and it is a matmul
    for name, p in model.named_parameters(remove_duplicate=False):
        if name.startswith("mtp.") or "embed_tokens" in name:  # MTP heads do not run; lookups are free
            continue
        if p.dim() == 3:  # stacked routed experts
            n += p.numel() * share
        elif p.dim() == 2:
            n += p.numel()
    for name, m in model.named_modules():  # int8/int4 weights (`QuantTensor`): buffers, counted as the matrix
        q = getattr(m, "qweight", None)
        if q is not None and not name.startswith("mtp.") and "embed_tokens" not in name:
            entries = q[..., 0].numel() * m.in_features
            n += entries * share if q.dim() == 3 else entries
    return 2.0 * n * batch


def decode_thread_count(model, batch: int, threads: int) -> int:
    """The intra-op threads for one CPU decode step of `batch` rows, for a caller holding `threads`:
    one for a small step under passive OpenMP waiting (see SINGLE_THREAD_DECODE_FLOPS), else `threads`."""
    if (
        threads == 1
        or not passive_openmp()
        or model.embed_tokens.weight.device.type != "cpu"
        or decode_flops(model, batch) >= SINGLE_THREAD_DECODE_FLOPS
    ):
        return threads
    return 1


@contextlib.contextmanager
def num_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count set to n inside, the old count back on exit."""
    saved = torch.get_num_threads()
    if n == saved:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def decode_threads(model, batch: int):
    """A context for one decode step at `decode_thread_count` threads; the old count comes back on exit.

    Enter it around a single forward pass, never across a `yield`: the thread count is process-wide,
    and a caller's code must not run with it changed."""
    return num_threads(decode_thread_count(model, batch, torch.get_num_threads()))


def check_max_new_tokens(n: int) -> None:
    if n < 0:
        raise MinimoeError(f"max_new_tokens must be >= 0, got {n}")


def fit_prompt(ids: Sequence[int], max_len: int) -> list[int]:
    """Keep the last max_len - 1 tokens (room for at least one new token); an empty prompt becomes [0]."""
    return list(ids)[-(max_len - 1) :] or [0]


def make_generator(seed: int | None, device) -> torch.Generator:
    """A generator seeded with `seed` (a random seed when None); seeds outside the 64-bit range wrap.
    The random seed is the generator's own (`Generator.seed`): `torch.seed()` would reseed the
    process-wide generator too, and a caller's `torch.manual_seed` would no longer reproduce its run."""
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed % (1 << 64))
    return g


def make_generators(n: int, seed: int | None, device) -> list[torch.Generator]:
    """One generator per row, all seeded with `seed` (a random seed each when None)."""
    return [make_generator(seed, device) for _ in range(n)]


def left_pad(prompts: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, L) ids left-padded with 0 and the (B, L) mask (None when no row needs padding)."""
    L = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), L, dtype=torch.long)
    mask = torch.zeros(len(prompts), L, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, L - len(p) :] = torch.tensor(p)
        mask[i, L - len(p) :] = True
    if bool(mask.all()):
        return ids.to(device), None
    return ids.to(device), mask.to(device)


def seen_mask(prompts: list[list[int]], vocab: int, device) -> torch.Tensor:
    """(B, V) bool: which tokens each prompt contains (for the repetition penalty)."""
    seen = torch.zeros(len(prompts), vocab, dtype=torch.bool)
    for i, p in enumerate(prompts):
        seen[i, torch.tensor(p, dtype=torch.long)] = True
    return seen.to(device)
