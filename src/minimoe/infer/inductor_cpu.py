"""torch.compile's inductor backend for the CPU decode step (`minimoe.infer.static`): inductor with its
C++ wrapper, and matrix products of up to eight rows generated as reductions over the weight's rows
instead of BLAS calls (`few_row_mm`, handed to inductor as a decomposition by `cpu_inductor`).

Shape suffixes: M rows, K the reduced dimension, N output columns.
"""

from __future__ import annotations

import functools
import threading
import unittest.mock

import torch

# Inductor hands every matrix product on the CPU to the BLAS (MKL). At one to eight rows MKL streams the
# weight at 5-10 GiB/s on the 2-core AMD EPYC of BENCHMARKS.md, with one thread or two, where the same
# product written as a product-and-sum over the weight's rows, a reduction inductor generates and fuses
# itself, streams 16-21 GiB/s on one thread and 25-33 on two at one row. Several rows are written as one
# such reduction per row over the same weight: inductor fuses them into one loop, parallel over the
# weight's rows, that reads each weight row once and keeps an accumulator per input row. (The first
# version wrote several rows as one reduction over a (N, M, K) product; inductor then vectorised it over
# the M rows, read the weight one element at a time and opened a parallel region per output, which made
# the compiled step at batch 8 0.50-0.76x as fast as with BLAS calls.) Up to 8 rows: batch 8 and the
# speculative step's two-token verify (`benchmarks/matvec.py`, BENCHMARKS.md).
FEW_ROWS = 8


def _few(a: torch.Tensor, b: torch.Tensor, rows: int) -> bool:
    """Whether a (M, K) @ b (K, N) is one to `rows` rows on the CPU times the transpose of a weight whose
    rows are contiguous (the product `F.linear` makes), which the reduction reads row by row. M must be
    a number fixed by the graph: a reduction per row would pin a dynamic row count to one value."""
    m = a.shape[0]
    fixed = isinstance(m, int) and 0 < m <= rows
    return fixed and a.device.type == "cpu" and a.dtype.is_floating_point and b.stride(0) == 1


def few_row_mm(
    a: torch.Tensor, b: torch.Tensor, *, rows: int = FEW_ROWS, otherwise=None, **kwargs
) -> torch.Tensor:
    """aten.mm(a (M, K), b (K, N)) for inductor's decomposition table: where `_few`, a product-and-sum
    over the rows of the weight b is the transpose of, accumulated in fp32 (or wider); else `otherwise`
    (by default inductor's own decomposition, which leaves most products to the BLAS)."""
    if kwargs or not _few(a, b, rows):
        return (otherwise or _inductor_decomposition(torch.ops.aten.mm.default))(a, b, **kwargs)
    acc = torch.promote_types(a.dtype, torch.float32)
    w_NK = b.t().to(acc)
    rows_N = [(w_NK * a[m].to(acc)).sum(-1) for m in range(a.shape[0])]
    return torch.stack(rows_N).to(a.dtype)  # (M, N)


def _few_row_addmm(bias, a, b, *, beta=1, alpha=1, rows: int = FEW_ROWS, otherwise=None, **kwargs):
    """aten.addmm (a linear layer with a bias) through `few_row_mm` where `_few`; else `otherwise`."""
    if kwargs or not _few(a, b, rows):
        addmm = otherwise or _inductor_decomposition(torch.ops.aten.addmm.default)
        return addmm(bias, a, b, beta=beta, alpha=alpha, **kwargs)
    return beta * bias + alpha * few_row_mm(a, b, rows=rows)


def _inductor_decomposition(op):
    """Inductor's own decomposition of `op` (which answers NotImplemented where it has none)."""
    from torch._inductor.decomposition import select_decomp_table

    return select_decomp_table()[op]


_DECOMPOSING = threading.Lock()


def cpu_inductor(gm, example_inputs, few_rows: int = FEW_ROWS):
    """A torch.compile backend: inductor with its C++ wrapper (the kernels called without a Python
    line each) and matrix products of up to `few_rows` rows generated as reductions (`few_row_mm`;
    0: none)."""
    from torch._inductor import decomposition
    from torch._inductor.compile_fx import compile_fx

    patches = {"cpp_wrapper": True}
    if not few_rows:
        return compile_fx(gm, example_inputs, config_patches=patches)
    # The decompositions go into inductor's own table for the length of this call, not through
    # compile_fx's `decompositions`: a table passed in is pickled into the key of inductor's cache of
    # generated code, and some of its entries cannot be, so every compile would start from nothing
    # (17-20 s instead of 5 for the reference config's batch-1 step with the cache warm). AOTAutograd's
    # cache keys neither, and would hand this call a graph compiled without them (or keep this one
    # for a plain compile): it is off for this call. Inductor's cache keys the decomposed graph.
    mm, addmm = torch.ops.aten.mm.default, torch.ops.aten.addmm.default
    with _DECOMPOSING:
        table = decomposition.select_decomp_table()  # the dict compile_fx will ask for (cached by inductor)
        ours = {
            mm: functools.partial(few_row_mm, rows=few_rows, otherwise=table[mm]),
            addmm: functools.partial(_few_row_addmm, rows=few_rows, otherwise=table[addmm]),
        }
        with (
            unittest.mock.patch.dict(table, ours),
            torch._functorch.config.patch(enable_autograd_cache=False),
        ):
            return compile_fx(gm, example_inputs, config_patches=patches)
