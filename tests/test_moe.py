"""MoE layer: router math, dispatch kernels against the per-token reference, capacity, balancing."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from minimoe.config import ModelConfig
from minimoe.errors import ConfigError
from minimoe.model.compiled_experts import compiled_training_experts, gathered_experts
from minimoe.model.expert_kernels import FUSE_GATE_UP_BELOW, grouped_mm_experts, loop_experts
from minimoe.model.experts import MLP, GroupedExperts, choose_kernel, grouped_mm_works, resolve_impl
from minimoe.model.moe import MoE, capacity_keep, expert_capacity, max_vio
from minimoe.model.router import (
    Router,
    bias_update,
    group_limited_topk,
    load_balance_loss,
    router_z_loss,
    seq_load_balance_loss,
)
from reference import brute_force_group_topk, moe_reference


def make_cfg(**kw) -> ModelConfig:
    base = dict(
        hidden_size=16,
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=8,
        n_shared_experts=1,
        scoring_func="sigmoid",
        moe_impl="loop",
        initializer_range=0.3,
    )
    base.update(kw)
    return ModelConfig(**base).validate()


def make_moe(dtype=torch.float64, seed=0, **kw) -> MoE:
    torch.manual_seed(seed)
    moe = MoE(make_cfg(**kw)).to(dtype)
    with torch.no_grad():
        moe.gate.weight.normal_(0.0, 1.0)  # well separated scores: no near-ties between fast and slow path
        if moe.gate.e_score_correction_bias is not None:
            moe.gate.e_score_correction_bias.normal_(0.0, 0.3)
    return moe


def grads(module: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    out = {"x": x.grad.clone()}
    out.update({n: p.grad.clone() for n, p in module.named_parameters()})
    return out


def run_both(moe: MoE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict, dict]:
    g = torch.randn_like(x)
    x1 = x.clone().requires_grad_()
    y, _ = moe(x1)
    (y * g).sum().backward()
    g_fast = grads(moe, x1)
    moe.zero_grad()
    x2 = x.clone().requires_grad_()
    y_ref = moe_reference(moe, x2)
    (y_ref * g).sum().backward()
    return y, y_ref, g_fast, grads(moe, x2)


# ------------------------------------------------------------------------------- dispatch vs reference

ROUTINGS = {
    "v3-sigmoid-groups": dict(
        scoring_func="sigmoid", n_group=4, topk_group=2, routed_scaling_factor=2.5, aux_free_bias=True
    ),
    "v2-softmax-gelu": dict(
        scoring_func="softmax",
        n_group=4,
        topk_group=2,
        norm_topk_prob=False,
        aux_free_bias=False,
        expert_act="gelu",
        n_shared_experts=2,
    ),
}


@pytest.mark.parametrize("routing", list(ROUTINGS))
def test_loop_dispatch_matches_reference_fp64(routing):
    moe = make_moe(torch.float64, **ROUTINGS[routing])
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    y, y_ref, g, g_ref = run_both(moe, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    assert g.keys() == g_ref.keys()
    for name in g:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("multiple", [1, 3, 64])
@pytest.mark.parametrize("k", [1, 3])
def test_padded_dispatch_matches_reference_fp64(monkeypatch, multiple, k):
    """Each expert's rows padded to a multiple of `multiple` (what CPU bf16 does with 64), with 1 and 3
    experts per token: pad rows (token 0, gate weight 0) change no output and no gradient."""
    from minimoe.model import moe as moe_lib

    monkeypatch.setattr(moe_lib, "pad_multiple", lambda *args: multiple)
    seen = []
    real = GroupedExperts.forward
    monkeypatch.setattr(
        GroupedExperts, "forward", lambda self, x, c, w=None: seen.append(c.tolist()) or real(self, x, c, w)
    )
    moe = make_moe(torch.float64, num_experts_per_tok=k, **ROUTINGS["v3-sigmoid-groups"])
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    y, y_ref, g, g_ref = run_both(moe, x)
    assert all(c % multiple == 0 for c in seen[0]) and sum(seen[0]) >= 18 * k
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for name in g:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("routing", list(ROUTINGS))
def test_grouped_mm_dispatch_matches_reference_fp32(routing):
    # grouped_mm has no fp64 kernel, so this runs in fp32 with fp32 tolerances
    if not grouped_mm_works("cpu", torch.float32, True, True):
        pytest.skip("torch._grouped_mm does not work on this CPU build")
    moe = make_moe(torch.float32, moe_impl="grouped_mm", **ROUTINGS[routing])
    x = torch.randn(3, 8, 16)
    assert resolve_impl("grouped_mm", x.view(-1, 16), 16, 8) == "grouped_mm"
    y, y_ref, g, g_ref = run_both(moe, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for name in g:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("routing", list(ROUTINGS))
def test_decode_kernel_matches_reference_fp64(routing):
    # a few tokens under no_grad on CPU take the decode choice (the loop over non-empty experts)
    moe = make_moe(torch.float64, moe_impl="auto", **ROUTINGS[routing]).eval()
    tokens = max(1, moe.n_experts // moe.top_k)
    x = torch.randn(1, tokens, 16, dtype=torch.float64)
    rows = torch.zeros(tokens * moe.top_k, 16)  # fp32: grouped_mm has no fp64 kernel
    if grouped_mm_works("cpu", torch.float32, True, True):
        assert choose_kernel("auto", rows, moe.n_experts, 16, 8) is grouped_mm_experts  # grad is on
    with torch.no_grad():
        assert choose_kernel("auto", rows, moe.n_experts, 16, 8) is loop_experts
        y, stats = moe(x)
    y_ref = moe_reference(moe, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    assert stats.load.sum() == tokens * moe.top_k


@pytest.mark.parametrize("inter", [8, FUSE_GATE_UP_BELOW])  # fused and separate gate/up GEMMs
def test_kernels_agree_on_empty_experts_and_stride0_grad(inter):
    torch.manual_seed(0)
    counts = torch.tensor([5, 0, 3, 0, 8])
    x = torch.randn(16, 16)
    ws = [torch.randn(5, inter, 16), torch.randn(5, inter, 16), torch.randn(5, 16, inter)]
    results = []
    for kernel in (grouped_mm_experts, loop_experts):
        leaves = [t.clone().requires_grad_() for t in [x, *ws]]
        y = kernel(leaves[0], counts, *leaves[1:])
        y.sum().backward()  # a stride-0 gradient, which grouped_mm's own backward rejects
        results.append([y, *(t.grad for t in leaves)])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gate, scale", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("counts", [[5, 0, 3, 0, 8], [0, 0, 2, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 4]])
def test_gathered_experts_equal_the_loop_fp64(gate, scale, counts):
    # the compiled decode kernel, run eagerly: each row must meet its own expert, including after
    # empty experts at the start, in the middle and at the end (SwiGLU and GELU, with and without scales)
    g = torch.Generator().manual_seed(sum(counts))
    counts_E = torch.tensor(counts)
    N, E = sum(counts), len(counts)
    x = torch.randn(N, 16, dtype=torch.float64, generator=g)
    gate_EID = torch.randn(E, 8, 16, dtype=torch.float64, generator=g) if gate else None
    up_EID = torch.randn(E, 8, 16, dtype=torch.float64, generator=g)
    down_EDI = torch.randn(E, 16, 8, dtype=torch.float64, generator=g)
    scale_N = torch.rand(N, dtype=torch.float64, generator=g) if scale else None
    want = loop_experts(x, counts_E, gate_EID, up_EID, down_EDI, scale_N)
    got = gathered_experts(x, counts_E, gate_EID, up_EID, down_EDI, scale_N)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_gathered_experts_compute_in_the_autocast_dtype():
    """Under bf16 autocast (the CUDA decode step's serving precision) the gathered kernel casts rows and
    weights to bf16 as autocast's matmuls would: its output is bf16 and equals the loop's under the
    same autocast to bf16 precision (the two round differently: whole tensors are compared)."""
    g = torch.Generator().manual_seed(6)
    counts_E = torch.tensor([2, 0, 3, 1])
    x = torch.randn(6, 16, generator=g)
    ws = [
        torch.randn(4, 8, 16, generator=g),
        torch.randn(4, 8, 16, generator=g),
        torch.randn(4, 16, 8, generator=g),
    ]
    scale_N = torch.rand(6, generator=g)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = loop_experts(x, counts_E, *ws, scale_N)
        got = gathered_experts(x, counts_E, *ws, scale_N)
    assert want.dtype == got.dtype == torch.bfloat16
    assert (got.float() - want.float()).norm() <= 1e-2 * want.float().norm()


def test_compiled_decode_kernel_choice(monkeypatch):
    # traced without gradients: up to 8 rows per expert and 64 in all take gathered_experts, more the
    # opaque operator; under autocast the operator too (gathered would compute in the weights' dtype)
    from minimoe.model.compiled_experts import selected_experts

    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with torch.no_grad():
        for E, fits in ((4, 32), (8, 64), (32, 64)):
            assert choose_kernel("auto", torch.zeros(fits, 16), E, 16, 8) is gathered_experts
            assert choose_kernel("auto", torch.zeros(fits + 1, 16), E, 16, 8) is selected_experts
            # the MoE layer hands the same pairs to `GroupedExperts.pairs` unsorted (T tokens x K = 2)
            assert GroupedExperts(E, 16, 8).takes_pairs(torch.zeros(fits // 2, 16), 2)
            assert not GroupedExperts(E, 16, 8).takes_pairs(torch.zeros(fits // 2 + 1, 16), 2)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert choose_kernel("auto", torch.zeros(2, 16), 8, 16, 8) is selected_experts
            assert not GroupedExperts(8, 16, 8).takes_pairs(torch.zeros(1, 16), 2)
    with torch.enable_grad():
        assert not GroupedExperts(8, 16, 8).takes_pairs(torch.zeros(1, 16), 2)


def test_experts_handle_no_rows():
    experts = GroupedExperts(4, 16, 8)
    x = torch.zeros(0, 16, requires_grad=True)
    y = experts(x, torch.zeros(4, dtype=torch.long))
    assert y.shape == (0, 16)
    y.sum().backward()


@pytest.mark.parametrize("seed", [0, 1])
def test_bf16_expert_rows_are_summed_in_fp32(seed):
    """Under CPU bf16 autocast the experts return bf16 rows (already times their gate weights); the layer
    sums each token's K rows in fp32, as HF does, not in bf16: its output is the fp64 sum of the very rows
    the experts returned to fp32 precision, far below the bf16 rounding of a bf16 sum (2^-9)."""
    from minimoe.model.dispatch import expert_rows
    from minimoe.model.experts import pad_multiple

    moe = make_moe(torch.float32, seed=seed, num_experts_per_tok=6, n_shared_experts=0)
    seen = {}
    moe.gate.register_forward_hook(lambda m, args, out: seen.__setitem__("route", out))
    moe.experts.register_forward_hook(lambda m, args, out: seen.__setitem__("rows", out))
    x = torch.randn(2, 20, 16, generator=torch.Generator().manual_seed(seed))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = moe(x)
    r, y_PD = seen["route"], seen["rows"]
    assert y.dtype == torch.float32 and y_PD.dtype == torch.bfloat16
    multiple = pad_multiple(y_PD, 40 * 6, moe.n_experts)
    rows = expert_rows(r.topk_idx, r.counts, multiple)
    assert rows.token_P.shape[0] == y_PD.shape[0]
    want = sum(y_PD.double().index_select(0, rows.slot_TK[:, k]) for k in range(6)).view(2, 20, 16)
    err = (y.double() - want).abs().max() / want.abs().max()
    assert err < 1e-6, err.item()


def test_a_bf16_layer_sums_its_expert_rows_in_fp32_without_autocast():
    """A layer whose weights are bf16 (model.to(torch.bfloat16), no autocast) sums each token's K expert
    rows in fp32 and rounds once, as HF does: its bf16 output is the fp64 sum of the rows the experts
    returned, rounded to bf16, in all but a few elements (double rounding); a bf16 sum differs in most."""
    from minimoe.model.dispatch import expert_rows
    from minimoe.model.experts import pad_multiple

    moe = make_moe(torch.bfloat16, seed=0, num_experts_per_tok=6, n_shared_experts=0)
    seen = {}
    moe.gate.register_forward_hook(lambda m, args, out: seen.__setitem__("route", out))
    moe.experts.register_forward_hook(lambda m, args, out: seen.__setitem__("rows", out))
    x = torch.randn(2, 20, 16, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    y, _ = moe(x)
    r, y_PD = seen["route"], seen["rows"]
    assert y.dtype == y_PD.dtype == torch.bfloat16
    rows = expert_rows(r.topk_idx, r.counts, pad_multiple(y_PD, 40 * 6, moe.n_experts))
    want = sum(y_PD.double().index_select(0, rows.slot_TK[:, k]) for k in range(6)).view(2, 20, 16)
    assert (y != want.to(torch.bfloat16)).float().mean() < 0.02


def test_expert_rows_pad_each_expert_to_the_next_multiple_only():
    """Padded rows, by hand: each expert's pairs in token order, then pad rows (token 0, gate weight
    0) up to the next multiple of 2; an expert already at a multiple, or with no pairs, gets none."""
    from minimoe.model.dispatch import expert_rows, row_weights

    idx = torch.tensor([[1, 2], [1, 3], [1, 2], [3, 2]])  # experts 1 and 2: 3 pairs, 3: 2, 0 and 4: none
    rows = expert_rows(idx, torch.bincount(idx.reshape(-1), minlength=5), multiple=2)
    assert rows.counts_E.tolist() == [0, 4, 4, 2, 0]
    assert rows.token_P.tolist() == [0, 1, 2, 0, 0, 2, 3, 0, 1, 3]
    assert rows.slot_TK.tolist() == [[0, 4], [1, 8], [2, 5], [9, 6]]
    weights = row_weights(torch.arange(1.0, 9.0).view(4, 2), rows)
    assert weights.tolist() == [1, 3, 5, 0, 2, 6, 8, 0, 4, 7]


# ------------------------------------------------------------------------------- group-limited top-k


@pytest.mark.parametrize("topk_method", ["noaux_tc", "group_limited_greedy", "greedy"])
@pytest.mark.parametrize("n_group,topk_group,k", [(4, 2, 3), (4, 1, 2), (8, 3, 4), (1, 1, 4)])
def test_group_limited_topk_matches_brute_force(topk_method, n_group, topk_group, k):
    torch.manual_seed(1)
    # shift negative: with biased scores below 0, a 0.0 mask (older DeepSeek/HF code) would pick experts
    # of dropped groups
    choice = torch.rand(64, 16, dtype=torch.float64) - 0.7
    idx = group_limited_topk(choice, k, n_group, topk_group, topk_method)
    for t in range(choice.shape[0]):
        expected = brute_force_group_topk(choice[t].tolist(), k, n_group, topk_group, topk_method)
        assert idx[t].tolist() == expected


# ------------------------------------------------------------------------------- invariants


def test_one_expert_top1_equals_dense_swiglu():
    """megablocks dmoe_test: 1 expert, top-1, no shared expert, softmax == the dense FFN."""
    moe = make_moe(
        n_routed_experts=1,
        num_experts_per_tok=1,
        n_shared_experts=0,
        scoring_func="softmax",
        aux_free_bias=False,
    )
    mlp = MLP(16, 8).to(torch.float64)
    with torch.no_grad():
        mlp.gate_proj.weight.copy_(moe.experts.gate_proj[0])
        mlp.up_proj.weight.copy_(moe.experts.up_proj[0])
        mlp.down_proj.weight.copy_(moe.experts.down_proj[0])
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    y, _ = moe(x)
    torch.testing.assert_close(y, mlp(x), rtol=1e-12, atol=1e-12)


def test_huge_capacity_equals_dropless():
    x = torch.randn(2, 10, 16, dtype=torch.float64)
    dropless = make_moe(capacity_factor=None)
    capped = make_moe(capacity_factor=100.0)
    capped.load_state_dict(dropless.state_dict())
    y0, s0 = dropless(x)
    y1, s1 = capped(x)
    assert s1.dropped.item() == 0 and s0.dropped.item() == 0
    torch.testing.assert_close(y0, y1, rtol=0, atol=0)


@pytest.mark.parametrize("k", [1, 2])
def test_capacity_drops_exactly_the_overflow(k):
    # selection-only bias of 100 on the first k experts sends every token there
    moe = make_moe(n_routed_experts=4, num_experts_per_tok=k, n_shared_experts=0, capacity_factor=1.0)
    with torch.no_grad():
        moe.gate.e_score_correction_bias.zero_()[:k] = 100.0
    x = torch.randn(2, 5, 16, dtype=torch.float64)  # T = 10 tokens
    capacity = expert_capacity(1.0, 10, k, 4)
    assert capacity == math.ceil(10 * k / 4)
    y, stats = moe(x)
    assert stats.load[:k].tolist() == [10.0] * k and stats.load[k:].sum() == 0
    assert stats.dropped.item() == k * (10 - capacity)
    moe.capacity_factor = None
    y_full, _ = moe(x)
    y, y_full = y.view(10, 16), y_full.view(10, 16)
    # first come, first served (not bit-equal: the expert matmul sees fewer rows)
    torch.testing.assert_close(y[:capacity], y_full[:capacity], rtol=1e-12, atol=1e-12)
    assert (y[capacity:] == 0).all()


@pytest.mark.parametrize("k", [1, 2, 3])
def test_capacity_path_matches_the_reference_with_gradients(k):
    """With a capacity that drops pairs, output and every gradient (input, experts, shared expert, and the
    router's through the kept pairs' gate weights) equal a per-token loop in which each expert serves
    its first `capacity` pairs in token order."""
    moe = make_moe(num_experts_per_tok=k, n_routed_experts=4, capacity_factor=0.6, routed_scaling_factor=2.5)
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    _, stats = moe(x)
    assert stats.dropped.item() > 0
    capacity = expert_capacity(0.6, 18, k, 4)
    g = torch.randn_like(x)
    out = []
    for forward in (lambda x: moe(x)[0], lambda x: moe_reference(moe, x, capacity)):
        moe.zero_grad()
        x1 = x.clone().requires_grad_()
        y = forward(x1)
        (y * g).sum().backward()
        out.append((y, grads(moe, x1)))
    (y, g_fast), (y_ref, g_ref) = out
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    assert g_fast.keys() == g_ref.keys() and g_fast["gate.weight"].abs().sum() > 0
    for name in g_fast:
        torch.testing.assert_close(g_fast[name], g_ref[name], rtol=1e-10, atol=1e-12, msg=name)


def test_capacity_keep_matches_python_loop():
    torch.manual_seed(2)
    E, capacity = 5, 3
    expert_N = torch.randint(0, E, (40,))
    sorted_N, order_N = torch.sort(expert_N, stable=True)
    keep = capacity_keep(sorted_N, torch.bincount(expert_N, minlength=E), capacity)
    seen = [0] * E
    expected_kept = set()
    for pair, e in enumerate(expert_N.tolist()):  # pairs in token order
        if seen[e] < capacity:
            expected_kept.add(pair)
        seen[e] += 1
    assert set(order_N[keep].tolist()) == expected_kept


# ------------------------------------------------------------------------------- balancing


def skewed_moe(scoring_func: str, speed: float) -> tuple[MoE, torch.Tensor]:
    moe = make_moe(
        torch.float32,
        scoring_func=scoring_func,
        n_routed_experts=8,
        num_experts_per_tok=2,
        bias_update_speed=speed,
        aux_free_bias=True,
    )
    torch.manual_seed(3)
    mean_dir = torch.ones(16) / 4.0
    with torch.no_grad():
        moe.gate.e_score_correction_bias.zero_()
        # expert e's logit grows with e along the inputs' mean direction: later experts dominate
        moe.gate.weight.copy_(0.1 * torch.randn(8, 16) + torch.linspace(-1, 1, 8)[:, None] * mean_dir)
    x = torch.randn(4, 64, 16) * 0.5 + mean_dir * 2
    return moe, x


# the proportional softmax rule steps by up to (E/K - 1) * speed, so it needs a smaller speed not to oscillate
@pytest.mark.parametrize("scoring_func,speed", [("sigmoid", 0.01), ("softmax", 0.003)])
def test_aux_free_bias_lowers_maxvio(scoring_func, speed):
    moe, x = skewed_moe(scoring_func, speed)
    moe.train()
    with torch.no_grad():
        first = max_vio(moe(x)[1].load).item()
        for _ in range(200):
            moe.gate.update_bias(moe(x)[1].load)
        last = max_vio(moe(x)[1].load).item()
    assert first > 1.0, first
    assert last < 0.25 * first and last < 0.5, (first, last)


def test_forward_changes_no_state():
    moe = make_moe(router_jitter=0.1)
    before = {k: v.clone() for k, v in moe.state_dict(keep_vars=False).items()}
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    moe.eval()
    y1, _ = moe(x)
    y2, _ = moe(x)
    assert torch.equal(y1, y2)  # no jitter in eval
    moe.train()
    _, stats = moe(x)
    assert stats.load.sum() == 2 * 6 * 2
    for k, v in moe.state_dict().items():  # the forward never moves the bias; balance_step does
        assert torch.equal(v, before[k]), k
    assert [n for n, _ in moe.named_buffers()] == ["gate.e_score_correction_bias"]


def test_update_bias_rules_and_counts_argument():
    moe = make_moe(bias_update_speed=0.1)
    with torch.no_grad():
        moe.gate.e_score_correction_bias.zero_()
    load = torch.tensor([4.0, 0.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0])  # mean 2
    moe.gate.update_bias(load)
    expected = torch.tensor([-0.1, 0.1, 0, 0, 0, 0, 0, 0])
    torch.testing.assert_close(moe.gate.e_score_correction_bias, expected)
    torch.testing.assert_close(bias_update(load, 0.1, "softmax"), torch.tensor([-0.1, 0.1, 0, 0, 0, 0, 0, 0]))
    torch.testing.assert_close(
        bias_update(torch.tensor([3.0, 1.0]), 0.1, "softmax"), torch.tensor([-0.05, 0.05])
    )
    assert bias_update(torch.zeros(4), 0.1, "softmax").abs().sum() == 0  # nothing routed: no step

    plain = make_moe(aux_free_bias=False)
    assert plain.gate.e_score_correction_bias is None
    plain.gate.update_bias(load)  # no-op
    plain.train()
    plain(torch.randn(1, 3, 16, dtype=torch.float64))


def test_hand_computed_losses():
    # D = E = 3 and an identity router: logits are the inputs. Softmax scores p, top-1.
    p = torch.tensor(
        [[0.5, 0.3, 0.2], [0.2, 0.5, 0.3], [0.6, 0.2, 0.2], [0.1, 0.1, 0.8]], dtype=torch.float64
    )
    shift = torch.tensor([1.0, 2.0, 0.0, -1.0], dtype=torch.float64)  # logsumexp of each token's logits
    logits = p.log() + shift[:, None]
    idx = torch.tensor([[0], [1], [0], [2]])
    # f = 3/(1*4) * [2, 1, 1]; P = [1.4, 1.1, 1.5] / 4; sum f P = 1.0125
    torch.testing.assert_close(load_balance_loss(p, idx, 0.1), torch.tensor(0.10125, dtype=torch.float64))
    # sequences (t0, t1) and (t2, t3): 1.125 and 1.275, mean 1.2
    seq = seq_load_balance_loss(p.view(2, 2, 3), idx.view(2, 2, 1), 0.01)
    torch.testing.assert_close(seq, torch.tensor(0.012, dtype=torch.float64))
    # mean of (1, 4, 0, 1)
    torch.testing.assert_close(router_z_loss(logits, 0.01), torch.tensor(0.015, dtype=torch.float64))

    cfg = make_cfg(
        hidden_size=3,
        n_routed_experts=3,
        num_experts_per_tok=1,
        n_shared_experts=0,
        scoring_func="softmax",
        aux_free_bias=False,
        aux_loss_alpha=0.1,
        seq_aux_loss_alpha=0.01,
        z_loss_coef=0.01,
    )
    moe = MoE(cfg).to(torch.float64)
    with torch.no_grad():
        moe.gate.weight.copy_(torch.eye(3))
    _, stats = moe(logits.view(2, 2, 3))
    assert stats.load.tolist() == [2.0, 1.0, 1.0]
    torch.testing.assert_close(stats.aux_loss, torch.tensor(0.10125 + 0.012, dtype=torch.float64))
    torch.testing.assert_close(stats.z_loss, torch.tensor(0.015, dtype=torch.float64))
    # without gradients (evaluation, decoding) the training-only terms are not computed; routing is not
    # touched by that
    with torch.no_grad():
        y_ng, stats_ng = moe(logits.view(2, 2, 3))
    assert stats_ng.aux_loss.item() == 0.0 and stats_ng.z_loss.item() == 0.0
    assert stats_ng.load.tolist() == [2.0, 1.0, 1.0]
    torch.testing.assert_close(y_ng, moe(logits.view(2, 2, 3))[0].detach())

    # sigmoid: P uses s / sum(s): s = [0.9, 0.3, 0.3] -> [0.6, 0.2, 0.2]; f = 3/1 * [1, 0, 0]
    s = torch.tensor([[0.9, 0.3, 0.3]], dtype=torch.float64)
    torch.testing.assert_close(
        load_balance_loss(s, torch.tensor([[0]]), 1.0), torch.tensor(1.8, dtype=torch.float64)
    )


def _balance_loss_by_definition(scores_TE: torch.Tensor, idx_TK: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * sum_i f_i * P_i for one batch of T tokens, by loops over the definition (DeepSeek-V3 eq.
    17-20): f_i = E / (K * T) * (times expert i was chosen), P_i = mean over tokens of s_ti / sum_j s_tj."""
    T, E = scores_TE.shape
    K = idx_TK.shape[1]
    chosen = idx_TK.tolist()
    total = scores_TE.new_zeros(())
    for i in range(E):
        f_i = E / (K * T) * sum(row.count(i) for row in chosen)
        P_i = sum(scores_TE[t, i] / scores_TE[t].sum() for t in range(T)) / T
        total = total + f_i * P_i
    return alpha * total


