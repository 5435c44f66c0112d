"""`minimoe bench`: the Hugging Face twin computes the same function, and the JSON report is complete.

Correctness only: no test here asserts a timing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from minimoe.bench.hf import hf_twin, max_logit_diff, pack_experts
from minimoe.cli.main import main
from minimoe.config_yaml import build_run_config
from minimoe.errors import MinimoeError
from minimoe.model.transformer import Transformer

REFERENCE = Path(__file__).resolve().parents[1] / "benchmarks" / "configs" / "hf-reference.yaml"
# the reference config's shape at a size that runs in seconds
SMALLER = ["model.hidden_size=64", "model.num_hidden_layers=2", "model.kv_lora_rank=32", "model.vocab_size=512",
           "model.moe_intermediate_size=64", "model.intermediate_size=128", "model.max_position_embeddings=640",
           "train.batch_size=2", "train.seq_len=32"]  # fmt: skip
REQUIRED_KEYS = [
    "train_tok_s", "hf_train_tok_s", "decode_b1_tok_s", "hf_decode_b1_tok_s", "decode_b8_tok_s",
    "hf_decode_b8_tok_s", "decode_b1_p512_tok_s", "hf_decode_b1_p512_tok_s", "matmul_peak_gflops", "mfu",
    "device", "threads", "dtype",
]  # fmt: skip

# no room for a prompt before `--quick`'s 32 new tokens (refused before anything is timed; a small model all
# the same)
NO_ROOM = [
    "model.num_hidden_layers=2",
    "train.batch_size=2",
    "train.seq_len=16",
    "model.max_position_embeddings=32",
]


def _model(overrides: list[str]) -> Transformer:
    rc = build_run_config(None, str(REFERENCE), overrides)
    torch.manual_seed(0)
    return Transformer(rc.model)


def test_reference_config_is_the_documented_shape():
    m = build_run_config(None, str(REFERENCE), []).model
    assert (m.hidden_size, m.num_hidden_layers, m.num_attention_heads, m.vocab_size) == (256, 4, 4, 4096)
    assert (m.kv_lora_rank, m.q_lora_rank, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim) == (
        64,
        None,
        32,
        16,
        32,
    )
    assert (m.first_k_dense_replace, m.n_routed_experts, m.num_experts_per_tok, m.n_shared_experts) == (
        1,
        8,
        2,
        1,
    )
    assert m.scoring_func == "sigmoid" and not m.tie_word_embeddings and m.mtp_depth == 0


@pytest.mark.parametrize("overrides", [[], ["model.n_group=4", "model.topk_group=2", "model.q_lora_rank=48"]])
def test_hf_twin_gives_the_same_logits(overrides):
    model = _model(overrides).eval()
    # a nonzero balancing bias changes which experts are chosen: the twin must copy it too
    with torch.no_grad():
        for block in (b for b in model.layers if b.is_moe):
            block.mlp.gate.e_score_correction_bias.copy_(torch.randn(model.cfg.n_routed_experts) * 0.05)
    hf = hf_twin(model)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 48))
    assert max_logit_diff(model, hf, ids) < 1e-4
    assert type(hf).__name__ == "DeepseekV3ForCausalLM"
    assert sum(p.numel() for p in hf.parameters()) == sum(p.numel() for p in model.parameters())


def test_pack_experts_layout():
    hub = {
        f"m.experts.{e}.{k}_proj.weight": torch.full((3, 2) if k != "down" else (2, 3), float(e))
        for e in range(4)
        for k in ("gate", "up", "down")
    }
    hub["m.gate.weight"] = torch.zeros(4, 2)
    out = pack_experts(hub)
    assert out["m.experts.gate_up_proj"].shape == (4, 6, 2) and out["m.experts.down_proj"].shape == (4, 2, 3)
    assert out["m.experts.gate_up_proj"][2].eq(2).all() and "m.gate.weight" in out


def test_hf_twin_refuses_what_transformers_cannot_hold():
    with pytest.raises(MinimoeError, match="mtp_depth"):
        hf_twin(_model(["model.mtp_depth=1"]))
    with pytest.raises(MinimoeError, match="softmax"):
        hf_twin(_model(["model.scoring_func=softmax"]))


def test_bench_quick_json_has_every_key(capsys):
    code = main(["bench", "--config", str(REFERENCE), "--against", "hf", "--quick", "--json", "--repeats", "1",
                 "--no-progress", *SMALLER])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    r = json.loads(out)
    for key in REQUIRED_KEYS:
        assert key in r, key
    for key in REQUIRED_KEYS[:-3]:
        assert isinstance(r[key], float) and r[key] > 0, (key, r[key])
    assert r["device"] == "cpu" and r["dtype"] == "fp32" and r["threads"] == torch.get_num_threads()
    assert r["logits_max_abs_diff"] < 1e-4
    assert r["train_ratio"] == pytest.approx(r["train_tok_s"] / r["hf_train_tok_s"])
    assert r["peak_mem_train_mib"] > 0 and "torch" in r and "cpu" in r


def test_bench_compiled_decode_and_the_bandwidth_ceiling():
    """`--compiled-decode`: every decode shape is also timed through the fixed-shape step, its ratio
    taken against transformers' plain decode of the same shape, its compile seconds kept apart; the
    batch-1 ceiling is the measured matrix-vector bandwidth over the activated weights' bytes."""
    from minimoe.bench.measure import BenchSettings, decode_ceiling_tok_s
    from minimoe.bench.run import benchmark, format_table
    from minimoe.config_yaml import build_run_config
    from minimoe.params import count_params

    rc = build_run_config(None, str(REFERENCE), SMALLER)
    settings = BenchSettings(repeats=1, new_tokens=4, prefill_shape=(1, 16), peak_size=64,
                             decode_shapes={"decode_b1": (1, 8), "decode_b2": (2, 8)},
                             compiled_decode=True, compile_backend="eager")  # fmt: skip
    r = benchmark(rc, "ref", settings, against="hf")
    for key in ("decode_b1", "decode_b2"):
        assert r[f"{key}_compiled_tok_s"] > 0 and r[f"{key}_compile_s"] > 0
        assert r[f"{key}_compiled_ratio"] == pytest.approx(r[f"{key}_compiled_tok_s"] / r[f"hf_{key}_tok_s"])
    assert "hf_decode_b1_compiled_tok_s" not in r
    activated = count_params(rc.model).activated
    assert activated < count_params(rc.model).total
    assert r["decode_ceiling_tok_s"] == pytest.approx(r["matvec_bandwidth_gib_s"] * 2**30 / (4 * activated))
    assert decode_ceiling_tok_s(rc, 1.0) == pytest.approx(2**30 / (4 * activated))
    assert r["decode_b1_compiled_ceiling_fraction"] == pytest.approx(
        r["decode_b1_compiled_tok_s"] / r["decode_ceiling_tok_s"]
    )
    table = format_table(r, True)
    assert (
        "| decode_b2_compiled |" in table and "batch-1 decode ceiling" in table and "compile seconds" in table
    )


