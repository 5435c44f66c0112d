"""Autocast precision: what `train.precision=auto` resolves to, and that the pieces autocast does not
cover by itself (the fused LM-head loss, the grouped expert GEMMs, CPU attention) run as documented."""

import time

import pytest
import torch
import torch.nn.functional as F
import yaml

from minimoe.config import ModelConfig
from minimoe.model import attention as attention_lib
from minimoe.model import loss as loss_lib
from minimoe.model.expert_kernels import loop_experts
from minimoe.model.experts import GroupedExperts
from minimoe.model.moe import MoE
from minimoe.train import precision as precision_lib
from minimoe.train import trainer as trainer_lib
from minimoe.train.run import train_from_config
from tiny import TINY_TRAIN

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    "avx512_bf16, amx, speedup, want",
    [(True, False, 2.0, "bf16"), (False, True, 2.0, "bf16"), (False, False, 2.0, "fp32"), (True, True, 0.6, "fp32"),
     (True, False, 1.09, "fp32")],
)  # fmt: skip
def test_auto_precision_is_bf16_only_where_the_cpu_multiplies_bf16_faster(
    monkeypatch, avx512_bf16, amx, speedup, want
):
    """auto is bf16 on a CPU that has bf16 instructions and runs bf16 products measurably faster than fp32
    (a 2-core Intel Xeon with AVX-512 BF16 ran them at 0.6x): the flag alone does not choose it."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(precision_lib, "cpu_bf16_speedup", lambda threads: speedup)
    assert precision_lib.resolve_precision("auto", CPU) == want
    for named in ("fp32", "bf16"):  # a named precision is kept whatever the hardware
        assert precision_lib.resolve_precision(named, CPU) == named
    assert precision_lib.resolve_precision("auto", torch.device("meta")) == "fp32"


def test_bf16_speedup_is_timed_at_the_runs_threads(tmp_path, corpus, monkeypatch):
    """The trainer sets train.threads before auto times bf16 against fp32: the lab's one-thread runs are
    decided at one thread. The measurement itself runs at the threads it is given, puts the process's back,
    and is a positive ratio, cached per thread count."""
    seen = []
    monkeypatch.setattr(precision_lib, "native_bf16", lambda device: True)
    monkeypatch.setattr(precision_lib, "cpu_bf16_speedup", lambda threads: seen.append(threads) or 0.5)
    threads = torch.get_num_threads()
    try:
        overrides = TINY_TRAIN + [f"data.path={corpus}", "train.max_steps=1", "train.precision=auto"]
        train_from_config(overrides=overrides + ["train.threads=1"], run_dir=tmp_path / "run", progress=False)
    finally:
        torch.set_num_threads(threads)
    assert seen == [1]
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["train"]["precision"] == "fp32"
    monkeypatch.undo()
    precision_lib.cpu_bf16_speedup.cache_clear()
    timed_at, clock = [], time.perf_counter  # the thread count each reading of the timer's clock saw
    monkeypatch.setattr(
        precision_lib.time, "perf_counter", lambda: timed_at.append(torch.get_num_threads()) or clock()
    )
    torch.set_num_threads(2)
    try:
        first = precision_lib.cpu_bf16_speedup(1)
        assert len(timed_at) == 12 and set(timed_at) == {
            1
        }  # 2 x 3 rounds, each read twice, all at one thread
        assert torch.get_num_threads() == 2  # and the process's count put back
        assert (
            0 < first < 100 and precision_lib.cpu_bf16_speedup(1) == first and len(timed_at) == 12
        )  # cached
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("native, want", [(True, "bf16"), (False, "fp32")])
def test_a_run_records_the_precision_auto_chose(tmp_path, corpus, monkeypatch, native, want):
    monkeypatch.setattr(precision_lib, "native_bf16", lambda device: native)
    monkeypatch.setattr(precision_lib, "cpu_bf16_speedup", lambda threads: 2.0)
    overrides = TINY_TRAIN + [f"data.path={corpus}", "train.max_steps=2", "train.precision=auto"]
    res = train_from_config(overrides=overrides, run_dir=tmp_path / "run", progress=False)
    assert res.step == 2 and res.val_loss == res.val_loss  # trained, finite
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["train"]["precision"] == want  # a resumed run trains as this one did


@pytest.mark.parametrize("chunk_elements", [40, 1 << 21])  # several chunks (ragged last), one
def test_fused_loss_under_autocast_matches_autocasts_plain_head(monkeypatch, chunk_elements):
    """Under bf16 autocast the fused head multiplies in bf16 like an autocast Linear, the softmax in fp32
    like autocast's cross_entropy: the plain path under autocast is the reference."""
    monkeypatch.setattr(loss_lib, "CHUNK_ELEMENTS", chunk_elements)
    torch.manual_seed(0)
    h = torch.randn(3, 9, 16, requires_grad=True)
    w = torch.randn(11, 16, requires_grad=True)
    t = torch.randint(0, 11, (3, 9))
    t[1, :4] = -100
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = loss_lib.linear_cross_entropy(h, w, t)
        plain = F.cross_entropy(F.linear(h, w).flatten(0, 1), t.flatten(), ignore_index=-100)
    assert fused.dtype == torch.float32
    gh, gw = torch.autograd.grad(fused, (h, w))
    rh, rw = torch.autograd.grad(plain, (h, w))
    assert gh.dtype == gw.dtype == torch.float32  # gradients reach fp32 weights in fp32
    torch.testing.assert_close(fused, plain, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(gh, rh, rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(gw, rw, rtol=2e-2, atol=2e-3)
    # and it is the bf16 product, not fp32's: at these magnitudes the two differ by far more than that
    exact = loss_lib.linear_cross_entropy(h, w, t)
    assert (exact - fused).abs() > 1e-5
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # evaluation's loss-only path
        torch.testing.assert_close(loss_lib.linear_cross_entropy(h, w, t), fused.detach(), rtol=0, atol=1e-6)


def test_grouped_experts_run_in_the_autocast_dtype():
    """torch._grouped_mm is not on autocast's list: GroupedExperts casts for it, so its output equals the
    loop's F.linear products under autocast (which autocast does cast), and its weights get fp32 grads."""
    torch.manual_seed(0)
    experts = GroupedExperts(4, 32, 16)
    x = torch.randn(24, 32, requires_grad=True)
    counts = torch.tensor([5, 0, 12, 7])
    scale = torch.rand(24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = experts(x, counts, scale)
        ref = loop_experts(x, counts, experts.gate_proj, experts.up_proj, experts.down_proj, scale)
    assert y.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref.float(), rtol=2e-2, atol=2e-2)
    y.float().sum().backward()
    assert experts.up_proj.grad.dtype == torch.float32 and x.grad.dtype == torch.float32


def test_moe_layer_routes_in_fp32_and_hands_the_experts_autocast_rows():
    """Under autocast the MoE layer casts its tokens once, before the gather: the routed and shared experts
    get bf16 rows, while the router reads the fp32 input (its bias step is below bf16's resolution) and
    the layer returns the input's dtype; the result stays within bf16 rounding of the fp32 layer."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        hidden_size=32,
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        n_shared_experts=1,
    ).validate()
    moe = MoE(cfg)
    seen = {}
    for name in ("gate", "experts", "shared_experts"):
        getattr(moe, name).register_forward_pre_hook(
            lambda m, args, name=name: seen.__setitem__(name, args[0].dtype)
        )
    x = torch.randn(2, 12, 32)
    with torch.no_grad():
        want, _ = moe(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = moe(x)
    assert seen == {"gate": torch.float32, "experts": torch.bfloat16, "shared_experts": torch.bfloat16}
    assert got.dtype == torch.float32
    assert (got - want).norm() <= 2e-2 * want.norm()


def test_cpu_attention_stays_fp32_under_autocast():
    """CPU autocast would run SDPA in bf16, whose backward is the slow one here: `_sdpa` runs it in fp32."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 8, 16, requires_grad=True) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention_lib._sdpa(q, k, v, 16**-0.5, 0, 0.0)
    assert out.dtype == torch.float32
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=16**-0.5)
    torch.testing.assert_close(out, ref)


def test_evaluation_is_fp32_whatever_the_training_precision(tmp_path, corpus):
    """Validation scores the weights, not the autocast dtype: the same weights evaluate the same whether
    the run trains in bf16 or in fp32."""
    from minimoe.config_yaml import build_run_config
    from minimoe.data import prepare

    cfg = build_run_config(None, None, TINY_TRAIN + ["train.precision=bf16"]).validate()
    data = prepare(str(corpus), "byte", tmp_path / "data", workers=0, progress=False)
    trainer = trainer_lib.Trainer(cfg, tmp_path / "run", data, data.tokenizer(), progress=False)
    bf16_val = trainer.evaluate()["val_loss"]
    trainer.cfg.train.precision = "fp32"
    assert trainer.evaluate()["val_loss"] == bf16_val


def test_grouped_mm_probe_is_not_misled_by_autocast():
    """The probe compares grouped_mm with the loop; under autocast the loop's F.linear would compute in
    bf16 and the fp32 answer cached for every later call would be "does not work"."""
    from minimoe.model.experts import grouped_mm_works

    grouped_mm_works.cache_clear()
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under = grouped_mm_works("cpu", torch.float32, True, True)
        grouped_mm_works.cache_clear()
        assert under == grouped_mm_works("cpu", torch.float32, True, True)
    finally:
        grouped_mm_works.cache_clear()


def test_grouped_mm_probe_accepts_bf16_on_cpu_despite_rounding():
    """On CPU (torch 2.13) bf16 grouped_mm and the bf16 loop are equally close to fp64, but single
    elements round differently; an element-wise tolerance rejected grouped_mm and left bf16 training on
    the slower loop. Both kernels' errors against fp64 are checked here as well."""
    from minimoe.model.expert_kernels import grouped_mm_experts
    from minimoe.model.experts import grouped_mm_works

    assert grouped_mm_works("cpu", torch.bfloat16, True, True)
    torch.manual_seed(0)
    counts = torch.tensor([70, 30, 0, 56])
    tensors = [
        torch.randn(156, 32),
        *(0.1 * torch.randn(4, 16, 32) for _ in range(2)),
        0.1 * torch.randn(4, 32, 16),
    ]
    grad_out = torch.randn(156, 32)

    def run(kernel, dtype):
        leaves = [t.to(dtype).requires_grad_() for t in tensors]
        y = kernel(leaves[0], counts, *leaves[1:])
        y.backward(grad_out.to(dtype))
        return [y.detach().double()] + [t.grad.double() for t in leaves]

    exact = run(loop_experts, torch.float64)
    for kernel in (grouped_mm_experts, loop_experts):
        for got, want in zip(run(kernel, torch.bfloat16), exact):
            assert (got - want).norm() <= 1e-2 * want.norm(), kernel.__name__


def test_moe_pads_expert_rows_only_for_low_precision_on_cpu(monkeypatch):
    """Under CPU bf16 autocast (oneDNN builds a GEMM kernel per new shape) the MoE layer hands its experts
    every expert's rows padded to a multiple of 64; in fp32 the rows as routed. The padded layer gives
    the fp32 layer's output to bf16 rounding."""
    seen = []
    real = GroupedExperts.forward

    def recording(self, x, counts, scale=None):
        seen.append(counts.tolist())
        return real(self, x, counts, scale)

    monkeypatch.setattr(GroupedExperts, "forward", recording)
    torch.manual_seed(0)
    moe = MoE(
        ModelConfig(hidden_size=32, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
    )
    x = torch.randn(3, 50, 32)
    ref, stats = moe(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = moe(x)
    routed = stats.load.long().tolist()
    assert seen[0] == routed and sum(routed) == 300
    assert seen[1] == [(c + 63) // 64 * 64 for c in routed]
    torch.testing.assert_close(y.float(), ref, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize(
    "precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)]
)
def test_autocast_context_runs_matmuls_in_the_named_precision(precision, dtype):
    a, b = torch.randn(4, 8), torch.randn(8, 4)
    with precision_lib.autocast_context(precision, CPU):
        assert (a @ b).dtype == dtype