@pytest.mark.parametrize("scoring_func", ["sigmoid", "softmax"])
@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("seed", [0, 1])
def test_balance_losses_match_their_definition(scoring_func, k, seed):
    """Token-level and sequence-wise balance losses, values and score gradients, against the definition
    with K > 1 and sigmoid scores (whose normalisation s / sum s is not a no-op), over 3 sequences."""
    g = torch.Generator().manual_seed(seed)
    B, S, E = 3, 6, 8
    logits = torch.randn(B, S, E, dtype=torch.float64, generator=g, requires_grad=True)
    scores = logits.sigmoid() if scoring_func == "sigmoid" else logits.softmax(-1)
    idx = torch.rand(B, S, E, generator=g).topk(k, dim=-1).indices  # (B, S, K) any routing
    got = [
        load_balance_loss(scores.view(B * S, E), idx.view(B * S, k), 0.1),
        seq_load_balance_loss(scores, idx, 0.01),
    ]
    want = [
        _balance_loss_by_definition(scores.view(B * S, E), idx.view(B * S, k), 0.1),
        sum(_balance_loss_by_definition(scores[b], idx[b], 0.01) for b in range(B)) / B,
    ]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
        (ga,) = torch.autograd.grad(a, logits, retain_graph=True)
        (gb,) = torch.autograd.grad(b, logits, retain_graph=True)
        torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-14)
    # equal scores (P_i = 1/E): sum_i f_i P_i = (E / (K * T)) * K * T / E = 1 whatever the routing
    flat = torch.full((B, S, E), 0.3, dtype=torch.float64)
    alpha = torch.tensor(0.1, dtype=torch.float64)
    torch.testing.assert_close(load_balance_loss(flat.view(B * S, E), idx.view(B * S, k), 0.1), alpha)
    torch.testing.assert_close(seq_load_balance_loss(flat, idx, 0.1), alpha)


