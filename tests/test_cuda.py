"""The CUDA paths against the CPU and eager ones: forward and backward, the grouped expert kernel,
bf16 autocast training, and the fixed-shape decode step replayed as CUDA graphs. Skipped without a
CUDA GPU (CI has none); run them where one is: `python -m pytest tests/test_cuda.py`."""

from __future__ import annotations

import os

import pytest
import torch

from minimoe.config import ModelConfig
from minimoe.model.transformer import Transformer

# MINIMOE_TEST_DEVICE=cpu runs the same checks on the CPU (a dry run of this file, no CUDA graphs)
CUDA = torch.device(os.environ.get("MINIMOE_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(
    CUDA.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU"
)
PROMPTS = [[5, 17, 3], [60, 2, 2, 9, 41, 8, 77, 30, 12], [11], [90, 4, 4, 4, 4, 23]]


def cfg(attn_type: str = "mla", **kw) -> ModelConfig:
    base = dict(
        vocab_size=128, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, intermediate_size=128, n_routed_experts=8,
        num_experts_per_tok=2, moe_intermediate_size=32, max_position_embeddings=128, attn_type=attn_type,
    )  # fmt: skip
    base.update(kw)
    return ModelConfig(**base)


def model_on(device, attn_type: str = "mla", seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(cfg(attn_type, **kw)).to(device).eval()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(autouse=True)
def no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("attn_type", ["mla", "gqa"])
def test_forward_and_backward_on_cuda_equal_the_cpu(attn_type):
    cpu = model_on("cpu", attn_type, mtp_depth=1).train()
    gpu = model_on("cpu", attn_type, mtp_depth=1).to(CUDA).train()
    ids = torch.randint(0, 128, (4, 48), generator=torch.Generator().manual_seed(1))
    targets = ids.roll(-1, 1)
    outs = []
    for model, device in ((cpu, "cpu"), (gpu, CUDA)):
        out = model(ids.to(device), targets.to(device))
        out.loss.backward()
        grads = [p.grad.detach().cpu() for p in model.parameters() if p.grad is not None]
        outs.append((out.logits.detach().cpu(), out.loss.detach().cpu(), grads))
    (lc, sc, gc), (lg, sg, gg) = outs
    assert rel(lg, lc) < 1e-5 and abs(float(sg - sc)) < 1e-5
    assert len(gg) == len(gc) and max(rel(a, b) for a, b in zip(gg, gc)) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_experts_on_cuda_equal_the_loop(dtype):
    from minimoe.model.experts import grouped_mm_experts, grouped_mm_works, loop_experts

    gen = torch.Generator().manual_seed(2)
    counts = torch.tensor([5, 0, 17, 3, 40, 1, 0, 9])
    x = torch.randn(int(counts.sum()), 64, generator=gen)
    w = [torch.randn(8, 32, 64, generator=gen) / 8, torch.randn(8, 32, 64, generator=gen) / 8]
    w.append(torch.randn(8, 64, 32, generator=gen) / 6)
    args = [t.to(CUDA, dtype) for t in (x, *w)]
    want = loop_experts(args[0].double(), counts.to(CUDA), *(t.double() for t in args[1:]))
    works = grouped_mm_works(CUDA.type, dtype, True, True)
    if dtype == torch.bfloat16 and CUDA.type == "cuda":
        assert works, "grouped_mm should run bf16 on a CUDA GPU"
    if works:
        got = grouped_mm_experts(args[0], counts.to(CUDA), *args[1:])
        assert rel(got, want) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_training_on_cuda_picks_bf16_and_learns(tmp_path):
    from minimoe.train.run import train_from_config
    from tiny import TINY_TRAIN

    text = "the cat sat on the mat and the dog ran to the red ball while a bird sang. " * 400
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(text)
    overrides = [o for o in TINY_TRAIN if not o.startswith("train.precision")]
    run = tmp_path / "run"
    result = train_from_config(
        "tiny", None, overrides + [f"data.path={corpus}", f"train.device={CUDA.type}", "train.max_steps=60",
        "train.precision=auto", "train.lr=3e-3"], run, progress=False, sample=False,
    )  # fmt: skip
    want = "bf16" if CUDA.type == "cuda" else None
    config = (run / "config.yaml").read_text()
    if want:
        assert "precision: bf16" in config, config
    assert (
        result.step == 60 and result.train_loss is not None and result.train_loss < 4.0
    )  # ln 256 = 5.5 untrained


@pytest.mark.skipif(CUDA.type != "cuda", reason="the fp16 GradScaler runs on CUDA only")
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_fp16_training_clips_the_unscaled_gradients(tmp_path, optimizer):
    """Under fp16 the GradScaler multiplies the loss by 2^16: the gradients are unscaled before they are
    clipped, so the logged norms are the model's own (a clip before the unscale would log norms around
    65,536 times larger and clip every step to nothing), and the run learns."""
    import json

    from minimoe.train.run import train_from_config
    from tiny import TINY_TRAIN

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat and the dog ran to the red ball. " * 300)
    overrides = [
        o for o in TINY_TRAIN if not o.startswith(("train.precision", "train.optimizer", "train.log_every"))
    ]
    run = tmp_path / "run"
    result = train_from_config(
        "tiny", None, overrides + [f"data.path={corpus}", "train.device=cuda", "train.precision=fp16",
        f"train.optimizer={optimizer}", "train.max_steps=60", "train.log_every=5", "train.lr=3e-3"],
        run, progress=False, sample=False,
    )  # fmt: skip
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"grad_norm"' in x]
    norms = [r["grad_norm"] for r in rows if r["grad_norm"] == r["grad_norm"]]
    assert norms and max(norms) < 1e3, norms
    assert result.step == 60 and result.train_loss < 4.0


def test_a_muon_run_on_cuda_resumes(tmp_path):
    """A checkpoint is read onto the CPU; the AdamW groups' step counters must reach the parameters'
    device before the fused kernel runs (torch's load_state_dict moves them only for fused groups)."""
    from minimoe.train.run import train_from_config
    from tiny import TINY_TRAIN

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat and the dog ran to the red ball. " * 200)
    overrides = [o for o in TINY_TRAIN if not o.startswith("train.optimizer")]
    run = tmp_path / "run"
    common = overrides + [f"data.path={corpus}", f"train.device={CUDA.type}", "train.optimizer=muon"]
    train_from_config("tiny", None, common + ["train.max_steps=3"], run, progress=False, sample=False)
    result = train_from_config(
        "tiny", None, common + ["train.max_steps=6"], run, progress=False, sample=False, resume=True
    )
    assert result.step == 6 and result.train_loss is not None


def prefilled(model, slots: int = 4, mtp: bool = False):
    """A pool on the model's device with the first three prompts prefilled into its rows."""
    from minimoe.infer.slots import Prefill, SlotPool

    pool = SlotPool(model, slots=slots, prefill_rows=3, max_len=64, mtp=mtp)
    pre = Prefill(pool)
    rows = [pre.add(p) for p in PROMPTS[:3]]
    first = {}
    while len(first) < len(rows):
        first.update(pre.step(12))
    if mtp:
        pre.first_draft(rows, [1, 1, 1])
    for r, p in zip(rows, PROMPTS[:3]):
        pool.add(len(p), src=r)
        pre.release(r)
    return pool, [int(first[r][0].argmax()) for r in rows]


@pytest.mark.parametrize("attn_type", ["mla", "gqa"])
def test_static_decode_replayed_as_cuda_graphs_equals_the_eager_step(attn_type):
    """Greedy decoding of three rows (one leaving at steps 2 and 5) through the compiled fixed-shape
    step, replayed as CUDA graphs, against the eager pooled step on a second pool: the same tokens and
    logits at every step, and no graph skipped."""
    from torch._dynamo.utils import counters

    from minimoe.infer.static import StaticDecode

    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        model = model_on(CUDA, attn_type)
        (pool, nxt), (ref, _) = prefilled(model), prefilled(model)
        static = StaticDecode(pool)
        assert static.cuda_graphs == (CUDA.type == "cuda")
        for step in range(12):
            if step in (2, 5):
                pool.remove(0)
                ref.remove(0)
                nxt[0] = nxt.pop()
            tokens = torch.tensor(nxt, device=CUDA)
            got, want = static.decode(tokens), ref.decode(tokens)
            assert got.argmax(-1).tolist() == want.argmax(-1).tolist()
            assert rel(got, want) < 1e-4
            nxt = want.argmax(-1).tolist()
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])