@pytest.mark.parametrize("linear_first", [True, False])
def test_matvec_bandwidth_is_the_faster_of_the_one_row_linear_and_a_plain_read(monkeypatch, linear_first):
    """The ceiling's bandwidth: whichever of the two reads of the weight is faster, the BLAS's
    one-row product or a sum over its rows (the compiled step can read faster than the BLAS)."""
    from minimoe.bench import measure

    rates = iter([3.0, 5.0] if linear_first else [5.0, 3.0])
    seen = []

    def fake_rate(fn, work, repeats, device):
        out = fn()
        seen.append(tuple(out.shape))
        return next(rates) * 2**30

    monkeypatch.setattr(measure, "_best_rate", fake_rate)
    assert measure.matvec_bandwidth_gib_s(torch.device("cpu"), torch.float32, mib=1) == 5.0
    k = 4096
    assert seen == [(1, 2**20 // (k * 4)), (2**20 // (k * 4),)]  # the one-row linear, then the row sums


def test_bench_table_without_hf(capsys):
    code = main(["bench", "--preset", "tiny", "--quick", "--repeats", "1", "--no-progress",
                 "model.num_hidden_layers=2", "model.max_position_embeddings=600", "train.batch_size=2", "train.seq_len=32"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "| train |" in out and "| decode_b1_p512 |" in out and "MFU" in out and "hf tok/s" not in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "--against", "vllm"], "invalid choice"),
        (["bench", "--repeats", "0"], "--repeats must be at least 1"),
        (["bench", "--config", "missing.yaml"], "missing.yaml"),
        (["bench", "--preset", "tiny", "model.mtp_depth=1", "--against", "hf", "--quick"], "mtp_depth"),
        (["bench", "--preset", "tiny", "--against", "hf", "--quick"], "model.attn_type=mla"),  # tiny is MHA
        (
            ["bench", "--preset", "tiny", "--quick", *NO_ROOM],
            "model.max_position_embeddings (32) leaves no room",
        ),
    ],
)
def test_bench_bad_input(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_fair_workers_run_under_the_setting_they_are_given():
    """Each side's process gets its own OMP_WAIT_POLICY and thread count (read when OpenMP starts, so
    only a fresh process can change it), and the settings tried cover the three policies at 1 and all
    cores."""
    from minimoe.bench.fair import omp_env, run_worker, settings_to_try

    assert settings_to_try(2) == [
        ("PASSIVE", 1), ("PASSIVE", 2), ("ACTIVE", 1), ("ACTIVE", 2), ("unset", 1), ("unset", 2),
    ]  # fmt: skip
    assert settings_to_try(1) == [("PASSIVE", 1), ("ACTIVE", 1), ("unset", 1)]
    base = ["--config", str(REFERENCE), "--quick", "--repeats", "1", *SMALLER]
    r = run_worker(["probe", "hf", *base], "ACTIVE", 1)
    assert r["omp_wait_policy"] == "ACTIVE" and r["threads"] == 1 and r["decode_b1_tok_s"] > 0
    # "unset" leaves the variable out of the worker's environment: the runtime's default policy
    assert "OMP_WAIT_POLICY" not in omp_env("unset", 2) and omp_env("unset", 2)["OMP_NUM_THREADS"] == "2"
    r = run_worker(["probe", "minimoe", *base], "unset", 1)
    assert r["omp_wait_policy"] == "unset" and r["decode_b1_tok_s"] > 0
    assert run_worker(["bandwidth", "minimoe", *base], "ACTIVE", 1)["bandwidth_gib_s"] > 0


@pytest.mark.parametrize(
    "argv,message",
    [
        (["bench", "--fair", "--quick"], "--fair compares with transformers: add --against hf"),
        (["bench", "--fair", "--against", "hf", "--threads", "2"], "chooses the threads itself"),
        (["bench", "--fair", "--against", "hf", "model.mtp_depth=1"], "mtp_depth"),
        (
            ["bench", "--fair", "--against", "hf", "--config", str(REFERENCE), "--quick", *NO_ROOM],
            "at least 33",
        ),
    ],
)
def test_fair_bad_input(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.count("\n") == 0


def test_fair_parent_holds_no_openmp_worker_while_others_measure(monkeypatch, capsys):
    """`--fair`'s own process waits while the measuring processes run: it must hold one thread then (an
    OpenMP worker it had used would spin on a core under OMP_WAIT_POLICY=ACTIVE, against them), and
    measure the matmul peak for MFU at minimoe's chosen thread count afterwards."""
    import minimoe.bench.fair as fair

    seen = {}

    def fake_compare(base, rounds=3):
        seen["threads"] = torch.get_num_threads()
        return {"settings": {"minimoe": {"omp_wait_policy": "ACTIVE", "threads": 2},
                             "hf": {"omp_wait_policy": "PASSIVE", "threads": 1}},
                "train_tok_s": 10.0, "hf_train_tok_s": 8.0, "decode_b1_tok_s": 5.0, "hf_decode_b1_tok_s": 4.0,
                "bandwidth_gib_s": [1e6, 2.0]}  # fmt: skip

    threads = torch.get_num_threads()
    monkeypatch.setattr(fair, "fair_compare", fake_compare)
    torch.set_num_threads(2)  # (the tests run on one thread: the parent must drop to one itself)
    try:
        code = main(["bench", "--config", str(REFERENCE), "--against", "hf", "--fair", "--quick", "--json",
                     "--no-progress", *SMALLER])  # fmt: skip
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)
    assert code == 0 and seen["threads"] == 1 and after == 2
    r = json.loads(capsys.readouterr().out)
    assert r["decode_b1_ceiling_fraction"] == pytest.approx(5.0 / r["decode_ceiling_tok_s"])
    assert r["matmul_peak_gflops"] > 0
    assert r["matvec_bandwidth_gib_s"] == 1e6  # the best bandwidth of the run: its workers' here


def test_fair_settings_of_their_own_for_decoding_training_and_the_compiled_step(monkeypatch):
    """Each side's batch-1 decode rows run at the setting its batch-1 decode probe picks, its batch-8 rows
    at the batch-8 probe's, its training and prefill at the prefill probe's; the measurements that share a
    setting run in one process, the others in processes of their own; with --compiled-decode the
    compiled step has settings and processes of its own. The numbers join their side's, the compiled
    ratios taken against transformers' plain decode."""
    import minimoe.bench.fair as fair

    calls = []
    # the fastest setting of each probe: decoding one sequence on 1 sleeping thread, the rest on 2
    # spinning ones, except transformers' prefill (1 thread) and minimoe's eager batch 8 (1 thread)
    best = {("minimoe", False): {"decode_b1_tok_s": ("PASSIVE", 1), "decode_b8_tok_s": ("PASSIVE", 1),
                                 "prefill_tok_s": ("ACTIVE", 2)},
            ("hf", False): {"decode_b1_tok_s": ("PASSIVE", 1), "decode_b8_tok_s": ("ACTIVE", 2),
                            "prefill_tok_s": ("PASSIVE", 1)},
            ("minimoe", True): {"decode_b1_tok_s": ("ACTIVE", 2), "decode_b8_tok_s": ("ACTIVE", 2)}}  # fmt: skip

    def fake_worker(args, policy, threads, timeout=3600, module="minimoe.bench.fair"):
        task, side, compiled = args[0], args[1], "--compiled-decode" in args
        groups = args[args.index("--groups") + 1] if "--groups" in args else None
        calls.append((task, side, compiled, groups, policy, threads))
        if task == "bandwidth":
            return {"bandwidth_gib_s": 7.0 + len(calls)}
        if task == "probe":
            return {k: 10.0 if v == (policy, threads) else 5.0 for k, v in best[side, compiled].items()}
        out, groups = {}, groups.split(",")
        if "compiled" in groups:
            out.update({"decode_b1_compiled_tok_s": 30.0 * threads, "decode_b1_compile_s": 4.0})
        if "compiled_batched" in groups:
            out["decode_b8_compiled_tok_s"] = 100.0 * threads
        if "decode" in groups:
            out["decode_b1_tok_s"] = 12.0 if side == "minimoe" else 6.0
        if "batched" in groups:
            out["decode_b8_tok_s"] = 40.0 * threads
        if "compute" in groups:
            out["train_tok_s"] = 20.0 * threads
        return out

    class Done:
        returncode, stdout, stderr = 0, json.dumps({"decode_b1_tok_s": 6.0}), ""

    monkeypatch.setattr(fair, "run_worker", fake_worker)
    monkeypatch.setattr(fair.subprocess, "run", lambda *a, **k: Done())
    r = fair.fair_compare(["--config", "c.yaml", "--compiled-decode"], rounds=2,
                          settings=[("PASSIVE", 1), ("ACTIVE", 2)])  # fmt: skip
    one, two = {"omp_wait_policy": "PASSIVE", "threads": 1}, {"omp_wait_policy": "ACTIVE", "threads": 2}
    assert r["settings"] == {
        "minimoe": one, "minimoe" + fair.BATCHED: one, "minimoe" + fair.COMPUTE: two,
        "hf": one, "hf" + fair.BATCHED: two, "hf" + fair.COMPUTE: one,
        fair.COMPILED: two, fair.COMPILED + fair.BATCHED: two,
    }  # fmt: skip
    suites = [c[1:] for c in calls if c[0] == "suite"]
    assert sorted(set(suites)) == sorted([
        ("minimoe", False, "decode,batched", "PASSIVE", 1), ("minimoe", False, "compute", "ACTIVE", 2),
        ("hf", False, "decode,compute", "PASSIVE", 1), ("hf", False, "batched", "ACTIVE", 2),
        ("minimoe", True, "compiled,compiled_batched", "ACTIVE", 2),
    ])  # fmt: skip
    assert len(suites) == 10  # each twice (two rounds)
    assert not any(c[1] == "hf" and c[2] for c in calls)  # transformers has no compiled step here
    assert r["train_tok_s"] == 40.0 and r["hf_train_tok_s"] == 20.0 and r["train_ratio"] == 2.0
    assert r["decode_b8_tok_s"] == 40.0 and r["hf_decode_b8_tok_s"] == 80.0 and r["decode_b8_ratio"] == 0.5
    assert r["decode_b1_compiled_tok_s"] == 60.0 and r["decode_b1_compiled_ratio"] == 10.0
    assert r["decode_b8_compiled_ratio"] == 2.5 and r["decode_b1_ratio"] == 2.0
    assert r["probes"]["hf" + fair.BATCHED] == {"PASSIVE/1": 5.0, "ACTIVE/2": 10.0}
    # the memory's bandwidth at every core, spinning, before the probes and after the measurements
    bandwidth = [c for c in calls if c[0] == "bandwidth"]
    assert [c[4:] for c in bandwidth] == [("ACTIVE", 2)] * 2
    assert calls[0][0] == calls[-1][0] == "bandwidth" and r["bandwidth_gib_s"] == [8.0, 7.0 + len(calls)]


def test_bench_groups_measure_their_own_rows():
    """`BenchSettings.groups` (--fair runs each group at a setting of its own): "compute" times training and
    prefill, "decode" / "batched" the plain decode of one sequence / several, "compiled" /
    "compiled_batched" the compiled decode of one / several, and nothing else each; `measurements` names
    what `run_bench` yields."""
    from minimoe.bench.measure import BenchSettings, MinimoeSubject, measurements, run_bench

    rc = build_run_config(None, str(REFERENCE), SMALLER)
    torch.manual_seed(0)
    subject = MinimoeSubject(Transformer(rc.model), rc, torch.device("cpu"))
    shapes = {"decode_b1": (1, 8), "decode_b2": (2, 8)}
    for groups, want in (
        (("compiled",), ["decode_b1_compiled"]),
        (("compiled_batched",), ["decode_b2_compiled"]),
        (("compute",), ["train", "prefill"]),
        (("decode",), ["decode_b1"]),
        (("batched", "compute"), ["train", "prefill", "decode_b2"]),
        (BenchSettings().groups,
         ["train", "prefill", "decode_b1", "decode_b1_compiled", "decode_b2", "decode_b2_compiled"]),
    ):  # fmt: skip
        settings = BenchSettings(repeats=1, new_tokens=4, prefill_shape=(1, 16), decode_shapes=shapes,
                                 compiled_decode=True, compile_backend="eager", groups=groups)  # fmt: skip
        names = [name for name, _ in run_bench([subject], rc, torch.device("cpu"), settings)]
        assert names == want == measurements(settings), groups


def test_bench_trains_both_sides_with_adamw_whatever_the_recipe():
    """`minimoe bench --preset tiny` (a recipe with Muon): both sides take AdamW steps, as the table says."""
    from minimoe.bench.measure import MinimoeSubject

    rc = build_run_config("tiny", None, ["model.vocab_size=512"])
    assert rc.train.optimizer == "muon"
    subject = MinimoeSubject(Transformer(rc.model), rc, torch.device("cpu"))
    assert type(subject.optimizer) is torch.optim.AdamW


def test_a_prompt_cut_by_a_short_context_is_recorded_and_shown():
    """A decode row whose prompt does not fit the context with its new tokens runs a shorter prompt: the
    result records the length it ran and the table says it; a prompt that fits records nothing."""
    from minimoe.bench.measure import BenchSettings, MinimoeSubject, run_bench
    from minimoe.bench.run import format_table

    rc = build_run_config(
        None, str(REFERENCE), SMALLER + ["model.max_position_embeddings=24", "train.seq_len=16"]
    )
    torch.manual_seed(0)
    subject = MinimoeSubject(Transformer(rc.model), rc, torch.device("cpu"))
    settings = BenchSettings(repeats=1, new_tokens=4, decode_shapes={"decode_b1": (1, 8), "decode_b1_p512": (1, 512)},
                             groups=("decode",))  # fmt: skip
    out = dict(run_bench([subject], rc, torch.device("cpu"), settings))
    assert out["decode_b1_p512"]["decode_b1_p512_prompt"] == 20 and "decode_b1_prompt" not in out["decode_b1"]
    r = {"config": "c", "cpu": "cpu", "device": "cpu", "threads": 1, "dtype": "fp32", "torch": "t",
         "matmul_peak_gflops": 1.0, "mfu": 0.1, **out["decode_b1"], **out["decode_b1_p512"]}  # fmt: skip
    table = format_table(r, against=False)
    assert "| decode_b1_p512 (prompt 20) |" in table and "| decode_b1 |" in table


def test_published_bf16_peaks_tell_the_h100_variants_apart(monkeypatch):
    from minimoe.bench.measure import published_peak_tflops

    for name, want in (("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
                       ("NVIDIA A100-SXM4-80GB", 312.0), ("Tesla T4", None)):  # fmt: skip
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, name=name: name)
        assert published_peak_tflops(torch.device("cuda")) == want, name


@pytest.mark.slow
def test_fair_comparison_end_to_end(monkeypatch, capsys):
    """`minimoe bench --against hf --fair --json`: every measurement for both sides, the settings each
    side was measured at, and transformers alone. One setting is probed (not the six of a 2-core
    machine: each is a process per side; `settings_to_try`, the workers' settings and the choice among
    several have tests of their own)."""
    import minimoe.bench.fair as fair

    monkeypatch.setattr(fair, "settings_to_try", lambda: [("ACTIVE", 1)])
    threads = torch.get_num_threads()
    try:
        code = main(["bench", "--config", str(REFERENCE), "--against", "hf", "--fair", "--quick", "--json",
                     "--repeats", "1", "--rounds", "1", "--no-progress", *SMALLER])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    r = json.loads(capsys.readouterr().out)
    for key in REQUIRED_KEYS:
        assert key in r, key
    assert r["decode_b1_ratio"] == pytest.approx(r["decode_b1_tok_s"] / r["hf_decode_b1_tok_s"])
    for side in ("minimoe", "hf"):
        assert list(r["probes"][side]) == ["ACTIVE/1"] and r["probes"][side]["ACTIVE/1"] > 0
        assert r["settings"][side] == {"omp_wait_policy": "ACTIVE", "threads": 1}
    assert r["hf_alone_decode_b1_tok_s"] > 0 and r["hf_alone_ratio"] > 0


def test_continuous_batching_sides_generate_the_same_tokens(tmp_path):
    """benchmarks/hf_continuous.py's two sides on one mix: minimoe's serving engine and transformers'
    `generate_batch` on the export of the same weights give every request the same greedy tokens, all
    of the asked length (EOS off on both sides); the reference config is refused with the reason."""
    import yaml

    from minimoe.bench import continuous as C
    from minimoe.data import Tokenizer
    from minimoe.hf.export import export_model
    from minimoe.train.checkpoint import save_checkpoint

    pytest.importorskip("transformers")
    refusal = C.paged_cache_refusal(build_run_config(None, str(REFERENCE), []).model)
    assert "model.v_head_dim=48" in refusal
    rc = build_run_config(None, str(REFERENCE), [*SMALLER, "model.v_head_dim=48"])
    assert C.paged_cache_refusal(rc.model) is None
    torch.manual_seed(0)
    model = Transformer(rc.model).eval()
    text = yaml.safe_dump(rc.to_dict(), sort_keys=False)
    run = save_checkpoint(tmp_path / "run", 0, model, {}, {"step": 0}, text, Tokenizer.byte(), is_best=True)
    export_model(model, Tokenizer.byte(), tmp_path / "hf")
    prompts, warm = C.make_mix(5, 3, 40, 512, seed=0), C.make_mix(5, 3, 40, 512, seed=1)
    ours, seconds = C.run_minimoe(str(run), warm, prompts, 6)
    theirs, hf_seconds = C.run_hf(str(tmp_path / "hf"), warm, prompts, 6)
    assert [len(o) for o in ours] == [6] * 5 and seconds > 0 and hf_seconds > 0
    assert C.identical_fraction(ours, theirs) == 1.0, (ours, theirs)
    assert len({tuple(o) for o in ours}) > 1  # not one degenerate answer for every prompt
