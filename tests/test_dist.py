"""Distributed training on 2 gloo processes against one process: DDP, FSDP2, expert parallelism (layer
and training run), pipeline parallelism, and checkpoints that resume on another world size.

Process start and torch import cost a few seconds, so one start of 2 ranks (ranks.py) runs every 2-rank
scenario in turn and writes what it saw to JSON; the tests compare that with one-process runs made here.
One start of 4 ranks checks what 2 cannot show: expert parallelism with replicas of each shard.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import traceback
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from ranks import init_gloo, run_ranks

from minimoe.config import ModelConfig, RunConfig
from minimoe.config_yaml import build_run_config
from minimoe.errors import ConfigError, MinimoeError
from minimoe.train.run import train_from_config
from tiny import TINY_MODEL, TINY_TRAIN

TINY = [
    *TINY_TRAIN,
    "train.lr=1e-2", "train.eval_every=4",
    "data.val_fraction=0.05",  # enough validation windows for 2 ranks to evaluate the same ones
    "train.device=cpu",  # gloo everywhere, also on a machine with one GPU
]  # fmt: skip
STEPS = ["train.max_steps=4", "train.grad_accum=2"]  # accumulation: DDP/FSDP no_sync, pipeline scaling
# pipeline stages: no MTP, untied head, a z-loss added where it arises; 2 micro-batches of 2 sequences
PP_MODEL = [
    "model.mtp_depth=0",
    "model.tie_word_embeddings=false",
    "model.num_hidden_layers=3",
    "model.z_loss_coef=1e-3",
]
SCENARIOS = {  # name -> overrides of a 4-step 2-rank run, compared with the same run in one process
    "fsdp": ["dist.strategy=fsdp"],
    "ep": ["dist.expert_parallel=2"],
    "pp": PP_MODEL + ["dist.pipeline_parallel=2", "dist.pp_microbatches=2"],
}
# a capacity of one pair per expert and forward: 2 micro-batches of 2 x 32 tokens route 2 x 128 pairs per
# layer and keep one per expert that got any (2 to 4 of the 4), so a step drops 248 to 252 per layer
PP_CAPACITY = PP_MODEL + [
    "dist.pipeline_parallel=2", "dist.pp_microbatches=2", "model.capacity_factor=0.01",
    "train.max_steps=2", "train.eval_every=100",
]  # fmt: skip
# noise that draws from each rank's own random stream every step: a resume on the same ranks must restore
# every rank's stream (rank 0's alone would change rank 1's dropout masks and jitter)
NOISY = ["train.max_steps=8", "model.dropout=0.1", "model.router_jitter=0.1"]
RESUME_ON_2 = {  # one-process checkpoints continued on 2 ranks: each way of loading a full state
    "ep": ["dist.expert_parallel=2"],
    "fsdp": ["dist.strategy=fsdp"],
    "pp": ["dist.pipeline_parallel=2"],
}
TOL = 1e-5
# the first test holds the 2-rank fixture: 2 x 120 s for a hung start of the ranks and 2 x 180 s for
# torchrun at worst, plus the runs themselves on a slow host
pytestmark = pytest.mark.timeout(1200)


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _metric(run_dir: Path, key: str) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if key in r}


def _grad_norms(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["grad_norm"] for r in rows if "grad_norm" in r}


def _val(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}


# ------------------------------------------------------------------------------------------ rank code


def _ep_layer_check(rank: int, dtype: torch.dtype, impl: str, dead: list[int]) -> dict:
    """EP MoE layer on 2 ranks vs the whole layer in one process: max abs differences."""
    from minimoe.dist.ep import shard_experts
    from minimoe.model.moe import MoE

    cfg = ModelConfig(
        hidden_size=16, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
        n_shared_experts=1, moe_impl=impl, initializer_range=0.3,
    ).validate()  # fmt: skip
    torch.manual_seed(0)
    ref = MoE(cfg).to(dtype)
    with torch.no_grad():
        ref.gate.weight.normal_(0.0, 1.0)
        ref.gate.e_score_correction_bias[dead] = -10.0  # these experts get no token at all
    x = torch.randn(4, 5, 16, dtype=dtype)
    g = torch.randn(4, 5, 16, dtype=dtype)
    rows = slice(2 * rank, 2 * rank + 2)  # this rank's half of the batch

    xr = x.clone().requires_grad_()
    y_ref, st_ref = ref(xr)
    (y_ref * g).sum().backward()

    class Holder(torch.nn.Module):
        def __init__(self, moe):
            super().__init__()
            self.moe = moe

        def moe_layers(self):
            return {0: self.moe}

    torch.manual_seed(0)
    ep = MoE(cfg).to(dtype)
    ep.load_state_dict(ref.state_dict())
    sharded = shard_experts(Holder(ep), dist.group.WORLD)
    xl = x[rows].clone().requires_grad_()
    y, st = ep(xl)
    (y * g[rows]).sum().backward()
    loads = st.load.clone()
    dist.all_reduce(loads)
    mine = slice(2 * rank, 2 * rank + 2)  # the experts this rank holds
    remote = st.load.sum() - st.load[mine].sum() + (loads - st.load)[mine].sum()  # rows sent, rows received
    out = {
        "y": (y - y_ref[rows]).abs().max().item(),
        "x_grad": (xl.grad - xr.grad[rows]).abs().max().item(),
        "loads": (loads - st_ref.load).abs().max().item(),
        "sharded": sorted(sharded),
        "dead_load": loads[dead].sum().item(),
        "bytes_sent": abs(ep.experts.bytes_sent - remote.item() * 16 * x.element_size()),
    }
    lo, hi = 2 * rank, 2 * rank + 2
    for name, p in ep.named_parameters():
        ref_grad = dict(ref.named_parameters())[name].grad
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        if name.startswith("experts."):  # owner holds the sum over every rank's tokens
            out[name] = (grad - ref_grad[lo:hi]).abs().max().item()
        else:  # replicated: each rank has its own tokens' part
            grad = grad.clone()
            dist.all_reduce(grad)
            out[name] = (grad - ref_grad).abs().max().item()
    return out


def _paused_run(run_dir: Path, overrides: list[str], steps: int, ctx=None) -> None:
    """Train `steps` steps of a max_steps=8 run and stop with a checkpoint, as an interruption would."""
    from minimoe.data import prepare
    from minimoe.train.run import data_cache_dir
    from minimoe.train.trainer import Trainer

    cfg = build_run_config("tiny", None, overrides)  # what train_from_config uses without a preset
    data = prepare(
        cfg.data.path,
        "byte",
        data_cache_dir(cfg.data, None),
        cfg.data.val_fraction,
        workers=0,
        progress=False,
    )
    cfg.model.vocab_size = 320
    Trainer(cfg, run_dir, data, data.tokenizer(), progress=False, ctx=ctx).fit(stop_after=steps)


def _holds_weights(x) -> bool:
    """Whether `x` holds a model state dict's tensors (the embedding's, by its name)."""
    if isinstance(x, dict):
        return torch.is_tensor(x.get("embed_tokens.weight")) or any(map(_holds_weights, x.values()))
    return isinstance(x, list | tuple) and any(map(_holds_weights, x))


def _broadcast_state_check(ctx) -> dict:
    """`broadcast_state` of a nested state (every dtype a checkpoint holds, a non-contiguous tensor, a
    scalar, plain values): what each rank received equals rank 0's, and the one pickle it sends (the
    structure) holds no tensor."""
    import minimoe.dist.init as dist_init

    g = torch.Generator().manual_seed(0)
    state = {
        "w": torch.randn(3, 4, generator=g),
        "groups": [{"params": ["w", "b"], "lr": 0.1}, (torch.randn(4, 3, generator=g).t(), 7)],
        "step": torch.tensor(5.0),
        "bits": [
            torch.rand(5, generator=g) > 0.5,
            torch.arange(6).view(2, 3),
            torch.randn(2, generator=g).bfloat16(),
        ],
        "name": "adamw",
    }
    pickled = []
    real = dist_init.broadcast_object

    def spy(obj, ctx, src=0):
        out = real(obj, ctx, src)
        pickled.append(out)
        return out

    dist_init.broadcast_object = spy
    try:
        got = dist_init.broadcast_state(state if ctx.rank == 0 else None, ctx)
    finally:
        dist_init.broadcast_object = real

    def same(a, b) -> bool:
        if torch.is_tensor(a):
            return torch.is_tensor(b) and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)
        if isinstance(a, dict):
            return isinstance(b, dict) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
        if isinstance(a, list | tuple):
            return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
        return a == b

    def tensors_in(x) -> int:
        if torch.is_tensor(x):
            return 1
        items = x.values() if isinstance(x, dict) else x if isinstance(x, list | tuple) else ()
        return sum(map(tensors_in, items))

    from minimoe.dist.init import all_gather_object

    return {
        "equal": all_gather_object(same(state, got), ctx),
        "pickled_tensors": sum(map(tensors_in, pickled)),
    }


def _rank_main(rank: int, port: int, root: str, corpus: str, out_json: str) -> None:
    torch.set_num_threads(1)
    init_gloo(rank, port)
    from minimoe.dist.init import all_gather_object, init_distributed

    root_p, result = Path(root), {}
    try:
        ctx = init_distributed("cpu")
        result["layer"] = {
            "fp64-loop": _ep_layer_check(rank, torch.float64, "loop", dead=[3]),
            "fp32-auto": _ep_layer_check(rank, torch.float32, "auto", dead=[1]),
            "rank1-idle": _ep_layer_check(rank, torch.float64, "loop", dead=[2, 3]),
        }
        base = TINY + [f"data.path={corpus}"]
        from minimoe.model.transformer import Transformer

        built, real_init = {}, Transformer.__init__  # scenario -> parameter elements built off "meta"

        def counted_init(self, *args, **kwargs):
            real_init(self, *args, **kwargs)
            built.setdefault(name, []).append(sum(p.numel() for p in self.parameters() if not p.is_meta))

        Transformer.__init__ = counted_init
        try:
            for name, extra in SCENARIOS.items():
                train_from_config(
                    overrides=base + STEPS + extra, run_dir=root_p / f"2r-{name}", progress=False
                )
        finally:
            Transformer.__init__ = real_init
        result["built"] = all_gather_object(built, ctx)
        train_from_config(overrides=base + PP_CAPACITY, run_dir=root_p / "2r-pp-capacity", progress=False)
        # checkpoints that change world size: 2 ranks pause at step 4 of 8 (resumed in one process
        # by the test), and one process's paused run continues here on 2 ranks
        for name, extra in (("ep", SCENARIOS["ep"]), ("fsdp", SCENARIOS["fsdp"])):
            _paused_run(root_p / f"pause2-{name}", base + ["train.max_steps=8"] + extra, 4, ctx)
        import minimoe.dist.init as dist_init

        pickled, real = [], dist_init.broadcast_object  # what the resumes below send as pickles
        dist_init.broadcast_object = lambda obj, ctx, src=0: (
            pickled.append(real(obj, ctx, src)) or pickled[-1]
        )
        try:
            for name, extra in RESUME_ON_2.items():
                train_from_config(
                    overrides=extra, run_dir=root_p / f"pause1-{name}", resume=True, progress=False
                )
        finally:
            dist_init.broadcast_object = real
        result["pickled_weights"] = any(map(_holds_weights, pickled))
        # the same 2 ranks pause and resume, against the same run uninterrupted
        train_from_config(overrides=base + NOISY, run_dir=root_p / "2r-noisy-full", progress=False)
        _paused_run(root_p / "2r-noisy-paused", base + NOISY, 4, ctx)
        train_from_config(run_dir=root_p / "2r-noisy-paused", resume=True, progress=False)
        result["broadcast_state"] = _broadcast_state_check(ctx)
        result["ok"] = True
    except Exception:  # noqa: BLE001 - reported to the test instead of a bare spawn failure
        result["error"] = traceback.format_exc()
    if rank == 0:
        Path(out_json).write_text(json.dumps(result))
    dist.destroy_process_group()


def _ep_replicas_main(rank: int, port: int, out_json: str) -> None:
    """4 ranks, dist.expert_parallel=2: each expert shard has a replica in the other EP group. One
    backward of a rank's sequence through `parallelize`'s EP model vs the whole batch in one process:
    max abs differences of the gradients and the clipping norm, and of the gathered and loaded weights."""
    import copy

    from minimoe.dist.init import all_gather_object, init_distributed
    from minimoe.dist.parallel import parallelize
    from minimoe.model.transformer import Transformer

    torch.set_num_threads(1)
    init_gloo(rank, port, world_size=4)
    result = {}
    try:
        ctx = init_distributed("cpu")
        overrides = [*TINY_MODEL, "model.vocab_size=64", "train.seq_len=16", "train.batch_size=4"]
        cfg = build_run_config(None, None, [*overrides, "dist.expert_parallel=2"])
        torch.manual_seed(0)
        model = Transformer(cfg.model)
        ref = copy.deepcopy(model)
        g = torch.Generator().manual_seed(1)
        x, y = torch.randint(0, 64, (2, 4, 16), generator=g)
        ref(x, targets=y, return_logits=False).loss.backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), float("inf"))
        par = parallelize(model, cfg, ctx)
        ep_rank = dist.get_rank(par.ep_group)
        out = par.forward(x[rank : rank + 1], targets=y[rank : rank + 1], return_logits=False)
        out.loss.backward()
        par.finish_grads()
        diffs = {"norm": abs(par.clip_grad_norm(float("inf")).item() - ref_norm.item())}
        ref_p = dict(ref.named_parameters())
        for name, p in model.named_parameters():
            want = ref_p[name].grad
            if name in par.expert_params:  # this EP rank's experts
                n = p.shape[0]
                want = want[ep_rank * n : (ep_rank + 1) * n]
            diffs[name] = (p.grad - want).abs().max().item()
        full, _ = par.gather_state(torch.optim.SGD(model.parameters(), lr=0.0))
        if ctx.is_main:
            diffs["gathered"] = max((full[k] - v).abs().max().item() for k, v in ref.state_dict().items())
        new = {k: v + 1 for k, v in ref.state_dict().items()} if ctx.is_main else None
        par.load_state(None, new, None)
        for name, p in par.expert_params.items():
            n = p.shape[0]
            want = ref_p[name][ep_rank * n : (ep_rank + 1) * n] + 1
            diffs[f"loaded {name}"] = (p - want).abs().max().item()
        # the logging reductions: losses averaged, token counts and loads summed over the 4 ranks
        e = torch.arange(4.0)
        total, count, loads = par.reduce_eval(float(rank), rank + 1, {1: e * rank})
        diffs["reduce_eval"] = abs(total - 6) + abs(count - 10) + (loads[1] - 6 * e).abs().max().item()
        vals, loads = par.reduce_step(torch.tensor([float(rank)]), {1: e.long() * rank})
        diffs["reduce_step"] = abs(vals.item() - 1.5) + (loads[1] - 6 * e).abs().max().item()
        result["diffs"] = all_gather_object(diffs, ctx)
        result["groups"] = all_gather_object(
            (dist.get_process_group_ranks(par.ep_group), dist.get_process_group_ranks(par.replica_group)), ctx
        )
    except Exception:  # noqa: BLE001 - reported to the test instead of a bare spawn failure
        result["error"] = traceback.format_exc()
    if rank == 0:
        Path(out_json).write_text(json.dumps(result))
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    old = os.environ.get("MINIMOE_CACHE")
    os.environ["MINIMOE_CACHE"] = str(root / "cache")
    words = "the cat sat on a mat and the dog ran to the red ball while a bird sang".split()
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(words[i] for i in torch.randint(0, len(words), (12,), generator=g)) for _ in range(400)]
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    yield root, corpus
    if old is None:
        os.environ.pop("MINIMOE_CACHE", None)
    else:
        os.environ["MINIMOE_CACHE"] = old


@pytest.fixture(scope="module")
def two_ranks(env):
    """Run every 2-rank scenario once; return what rank 0 reported."""
    root, corpus = env
    base = TINY + [f"data.path={corpus}"]

    def fresh():  # what the ranks start from, again before a retried start (ranks.py)
        for d in root.glob("2r-*"):
            shutil.rmtree(d)
        for d in root.glob("pause*"):
            shutil.rmtree(d)
        for name in RESUME_ON_2:  # continued on 2 ranks
            model = PP_MODEL if name == "pp" else []
            _paused_run(root / f"pause1-{name}", base + ["train.max_steps=8"] + model, 4)

    out = root / "ranks.json"
    run_ranks(_rank_main, args=(str(root), str(corpus), str(out)), before=fresh)
    result = json.loads(out.read_text())
    assert "error" not in result, result["error"]
    # DDP through the command line: torchrun's environment, the process group made by minimoe itself
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "minimoe", "train", "--data", str(corpus), "--out", str(root / "2r-ddp"), "--no-progress"]
    out, err, code = _torchrun(cmd + TINY + STEPS + ["dist.strategy=ddp"], root / "2r-ddp")
    assert code == 0, err[-3000:]
    result["cli_stdout"] = out
    return result


def _torchrun(cmd: list[str], run_dir: Path, timeout_s: float = 180) -> tuple[str, str, int]:
    """Run a torchrun command; a start that hangs is stopped and tried once more. (stdout, stderr,
    exit code)."""
    for attempt in (1, 2):
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = proc.communicate(timeout=timeout_s)
            return out, err, proc.returncode
        except subprocess.TimeoutExpired:
            proc.terminate()  # SIGTERM: torchrun stops its workers, which live in their own sessions
            try:
                _, err = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
        warnings.warn(f"torchrun hung (attempt {attempt}): {err[-3000:]}", stacklevel=2)
        shutil.rmtree(run_dir, ignore_errors=True)
    raise AssertionError(f"torchrun did not finish in {timeout_s:.0f} s twice")


def _one_process(root: Path, corpus: Path, name: str, extra: list[str], steps=STEPS) -> Path:
    run = root / f"1p-{name}"
    if not run.exists():
        train_from_config(
            overrides=TINY + [f"data.path={corpus}"] + steps + extra, run_dir=run, progress=False
        )
    return run


# ------------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("case", ["fp64-loop", "fp32-auto", "rank1-idle"])
def test_expert_parallel_layer_matches_one_process(two_ranks, case):
    res = two_ranks["layer"][case]
    tol = 1e-10 if case != "fp32-auto" else 1e-5
    assert res["sharded"] == ["moe.experts.down_proj", "moe.experts.gate_proj", "moe.experts.up_proj"]
    assert res["loads"] == 0 and res["dead_load"] == 0  # global counts, dead experts really unused
    diffs = {k: v for k, v in res.items() if k not in ("sharded", "loads", "dead_load")}
    assert max(diffs.values()) < tol, diffs


def test_fsdp_builds_the_full_model_on_rank_0_alone(two_ranks):
    """Under FSDP rank 1 builds its model on the meta device (its shards come from rank 0), so a model
    that fits a rank only in shards can be trained; the other launches build it everywhere."""
    rank0, rank1 = two_ranks["built"]
    full = rank0["ep"][0]  # the same model, built whole by both ranks under expert parallelism
    assert full > 0 and rank1["ep"] == [full] and rank1["pp"][0] > 0
    # (a model built on "meta" for its shapes alone may follow: rank 0 checks a checkpoint against one)
    assert rank0["fsdp"][0] == full and not any(rank0["fsdp"][1:])
    assert rank1["fsdp"] and not any(rank1["fsdp"])


@pytest.mark.parametrize("name", ["ddp", *SCENARIOS])
def test_two_ranks_match_one_process(env, two_ranks, name):
    """Same global batch on 2 ranks and in 1 process: same losses, same gradient norms (over every
    rank's shard, of the mean loss), same validation loss."""
    root, corpus = env
    model = PP_MODEL if name == "pp" else []
    one = _one_process(root, corpus, "pp" if name == "pp" else "base", model)
    two = root / f"2r-{name}"
    l1, l2 = _losses(one), _losses(two)
    assert sorted(l2) == [1, 2, 3, 4]
    for s in l1:
        assert l2[s] == pytest.approx(l1[s], abs=TOL), (name, s, l1, l2)
    g1, g2 = _grad_norms(one), _grad_norms(two)
    assert sorted(g2) == [1, 2, 3, 4]
    for s in g1:
        assert g2[s] == pytest.approx(g1[s], rel=1e-5), (name, s, g1, g2)
    assert _val(two)[4] == pytest.approx(_val(one)[4], abs=TOL)
    # the unweighted router z the spike alert watches: per-rank (or per-micro-batch) means averaged
    z1, z2 = (_metric(run, "router_z") for run in (one, two))
    assert min(z1.values()) > 0 and z2 == pytest.approx(z1, rel=1e-4), (name, z1, z2)
    # routing: loads summed over ranks (training and validation), every layer's bias wherever it lives
    # (every layer present; the values to within a token's share, so that a top-k near-tie decided the
    # other way by another CPU's rounding does not fail the test)
    for key in ("load_frac", "bias_range"):
        m1, m2 = _metric(one, key), _metric(two, key)
        assert {s: sorted(v) for s, v in m2.items()} == {s: sorted(v) for s, v in m1.items()}, (name, key)
        for s in m1:
            for layer in m1[s]:
                assert m2[s][layer] == pytest.approx(m1[s][layer], abs=0.01), (name, key, s, layer)
    assert _metric(two, "val_max_vio_global") == pytest.approx(_metric(one, "val_max_vio_global"), abs=1e-6)
    if name == "ddp":  # rank 0 alone printed the summary
        assert two_ranks["cli_stdout"].count("checkpoint:") == 1, two_ranks["cli_stdout"]
    # rank 0 alone wrote the run: one metrics row per step, one checkpoint, the one-process format
    from minimoe.train.checkpoint import load_run

    model_2, _, cfg, meta = load_run(two)
    model_1, *_ = load_run(one)
    assert meta["step"] == 4
    sd1, sd2 = model_1.state_dict(), model_2.state_dict()
    assert sd1.keys() == sd2.keys()
    for k in sd1:
        assert torch.allclose(sd1[k], sd2[k], atol=1e-4), k


def test_pipeline_counts_the_pairs_a_capacity_dropped(env, two_ranks):
    """Under pipeline parallelism the metrics count the pairs a capacity dropped in every MoE layer,
    whichever stage holds it, summed over the pipeline's micro-batches, as one process counts them."""
    root, _ = env
    rows = [json.loads(line) for line in (root / "2r-pp-capacity" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert sorted(r["dropped"]) == ["1", "2"], r  # layer 1 on stage 0, layer 2 on stage 1
        assert all(248 <= d <= 252 for d in r["dropped"].values()), r
        assert r["dropped_frac"] == pytest.approx(sum(r["dropped"].values()) / (2 * 256))


@pytest.mark.parametrize("name", ["ep", "fsdp"])
def test_two_rank_checkpoint_resumes_in_one_process(env, two_ranks, name):
    root, corpus = env
    full = _losses(_one_process(root, corpus, "8steps", [], steps=["train.max_steps=8"]))
    run = root / f"pause2-{name}"
    assert sorted(_losses(run)) == [1, 2, 3, 4]
    train_from_config(run_dir=run, resume=True, progress=False)  # one process
    resumed = _losses(run)
    assert sorted(resumed) == list(range(1, 9))
    for s in range(1, 9):
        assert resumed[s] == pytest.approx(full[s], abs=TOL), (s, resumed, full)


def test_two_ranks_resume_on_two_ranks_with_each_ranks_random_stream(env, two_ranks):
    """Dropout and router jitter draw from each rank's stream: paused at step 4 and resumed on the same
    2 ranks, the run's losses equal the uninterrupted run's at every step."""
    root, _ = env
    full, resumed = _losses(root / "2r-noisy-full"), _losses(root / "2r-noisy-paused")
    assert sorted(full) == sorted(resumed) == list(range(1, 9))
    for s in range(1, 9):
        assert resumed[s] == pytest.approx(full[s], abs=TOL), (s, resumed, full)


def test_broadcast_state_sends_tensors_apart_from_the_structure(two_ranks):
    """What a resume's full state dicts go through: every rank receives rank 0's state, and no tensor
    goes through the pickle (under NCCL a pickle of the whole state would be put on every GPU)."""
    check = two_ranks["broadcast_state"]
    assert check == {"equal": [True, True], "pickled_tensors": 0}
    assert two_ranks["pickled_weights"] is False  # the resumes on 2 ranks sent no weight as a pickle


@pytest.mark.parametrize("name", list(RESUME_ON_2))
def test_one_process_checkpoint_resumes_on_two_ranks(env, two_ranks, name):
    root, corpus = env
    model = PP_MODEL if name == "pp" else []
    ref = "8steps-pp" if name == "pp" else "8steps"
    full = _losses(_one_process(root, corpus, ref, model, steps=["train.max_steps=8"]))
    resumed = _losses(root / f"pause1-{name}")
    assert sorted(resumed) == list(range(1, 9))
    for s in range(1, 9):
        assert resumed[s] == pytest.approx(full[s], abs=TOL), (s, resumed, full)


def test_export_and_generate_work_on_a_distributed_run(env, two_ranks, capsys):
    from minimoe.cli.main import main
    from minimoe.infer.generate import generate_text
    from minimoe.train.checkpoint import load_run

    root, _ = env
    model, tok, cfg, _ = load_run(root / "2r-ep")  # experts were sharded over 2 ranks
    assert cfg.dist.expert_parallel == 2 and model.layers[1].mlp.experts.up_proj.shape[0] == 4
    text = generate_text(model, tok, "the", max_new_tokens=5, temperature=0.0)
    assert isinstance(text, str)
    assert main(["export", str(root / "2r-ep"), "--out", str(root / "hf-ep")]) == 0
    assert (root / "hf-ep" / "config.json").exists()


def test_expert_parallel_with_replicas_matches_one_process(tmp_path):
    """dist.expert_parallel=2 on 4 ranks: the shards' replicas (the other EP group) add their gradients,
    the clipping norm counts each expert once, checkpoints gather and slice by the rank in the EP group."""
    out = tmp_path / "ranks.json"
    run_ranks(_ep_replicas_main, args=(str(out),), nprocs=4)
    result = json.loads(out.read_text())
    assert "error" not in result, result["error"]
    assert result["groups"] == [[[0, 1], [0, 2]], [[0, 1], [1, 3]], [[2, 3], [0, 2]], [[2, 3], [1, 3]]]
    for rank, diffs in enumerate(result["diffs"]):
        assert max(diffs.values()) < 1e-5, (rank, diffs)


# ------------------------------------------------------------------------------------------ config


def test_dist_config_errors():
    def cfg(*overrides):
        return build_run_config(None, None, list(overrides))

    with pytest.raises(ConfigError, match="dist.expert_parallel \\(3\\) does not divide"):
        cfg("dist.expert_parallel=3")
    with pytest.raises(ConfigError, match="dist.pipeline_parallel must be at least 1"):
        cfg("dist.pipeline_parallel=0")
    with pytest.raises(ConfigError, match="dist.strategy must be one of"):
        cfg("dist.strategy=zero3")


@pytest.mark.parametrize(
    "overrides, world, match",
    [
        (["train.batch_size=3"], 2, "divisible by the 2 data-parallel"),
        (["dist.expert_parallel=4"], 2, "must divide the number of processes"),
        (["dist.expert_parallel=2", "dist.strategy=fsdp"], 2, "works with dist.strategy=ddp"),
        (["dist.pipeline_parallel=2"], 4, "must equal the number of processes"),
        (["dist.pipeline_parallel=2", "model.mtp_depth=1"], 2, "does not support MTP"),
        (["dist.pipeline_parallel=2", "model.mtp_depth=0"], 2, "untied embeddings"),
        (
            [
                "dist.pipeline_parallel=2",
                "model.mtp_depth=0",
                "model.tie_word_embeddings=false",
                "dist.pp_microbatches=1",
            ],
            2,
            "at least as many micro-batches",
        ),  # fmt: skip
    ],
)
def test_unsupported_launches_are_refused(overrides, world, match):
    from minimoe.dist.parallel import check_launch

    cfg = build_run_config("tiny", None, ["train.batch_size=4", "model.n_routed_experts=8", *overrides])
    with pytest.raises(MinimoeError, match=match):
        check_launch(cfg, world)


def test_one_process_ignores_dist_settings(caplog):
    from minimoe.dist.init import DistContext
    from minimoe.dist.parallel import parallelize
    from minimoe.model.transformer import Transformer

    cfg = RunConfig(
        model=ModelConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, vocab_size=64)
    )
    cfg.dist.expert_parallel = 2
    model = Transformer(cfg.model)
    par = parallelize(model, cfg, DistContext())
    assert par.kind == "single" and par.forward is model and par.dp_size == 1
    assert "dist.expert_parallel=2 needs several processes" in caplog.text
    cfg.dist.expert_parallel, cfg.dist.strategy = 1, "fsdp"  # said too, not only the parallel degrees
    caplog.clear()
    assert parallelize(model, cfg, DistContext()).forward is model
    assert "dist.strategy=fsdp needs several processes" in caplog.text


@pytest.mark.parametrize("optim", ["train.optimizer=muon", "train.weight_decay=0"])
def test_pipeline_checkpoint_keeps_each_parameter_in_its_optimizer_group(optim):
    """Stages' optimizer states merge into the one-process param groups, also when a stage lacks a
    group: with Muon, a middle stage of dense blocks has no AdamW matrix (no embedding, head or
    router), so its norms must not land in the AdamW group with weight decay. Without weight decay
    AdamW's two groups have the same settings: a stage's groups still go to different groups."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    from minimoe.dist.parallel import _merge_stages
    from minimoe.dist.pipeline import PipelineStageModule, split_layers
    from minimoe.model.transformer import Transformer
    from minimoe.train.optim import build_optimizer

    cfg = build_run_config(None, None, PP_MODEL + ["model.first_k_dense_replace=2", optim])
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    ranges = split_layers(cfg.model.num_hidden_layers, 3)
    stages = [PipelineStageModule(model, r, i == 0, i == 2) for i, r in enumerate(ranges)]
    parts = []
    for stage in stages:
        opt = build_optimizer(stage, cfg.train, torch.device("cpu"))
        parts.append(({}, get_optimizer_state_dict(stage, opt)))
    assert len(parts[1][1]["param_groups"]) == 2  # the middle stage: Muon and the norms (or AdamW's two)
    _, merged = _merge_stages(parts)
    whole = get_optimizer_state_dict(model, build_optimizer(model, cfg.train, torch.device("cpu")))

    def groups(osd):
        return [(g.get("use_muon"), g["weight_decay"], sorted(g["params"])) for g in osd["param_groups"]]

    assert groups(merged) == groups(whole)


def test_split_layers_gives_the_extra_blocks_to_the_first_stages():
    from minimoe.dist.pipeline import split_layers

    assert split_layers(3, 2) == [range(0, 2), range(2, 3)]  # the last stage also runs the LM head
    assert split_layers(7, 3) == [range(0, 3), range(3, 5), range(5, 7)]
    assert split_layers(4, 4) == [range(i, i + 1) for i in range(4)]


def test_sync_expert_grads_counts_an_expert_without_gradient_as_zero():
    """An expert shard that no token reached on any rank has no gradient: the sync gives it zeros (the
    optimizer then steps it like every other shard) and divides the others by the world size."""
    from minimoe.dist.ep import sync_expert_grads

    reached, idle = torch.nn.Parameter(torch.ones(2, 3)), torch.nn.Parameter(torch.ones(4))
    reached.grad = torch.full((2, 3), 6.0)
    sync_expert_grads([reached, idle], None, 3)
    assert torch.equal(reached.grad, torch.full((2, 3), 2.0)) and torch.equal(idle.grad, torch.zeros(4))


def test_the_loop_never_branches_on_the_kind_of_parallelism():
    """The training loop calls Parallel's methods; the pipeline (and every other launch) is Parallel's
    business, so the loop body names none of them."""
    import inspect

    from minimoe.train.trainer import Trainer

    for method in (Trainer.fit, Trainer._fit, Trainer._train_step, Trainer.evaluate):
        src = inspect.getsource(method)
        for word in ("pipeline", "pipe ", "pipe.", ".kind", "no_sync"):
            assert word not in src, f"Trainer.{method.__name__} mentions {word!r}"