def test_cuda_graph_speculation_and_draft_equal_the_pool():
    """The speculative step (verify forward and MTP draft in one graph), the two-token forward and the
    separate draft, each replayed as a CUDA graph, against the pooled eager calls on the same cache:
    tokens, logits and draft logits, with rows accepting 2 or 1 tokens."""
    from torch._dynamo.utils import counters

    from minimoe.infer.static import StaticDecode

    torch._dynamo.reset()
    counters.clear()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        model = model_on(CUDA, "mla", mtp_depth=1)
        pool, _ = prefilled(model, mtp=True)
        static = StaticDecode(pool)
        for _ in range(4):
            n = pool.n
            tokens = torch.randint(0, 128, (n, 2), generator=g).to(CUDA)
            next_ids = torch.randint(0, 128, (n, 2), generator=g).to(CUDA)
            take = torch.randint(0, 2, (n,), generator=g).to(CUDA)
            want_logits, want_hidden = pool.forward(tokens)
            want_draft = pool.draft(want_hidden, next_ids, take)
            logits, hidden = static.forward(tokens)
            assert rel(logits, want_logits) < 1e-4 and rel(hidden, want_hidden) < 1e-4
            assert rel(static.draft(hidden, next_ids, take), want_draft) < 1e-4
            want, got = pool.speculate(tokens), static.speculate(tokens)
            assert got.best.tolist() == want.best.tolist()
            assert rel(got.logits, want.logits) < 1e-4
            assert rel(got.draft_logits, want.draft_logits) < 1e-4
            pool.advance((take + 1).tolist())
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])


