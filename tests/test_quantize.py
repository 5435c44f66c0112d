"""Weight-only int8/int4 quantization: round-trip error bounds, quantized layers against their
dequantized float twins, the saved checkpoint reloading, and the `minimoe quantize` command."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from test_infer import run_cli, tiny_cfg, trained_run  # noqa: F401 - trained_run is a fixture

from minimoe.errors import MinimoeError
from minimoe.infer.generate import generate_tokens
from minimoe.infer.quantize import (
    QuantExperts,
    QuantLinear,
    dequantize_tensor,
    int8_kernel_works,
    pack_int4,
    perplexity,
    quantize_model,
    quantize_tensor,
    unpack_int4,
    weight_bytes,
)
from minimoe.model.experts import GroupedExperts
from minimoe.model.transformer import Transformer
from minimoe.train.checkpoint import load_run


def test_pack_int4_round_trip():
    q = torch.randint(-8, 8, (3, 5, 14), dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5, 7)
    assert torch.equal(unpack_int4(packed), q)
    # the stored layout: value + 8 per nibble, element 2i in the low nibble (saved runs depend on it)
    assert pack_int4(torch.tensor([-8, 7, 0, -1], dtype=torch.int8)).tolist() == [0xF0, 0x78]


@pytest.mark.parametrize("bits,group", [(8, 64), (4, 16), (4, 64)])
def test_round_trip_error_is_within_half_a_step(bits, group):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 24, 70, generator=g) * torch.rand(4, 24, 1, generator=g)  # rows of varied size
    w[0, 0] = 0.0  # an all-zero row must not divide by zero
    q, scale = quantize_tensor(w, bits, group)
    back = dequantize_tensor(q, scale, bits, w.shape[-1])
    assert back.shape == w.shape and torch.isfinite(back).all()
    assert torch.equal(back[0, 0], torch.zeros(70))
    if bits == 8:
        assert q.dtype == torch.int8 and scale.shape == (4, 24, 1)
        step = scale  # per output row
    else:
        n_groups = -(-70 // group)
        assert q.shape == (4, 24, n_groups * group // 2) and scale.shape == (4, 24, n_groups)
        step = scale.float().repeat_interleave(group, dim=-1)[..., :70]
    assert ((back - w).abs() <= step / 2 + 1e-6).all()
    rel = ((back - w).norm() / w.norm()).item()
    assert rel < (0.01 if bits == 8 else 0.15)  # int8 close, int4 looser


def test_bad_quantization_arguments():
    w = torch.randn(4, 8)
    with pytest.raises(MinimoeError, match="bits"):
        quantize_tensor(w, 3)
    with pytest.raises(MinimoeError, match="group_size"):
        quantize_tensor(w, 4, group_size=7)


@pytest.mark.parametrize("bits", [8, 4])
def test_quant_linear_and_experts_match_their_dequantized_weights(bits):
    torch.manual_seed(0)
    lin = torch.nn.Linear(40, 24, bias=False)
    ql = QuantLinear.from_float(lin.weight, bits, 16)
    x = torch.randn(5, 3, 40)
    torch.testing.assert_close(ql(x), x @ ql.weight.T, rtol=1e-4, atol=1e-5)
    experts = GroupedExperts(4, 20, 12)
    qe = QuantExperts(experts, bits, 16)
    twin = GroupedExperts(4, 20, 12, impl="loop")  # float experts holding the dequantized weights
    with torch.no_grad():
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(twin, name).copy_(getattr(qe, name).dequantize())
    x = torch.randn(9, 20)
    counts = torch.tensor([3, 0, 4, 2])  # includes an expert with no tokens
    scale = torch.rand(9)
    torch.testing.assert_close(qe(x, counts, scale), twin(x, counts, scale), rtol=1e-4, atol=1e-5)


def test_int8_kernel_matches_dequantized_matmul():
    if not int8_kernel_works("cpu", torch.float32):
        pytest.skip("torch._weight_int8pack_mm is not available here")
    ql = QuantLinear.from_float(torch.randn(48, 64), 8, 64)
    x = torch.randn(7, 64)
    torch.testing.assert_close(ql(x), x @ ql.dequantize().T, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("attn_type", ["mla", "gqa"])
def test_quantized_model_stays_close(attn_type):
    torch.manual_seed(0)
    model = Transformer(tiny_cfg(attn_type, initializer_range=0.1)).eval()
    idx = torch.randint(0, 97, (2, 20))
    ref = model(idx).logits
    before = weight_bytes(model)
    errs, sizes = {}, {}
    for bits in (8, 4):
        q = quantize_model(copy.deepcopy(model), bits, 16)
        assert q.quantization == {"bits": bits, "group_size": 16}
        assert not any(isinstance(m, torch.nn.Linear) for m in q.modules())
        assert not any(isinstance(m, GroupedExperts) for m in q.modules())
        errs[bits] = ((q(idx).logits - ref).norm() / ref.norm()).item()
        sizes[bits] = weight_bytes(q)
        # the quantized model still decodes from the cache like the float one
        assert len(list(generate_tokens(q, [1, 2, 3], 8, temperature=0.0))) == 8
    # ~0.5% / ~8% error per weight; an expert choice that flips near a routing tie adds more
    assert errs[8] < 0.06 and errs[4] < 0.3 and errs[8] < errs[4] / 3
    assert sizes[4] < sizes[8] < before


def test_embedding_router_norms_and_a_tied_head_stay_floating_point():
    """Only Linear and routed-expert weights are quantized: the embedding (and the LM head tied to it),
    the routers and the norms keep their float values."""
    torch.manual_seed(0)
    model = Transformer(tiny_cfg(tie_word_embeddings=True)).eval()
    kept = {
        k: v.clone() for k, v in model.state_dict().items() if "norm" in k or "gate." in k or "embed" in k
    }
    q = quantize_model(copy.deepcopy(model), 4, 16)
    assert q.lm_head.weight is q.embed_tokens.weight and isinstance(q.lm_head, torch.nn.Linear)
    after = q.state_dict()
    assert kept and all(torch.equal(after[k], v) for k, v in kept.items())


def test_perplexity_is_exp_of_cross_entropy():
    torch.manual_seed(0)
    model = Transformer(tiny_cfg()).eval()
    ids = torch.randint(0, 97, (70,))  # 4 windows of 16 scored tokens; the last 5 tokens are left over
    with torch.no_grad():
        ces = [
            torch.nn.functional.cross_entropy(model(w[None, :-1]).logits[0], w[1:])
            for w in (ids[i * 16 : i * 16 + 17] for i in range(4))
        ]
    want = torch.stack(ces).mean().exp().item()
    assert abs(perplexity(model, ids, 16, batch_size=3) - want) < 1e-3
    assert abs(perplexity(model, ids, 16, max_windows=99) - want) < 1e-3  # more windows than the text has
    # windows never run past the model's context (64 positions): 199 tokens give 3 windows of 64
    long = torch.randint(0, 97, (199,))
    with torch.no_grad():
        at_context = [
            torch.nn.functional.cross_entropy(model(w[None, :-1]).logits[0], w[1:])
            for w in (long[i * 64 : i * 64 + 65] for i in range(3))
        ]
    assert abs(perplexity(model, long, 1000) - torch.stack(at_context).mean().exp().item()) < 1e-3
    with pytest.raises(MinimoeError, match="too short"):
        perplexity(model, ids[:1], 16)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_checkpoint_reloads_and_generates(trained_run, tmp_path, capsys, bits):  # noqa: F811
    model, tok, _, meta = load_run(trained_run)
    held = tmp_path / "heldout.txt"
    held.write_text("the cat sat on the mat and the dog ran to the red ball\n" * 20, encoding="utf-8")
    out = tmp_path / f"q{bits}"
    code, text, err = run_cli(
        ["quantize", str(trained_run), "--bits", str(bits), "--group-size", "16", "--out", str(out),
         "--eval-data", str(held), "--eval-tokens", "600"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert "perplexity on" in text and "->" in text and "smaller" in text
    saved = json.loads((out / "meta.json").read_text())
    assert saved["quantization"] == {"bits": bits, "group_size": 16}
    loaded, tok2, _, _ = load_run(out)
    assert loaded.quantization == {"bits": bits, "group_size": 16}
    in_memory = quantize_model(model, bits, 16)
    for a, b in zip(loaded.state_dict().values(), in_memory.state_dict().values()):
        assert torch.equal(a, b)
    ids = tok.encode("the cat")
    want = list(generate_tokens(in_memory, ids, 15, temperature=0.0))
    assert list(generate_tokens(loaded, ids, 15, temperature=0.0)) == want
    code, text, err = run_cli(
        [
            "generate",
            str(out),
            "--prompt",
            "the cat",
            "--temperature",
            "0",
            "--max-new-tokens",
            "15",
            "--stats",
        ],
        capsys,
    )
    assert code == 0 and text == "the cat" + tok.decode(want) + "\n" and f"(int{bits})" in err
    # the file on disk shrinks too
    float_size = (Path(meta["path"]) / "model.safetensors").stat().st_size
    assert (out / "model.safetensors").stat().st_size < float_size
    code, _, err = run_cli(["export", str(out), "--out", str(tmp_path / "hf")], capsys)
    assert code == 2 and "export the run it was quantized from" in err and not (tmp_path / "hf").exists()
    # training it further is refused before any data is read, naming the run to resume instead
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat\n" * 50, encoding="utf-8")
    code, _, err = run_cli(["train", "--resume", str(out), f"data.path={corpus}"], capsys)
    assert code == 2 and "cannot be trained further" in err and str(trained_run) in err
    assert not (out / "checkpoints").exists()


def test_quantize_cli_bad_input(trained_run, tmp_path, capsys):  # noqa: F811
    code, _, err = run_cli(
        ["quantize", str(trained_run), "--bits", "3", "--out", str(tmp_path / "x")], capsys
    )
    assert code == 2 and "invalid choice" in err
    code, _, err = run_cli(
        ["quantize", str(tmp_path / "missing"), "--bits", "8", "--out", str(tmp_path / "x")], capsys
    )
    assert code == 2 and "does not exist" in err
    code, _, err = run_cli(
        ["quantize", str(trained_run), "--bits", "4", "--group-size", "5", "--out", str(tmp_path / "x")],
        capsys,
    )
    assert code == 2 and "group_size" in err
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("precious")
    code, _, err = run_cli(
        ["quantize", str(trained_run), "--bits", "8", "--out", str(tmp_path / "taken")], capsys
    )
    assert code == 2 and "already exists" in err
    assert (tmp_path / "taken" / "keep.txt").read_text() == "precious"
    code, _, err = run_cli(["generate", str(trained_run), "--prompt", "x", "--quantize", "3"], capsys)
    assert code == 2 and "invalid choice" in err


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_weights_follow_the_activation_dtype(bits):
    """bf16 activations get a bf16 dequantized weight (the fp32 dequantization rounded once), so a
    bf16 model runs quantized without dtype errors."""
    torch.manual_seed(0)
    w = torch.randn(24, 40)
    ql = QuantLinear.from_float(w, bits, 8)
    deq = ql.dequantize(dtype=torch.bfloat16)
    assert deq.dtype == torch.bfloat16
    torch.testing.assert_close(deq, ql.dequantize().to(torch.bfloat16), rtol=0, atol=0)
    x = torch.randn(3, 40, dtype=torch.bfloat16)
    y = ql(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), x.float() @ deq.float().T, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("bits", [8, 4])
def test_a_quantized_bf16_mla_model_decodes_from_its_cache(bits):
    """A bf16 MLA model, quantized: cached decoding reads kv_b_proj's weight for the absorbed attention
    (dequantized) in the activations' dtype, and gives the uncached forward's logits up to bf16 rounding."""
    from minimoe.model.transformer import Transformer

    torch.manual_seed(0)
    model = quantize_model(Transformer(tiny_cfg("mla", mtp_depth=0)).to(torch.bfloat16).eval(), bits, 8)
    idx = torch.randint(0, 97, (1, 20))
    cache = model.make_cache(1, 32)
    with torch.no_grad():
        model(idx[:, :19], cache=cache)
        step = model(idx[:, 19:], cache=cache).logits[:, -1]
        full = model(idx).logits[:, -1]
    assert step.dtype == torch.bfloat16
    torch.testing.assert_close(step.float(), full.float(), rtol=5e-2, atol=5e-2)


def test_int8_scales_are_per_output_row_even_for_square_weights():
    """One scale per output row (max |w| / 127), checked row by row against a plain loop, on a square
    weight whose rows differ in size, so a transposed scale cannot pass by shape."""
    torch.manual_seed(0)
    w = torch.randn(16, 16) * torch.logspace(-2, 1, 16)[:, None]
    q, scale = quantize_tensor(w, 8)
    assert scale.shape == (16, 1)
    deq = dequantize_tensor(q, scale, 8, 16)
    for r in range(16):  # slow reference
        s = float(w[r].abs().max()) / 127
        assert abs(float(scale[r, 0]) - s) <= 1e-6 * s
        assert q[r].tolist() == [max(-127, min(127, round(float(v) / float(scale[r, 0])))) for v in w[r]]
        assert float((deq[r] - w[r]).abs().max()) <= s / 2 + 1e-7


@pytest.mark.parametrize("bits", [8, 4])
def test_zero_and_tiny_weights_quantize_to_finite_values(bits):
    """An all-zero row (int8) or group (int4), and one far below fp16's normal range, have no scale of
    0 to divide by: they come back as zeros, and the rest of the tensor as before."""
    w = torch.randn(4, 32)
    w[1] = 0.0
    w[2, :16] = 1e-9
    q, scale = quantize_tensor(w, bits, group_size=16)
    back = dequantize_tensor(q, scale, bits, 32)
    assert torch.isfinite(back).all() and bool((scale > 0).all())
    assert torch.equal(back[1], torch.zeros(32))
    assert back[2, :16].abs().max() < 1e-6
    assert (back[0] - w[0]).abs().max() <= w[0].abs().max() / (254 if bits == 8 else 14) * 1.01


def test_int8_kernel_probe_refuses_a_kernel_that_disagrees(monkeypatch):
    int8_kernel_works.__wrapped__.cache_clear()  # under torch.compiler.disable
    try:
        monkeypatch.setattr(torch, "_weight_int8pack_mm", lambda x, q, s: torch.zeros(x.shape[0], q.shape[0]))
        assert not int8_kernel_works("cpu", torch.float32)
    finally:
        monkeypatch.undo()
        int8_kernel_works.__wrapped__.cache_clear()  # under torch.compiler.disable


def test_heldout_ids_end_each_document_with_eos(tmp_path):
    from minimoe.data import Tokenizer
    from minimoe.infer.quantize import heldout_ids

    tok = Tokenizer.byte()
    src = tmp_path / "docs.jsonl"
    src.write_text(json.dumps({"text": "ab"}) + "\n" + json.dumps({"text": "cde"}) + "\n", encoding="utf-8")
    want = tok.encode("ab") + [tok.eos_id] + tok.encode("cde") + [tok.eos_id]
    assert heldout_ids(tok, src, 100).tolist() == want
    assert heldout_ids(tok, src, 4).tolist() == want[:4]