def test_router_weights_and_scaling():
    router = Router(make_cfg(routed_scaling_factor=2.5, aux_free_bias=True)).double()
    x = torch.randn(1, 5, 16, dtype=torch.float64)
    out = router(x)
    torch.testing.assert_close(out.topk_weight.sum(-1), torch.full((5,), 2.5, dtype=torch.float64))
    assert out.topk_idx.shape == (5, 2)
    # the bias changes the selection only, never the weights of what is selected
    with torch.no_grad():
        router.e_score_correction_bias[out.topk_idx[0, 0]] += 10.0
    again = router(x)
    scores = F.linear(x[0], router.weight).sigmoid()
    chosen = scores.gather(1, again.topk_idx)
    torch.testing.assert_close(again.topk_weight, 2.5 * chosen / chosen.sum(-1, keepdim=True))


def test_router_is_fp32_under_bf16_autocast():
    # train.precision=bf16 runs the model under autocast, which would turn the router's F.linear (and so
    # logits, scores, gate weights and z-loss) back to bf16
    router = Router(
        make_cfg(routed_scaling_factor=2.5, aux_loss_alpha=0.01, seq_aux_loss_alpha=0.001, z_loss_coef=0.01)
    )
    with torch.no_grad():
        router.weight.normal_(0.0, 1.0)
        router.e_score_correction_bias.normal_(0.0, 0.01)
    x = torch.randn(2, 6, 16)
    ref = router(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert F.linear(x, router.weight).dtype == torch.bfloat16  # autocast is really on
        out = router(x)
    for name in ("topk_weight", "aux_loss", "z_loss"):
        assert getattr(out, name).dtype == torch.float32, name
        assert torch.equal(getattr(out, name), getattr(ref, name)), name
    assert torch.equal(out.topk_idx, ref.topk_idx)

    # a 1e-3 bias step near score 0.5 (bf16 spacing there: 2^-8 = 0.0039). Identity router, top-1:
    # logits are the inputs. Token 0: 0.50120 vs 0.50000 + 0.001 keeps expert 0; token 1: 0.50080 vs
    # 0.50100 moves to expert 1. In bf16 both 0.5012 and 0.5008 round to 0.5 and both tokens would move.
    cfg = make_cfg(hidden_size=4, n_routed_experts=4, num_experts_per_tok=1, n_shared_experts=0)
    router = Router(cfg)
    with torch.no_grad():
        router.weight.copy_(torch.eye(4))
    logits = torch.tensor([[[0.0048, 0.0, -3.0, -3.0], [0.0032, 0.0, -3.0, -3.0]]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        before = router(logits).topk_idx.flatten().tolist()
        router.e_score_correction_bias[1] += 1e-3
        after = router(logits)
    assert before == [0, 0]
    assert after.topk_idx.flatten().tolist() == [0, 1]
    torch.testing.assert_close(after.topk_weight.flatten(), torch.sigmoid(torch.tensor([0.0048, 0.0])))

    # through the MoE layer too
    moe = make_moe(torch.float32, z_loss_coef=0.01)
    ref_stats = moe(x)[1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, stats = moe(x)
    assert stats.z_loss.dtype == torch.float32 and torch.equal(stats.z_loss, ref_stats.z_loss)
    assert torch.equal(stats.load, ref_stats.load)


def test_max_vio():
    assert max_vio(torch.tensor([2.0, 2.0, 2.0, 2.0])).item() == 0.0
    assert max_vio(torch.tensor([4.0, 0.0, 2.0, 2.0])).item() == pytest.approx(1.0)
    per_layer = max_vio(torch.tensor([[2.0, 2.0, 2.0, 2.0], [4.0, 0.0, 2.0, 2.0], [0.0, 0.0, 0.0, 0.0]]))
    torch.testing.assert_close(per_layer, torch.tensor([0.0, 1.0, -1.0]))  # nothing routed: no NaN


# ------------------------------------------------------------------------------- backend choice


def test_unaligned_hidden_falls_back_to_loop():
    # hidden 18 fp32 = 72 bytes per row, not a multiple of 16 (hidden 20 would be 80: aligned in fp32)
    moe = make_moe(torch.float32, hidden_size=18, moe_impl="auto")
    x = torch.randn(2, 5, 18)
    assert resolve_impl("auto", x.view(-1, 18), 18, 8) == "loop"
    with pytest.raises(ConfigError, match="grouped_mm"):
        resolve_impl("grouped_mm", x.view(-1, 18), 18, 8)
    y, y_ref, g, g_ref = run_both(moe, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    assert resolve_impl("auto", x.double(), 16, 8) == "loop"  # no fp64 grouped_mm


def test_state_dict_names_and_fp32_bias_under_bf16():
    moe = make_moe(torch.float32)
    keys = set(moe.state_dict())
    assert {"gate.weight", "gate.e_score_correction_bias", "experts.gate_proj", "experts.up_proj"} <= keys
    assert "shared_experts.down_proj.weight" in keys and "gate.load_counts" not in keys
    assert moe.experts.gate_proj.shape == (8, 8, 16) and moe.experts.down_proj.shape == (8, 16, 8)
    bias = moe.gate.e_score_correction_bias.clone()
    moe.to(torch.bfloat16)
    assert moe.gate.e_score_correction_bias.dtype == torch.float32
    assert torch.equal(moe.gate.e_score_correction_bias, bias)
    y, stats = moe(torch.randn(2, 4, 16, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and stats.aux_loss.dtype == torch.float32


@pytest.mark.parametrize("act", ["swiglu", "gelu"])
@pytest.mark.parametrize("scaled", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_trained_experts_operator_equals_autograd_through_the_loop(act, scaled, seed):
    """`trained_experts` (what torch.compile runs for training) has a hand-written backward: its output
    and every gradient (rows, each weight, the gate scale) equal autograd through `loop_experts`, fp64,
    with an expert that gets no rows and uneven slices."""
    g = torch.Generator().manual_seed(seed)
    E, D, I = 4, 6, 5
    counts = [3, 0, 5, 2] if seed == 0 else [1, 6, 0, 4]
    tensors = [
        torch.randn(sum(counts), D, generator=g, dtype=torch.float64),
        torch.randn(E, I, D, generator=g, dtype=torch.float64) if act == "swiglu" else None,
        torch.randn(E, I, D, generator=g, dtype=torch.float64),
        torch.randn(E, D, I, generator=g, dtype=torch.float64),
        torch.rand(sum(counts), generator=g, dtype=torch.float64) if scaled else None,
    ]
    dy = torch.randn(sum(counts), D, generator=g, dtype=torch.float64)
    results = []
    for kernel in (loop_experts, compiled_training_experts):
        _grads_of(kernel, tensors, counts, dy, results)
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("act", ["swiglu", "gelu"])
def test_expert_operators_fake_shapes_match_their_outputs(act):
    """What torch.compile traces with: each custom operator's fake implementation gives the shapes and
    dtypes its real one returns (torch.library.opcheck), with a gate (SwiGLU) and without (GELU)."""
    from minimoe.model.compiled_experts import selected_experts, trained_experts, trained_experts_backward

    g = torch.Generator().manual_seed(5)
    counts, E, D, I = torch.tensor([2, 0, 3]), 3, 6, 4
    x = torch.randn(5, D, generator=g)
    gate = torch.randn(E, I, D, generator=g) if act == "swiglu" else None
    up, down, scale = (
        torch.randn(E, I, D, generator=g),
        torch.randn(E, D, I, generator=g),
        torch.rand(5, generator=g),
    )
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(selected_experts, (x, counts, gate, up, down, scale), test_utils=checks)
    torch.library.opcheck(trained_experts, (x, counts, gate, up, down, scale), test_utils=checks)
    pre = trained_experts(x, counts, gate, up, down, scale)[1]
    args = (torch.randn(5, D, generator=g), x, pre, counts, gate, up, down, scale, True)
    torch.library.opcheck(trained_experts_backward, args, test_utils=checks)


def test_trained_experts_operator_with_frozen_weights_gives_the_row_gradients():
    """Frozen experts (requires_grad off): the operator still gives the rows' and the gate scale's
    gradients of autograd through the loop, and no weight gradient."""
    g = torch.Generator().manual_seed(7)
    counts, E, D, I = [2, 5, 0, 3], 4, 6, 5
    x = torch.randn(sum(counts), D, generator=g, dtype=torch.float64)
    ws = [torch.randn(E, I, D, generator=g, dtype=torch.float64) for _ in range(2)]
    ws.append(torch.randn(E, D, I, generator=g, dtype=torch.float64))
    scale = torch.rand(sum(counts), generator=g, dtype=torch.float64)
    out = []
    for kernel in (loop_experts, compiled_training_experts):
        xl, sl = x.clone().requires_grad_(), scale.clone().requires_grad_()
        kernel(xl, torch.tensor(counts), *ws, sl).square().sum().backward()
        out.append((xl.grad, sl.grad))
    torch.testing.assert_close(out[1], out[0])
    assert all(w.grad is None for w in ws)


def test_trained_experts_operator_takes_bf16_rows_with_fp32_weights():
    """The operator under mixed precision: bf16 rows and output gradient, fp32 weights and gate
    scale; its gradients come back in each input's dtype and agree with fp64 autograd through the
    loop to bf16 precision."""
    g = torch.Generator().manual_seed(3)
    counts, E, D, I = [4, 0, 6, 3], 4, 16, 8
    tensors = [torch.randn(sum(counts), D, generator=g, dtype=torch.float64)]
    tensors += [torch.randn(E, I, D, generator=g, dtype=torch.float64) * 0.3 for _ in range(2)]
    tensors += [torch.randn(E, D, I, generator=g, dtype=torch.float64) * 0.3]
    tensors += [torch.rand(sum(counts), generator=g, dtype=torch.float64)]
    dy = torch.randn(sum(counts), D, generator=g, dtype=torch.float64)
    want, got = [], []
    _grads_of(loop_experts, tensors, counts, dy, want)
    mixed = [tensors[0].bfloat16()] + [t.float() for t in tensors[1:]]
    _grads_of(compiled_training_experts, mixed, counts, dy.bfloat16(), got)
    for a, b, t in zip(got[0], want[0], [mixed[0]] + mixed):  # y, then each input's gradient
        assert a.dtype == t.dtype
        torch.testing.assert_close(a.double(), b, rtol=0.05, atol=0.05)


def _compiled_vs_eager(moe, x0, backend, ctx=None):
    """Loss and gradients of the MoE layer eager and under torch.compile(fullgraph=True)."""
    import contextlib

    out = []
    for layer in (moe, torch.compile(moe, backend=backend, fullgraph=True)):
        moe.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_()
        with ctx() if ctx else contextlib.nullcontext():
            y, st = layer(x)
        loss = (y.float() * y.detach().float().sin()).sum()
        loss.backward()
        out.append({"loss": loss.detach(), **grads(moe, x)})
    return out


@pytest.mark.parametrize("backend", ["aot_eager", "eager"])
def test_compiled_moe_training_under_bf16_autocast_matches_eager_autocast(backend):
    """train.precision=bf16 with train.compile: the experts compute in bf16 as eager autocast does
    (the rows enter the operator in the autocast dtype; inside it autocast is off, as its fake
    implementation assumes), in one graph, and the gradients agree to bf16 precision."""
    torch._dynamo.reset()
    moe = make_moe(torch.float32, seed=4, moe_impl="auto")
    x0 = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(4))
    want, got = _compiled_vs_eager(moe, x0, backend, lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0.03, atol=0.03, msg=name)
    e = moe.experts
    args = (x0.reshape(16, 16), torch.tensor([4, 0, 6, 6, 0, 0, 0, 0]), e.gate_proj, e.up_proj, e.down_proj)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert compiled_training_experts(*args).dtype == loop_experts(*args).dtype == torch.bfloat16


def test_compiled_bf16_moe_training_is_one_graph():
    """A bf16 model takes grouped_mm under compile where it traces: the kernel probe is a constant
    of the graph (not traced, not a break), and the layer's gradients agree with eager."""
    torch._dynamo.reset()
    moe = make_moe(torch.float32, seed=5, moe_impl="auto").to(torch.bfloat16)
    x0 = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(5), dtype=torch.bfloat16)
    want, got = _compiled_vs_eager(moe, x0, "aot_eager")
    for name in want:
        torch.testing.assert_close(got[name].float(), want[name].float(), rtol=0.03, atol=0.03, msg=name)


def _grads_of(kernel, tensors, counts, dy, results):
    leaves = [t.detach().requires_grad_() if t is not None else None for t in tensors]
    x, gate, up, down, scale = leaves
    y = kernel(x, torch.tensor(counts), gate, up, down, scale)
    y.backward(dy)
    results.append([y.detach()] + [t.grad for t in leaves if t is not None])


@pytest.mark.parametrize("seed", [0, 1])
def test_compiled_moe_training_is_one_graph_and_equals_eager(seed):
    """torch.compile traces the MoE layer for training in one graph (fullgraph=True fails on a break,
    such as the loop's host sync), through AOTAutograd; output, losses and all gradients equal the
    eager layer's (fp32 takes `trained_experts`: grouped_mm's fake-tensor rule is bf16-only)."""
    moe = make_moe(torch.float32, seed=seed, aux_loss_alpha=0.01, z_loss_coef=0.001, moe_impl="auto")
    x0 = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(seed))

    def loss(layer, x):
        y, st = layer(x)
        return (y * y.detach().sin()).sum() + st.aux_loss + st.z_loss

    want, got = {}, {}
    for out, layer in ((want, moe), (got, torch.compile(moe, backend="aot_eager", fullgraph=True))):
        moe.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_()
        out["loss"] = loss(layer, x)
        out["loss"].backward()
        out.update(grads(moe, x))
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)


# ------------------------------------------------------------------------------- masked statistics


def test_watched_router_z_counts_valid_tokens_only():
    """With z_loss_coef = 0 the router still reports the unweighted z for the spike alert; like the loss
    it averages over the valid tokens only, equal to the z of the valid tokens run alone."""
    router = Router(make_cfg(z_loss_coef=0.0)).double()
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16, dtype=torch.float64) * 3.0
    valid = torch.tensor([[True, True, False, False, False], [True, False, True, True, False]])
    router.train()
    got = router(x, valid).z
    want = router(x[valid][None]).z
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert router(x).z.item() != pytest.approx(want.item(), rel=1e-6)  # the padding would change it


@pytest.mark.parametrize("k", [1, 2])
def test_capacity_dropped_counts_valid_tokens_only(k):
    """`dropped` counts the capacity's dropped pairs of the valid tokens only (padding takes slots but is
    no statistic), against a first-come-first-served loop over the pairs in token order."""
    moe = make_moe(n_routed_experts=4, num_experts_per_tok=k, n_shared_experts=0, capacity_factor=0.5)
    moe.train()
    torch.manual_seed(4)
    x = torch.randn(2, 8, 16, dtype=torch.float64)
    valid = torch.rand(2, 8) < 0.5
    T = 16
    idx = moe.gate(x, valid).topk_idx.tolist()
    capacity = expert_capacity(0.5, T, k, 4)
    seen, want = [0] * 4, 0
    for t in range(T):
        for e in idx[t]:
            want += seen[e] >= capacity and bool(valid.view(-1)[t])
            seen[e] += 1
    total = sum(max(0, n - capacity) for n in seen)
    assert 0 < want < total  # some valid and some padded pairs are dropped
    _, stats = moe(x, valid)
    assert stats.dropped.item() == want
    assert moe(x)[1].dropped.item() == total


def test_router_jitter_is_multiplicative_and_training_only():
    """Switch-style jitter multiplies the router input by U(1 - j, 1 + j): a zero input stays zero (its
    logits are 0, z = log(E)^2, the scores all equal), any other input gets noisy logits in training and
    exact ones in eval."""
    torch.manual_seed(0)
    router = Router(make_cfg(router_jitter=0.5, z_loss_coef=1.0, aux_free_bias=False)).double()
    router.train()
    zero = torch.zeros(1, 4, 16, dtype=torch.float64)
    r = router(zero)
    torch.testing.assert_close(r.z, torch.tensor(math.log(8) ** 2, dtype=torch.float64), rtol=1e-12, atol=0)
    torch.testing.assert_close(r.topk_weight, torch.full((4, 2), 0.5, dtype=torch.float64))
    x = torch.randn(1, 4, 16, dtype=torch.float64)
    assert router(x).z.item() != router(x).z.item()
    router.eval()
    with torch.enable_grad():
        assert router(x).z.item() == router(x).z.item()