@pytest.mark.parametrize("autocast", [False, True])
def test_cuda_graph_step_over_more_rows_than_the_cpu_gathers(autocast):
    """40 rows (80 expert rows, above GATHER_MAX_ROWS: on the CPU the compiled step runs the loop
    there, whose split sizes wait on the host, which a CUDA graph cannot), in fp32 and under bf16
    autocast (the engine's and the bench's serving precision): the CUDA-graph step runs, skips no
    graph, and gives the eager step's logits (fp32: its tokens too)."""
    from torch._dynamo.utils import counters

    from minimoe.infer.slots import Prefill, SlotPool
    from minimoe.infer.static import StaticDecode

    torch._dynamo.reset()
    counters.clear()
    g = torch.Generator().manual_seed(4)
    prompts = torch.randint(0, 128, (40, 5), generator=g).tolist()
    context = torch.autocast(CUDA.type, torch.bfloat16, enabled=autocast)
    with torch.no_grad(), context:
        model = model_on(CUDA, "mla")
        pools = [SlotPool(model, slots=40, max_len=32) for _ in range(2)]
        for pool in pools:
            for p in prompts:
                pre = Prefill(pool)
                row = pre.add(p)
                pre.step(len(p))
                pool.add(len(p), src=row)
        static = StaticDecode(pools[1])
        nxt = torch.randint(0, 128, (40,), generator=g).to(CUDA)
        for _ in range(4):
            want, got = pools[0].decode(nxt), static.decode(nxt)
            assert rel(got.float(), want.float()) < (2e-2 if autocast else 1e-4)
            if not autocast:
                assert got.argmax(-1).tolist() == want.argmax(-1).tolist()
            nxt = want.argmax(-1)
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])


@pytest.mark.parametrize("speculative", [False, True])
def test_engine_warms_up_on_its_worker_and_records_no_graph_while_serving(monkeypatch, speculative):
    """The serving engine with the compiled step (`Engine(compile=True)`): `warm_up` runs on the
    engine's worker thread (inductor's CUDA graph trees are per thread) and records every graph there,
    so serving records none; the greedy texts equal the eager engine's (plain and speculative)."""
    import threading

    from torch._inductor import cudagraph_trees

    from minimoe.data import Tokenizer
    from minimoe.serve.engine import Engine
    from minimoe.serve.jobs import Finish, Job, JobParams

    recorded = []  # the thread of each CUDA graph recorded
    real = cudagraph_trees.CUDAGraphTreeManager.record_function

    def record_function(self, *args, **kwargs):
        recorded.append(threading.current_thread().name)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(cudagraph_trees.CUDAGraphTreeManager, "record_function", record_function)
    torch._dynamo.reset()
    tok = Tokenizer.byte()
    model = model_on(CUDA, "mla", vocab_size=tok.vocab_size, mtp_depth=1 if speculative else 0)
    specs = [("the cat", 14), ("a dog ran to the red ball", 9), ("r", 12)]

    def texts(engine: Engine) -> dict[int, str]:
        finished, done = {}, threading.Event()

        def post(e):
            if isinstance(e, Finish):
                finished[e.index] = e.text
                if len(finished) == len(specs):
                    done.set()

        engine.submit([Job(i, tok.encode(p), JobParams(max_tokens=m, temperature=0), post)
                       for i, (p, m) in enumerate(specs)])  # fmt: skip
        engine.start()
        try:
            assert done.wait(300)
        finally:
            engine.close()
        return finished

    from torch._dynamo.utils import counters

    want = texts(Engine(model, tok, max_active=4, prefill_chunk=8, speculative=speculative))
    engine = Engine(model, tok, max_active=4, prefill_chunk=8, speculative=speculative, compile=True)
    counters.clear()
    assert engine.warm_up() > 0
    at_warm_up = list(recorded)
    assert set(at_warm_up) <= {"minimoe-engine"}
    assert bool(at_warm_up) == (CUDA.type == "cuda")
    # serving compiles nothing more: a recompile run only once would record no graph, so this catches it
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert texts(engine) == want
    assert recorded == at_warm_up  # serving replays what warm_up recorded
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
