"""The seed presets as the seed systems: exact sizes, their tokenizers found locally by name (never
downloaded), their training recipes, and the config/presets/YAML module structure."""

from __future__ import annotations

import ast
import dataclasses
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from minimoe.cli.main import main
from minimoe.config import ModelConfig
from minimoe.config_yaml import build_run_config
from minimoe.data import Tokenizer, resolve_tokenizer, train_bpe
from minimoe.data.pretrained import find_named_tokenizer
from minimoe.errors import MinimoeError
from minimoe.model.transformer import Transformer
from minimoe.params import count_params
from minimoe.presets import NOTES, PRESET_FIELDS, PRESETS, SEED_PRESETS, TRAIN_DEFAULTS, get_preset

SRC = Path(__file__).resolve().parents[1] / "src" / "minimoe"
WORDS = "the cat sat on a mat and the dog ran to the red ball while a bird sang".split()

# (total, activated without the embedding lookup, MTP modules): pinned, so that listing presets as
# differences from the defaults (or changing a default) cannot change any preset's model
COUNTS = {
    "tiny": (3_668_184, 2_341_080, 0),  # MTP off, MHA since the recipe searches (docs/RESULTS.md)
    "small": (96_339_568, 30_148_208, 11_430_544),
    "optimal-moe": (207_176_768, 75_056_192, 0),
    "mymoe": (144_839_424, 102_372_096, 0),
    "deepseek-mini": (529_883_568, 211_378_608, 0),
    "deepseek-moe-16b": (16_375_728_128, 2_618_935_296, 0),
    "deepseek-v3": (671_026_419_200, 36_625_618_432, 11_610_068_224),
}


# ---------------------------------------------------------------- presets as data


def test_every_preset_has_pinned_counts():
    assert set(COUNTS) == set(PRESETS)
    for name, want in COUNTS.items():
        rep = count_params(get_preset(name))
        assert (rep.total, rep.activated, rep.mtp_total) == want, name


def test_presets_list_only_what_differs_from_the_defaults():
    defaults = dataclasses.asdict(ModelConfig())
    for name, fields in PRESET_FIELDS.items():
        for key, value in fields.items():
            assert key in defaults, f"{name}: unknown field {key}"
            assert value != defaults[key], f"{name}.{key} restates the default {value!r}"
        assert PRESETS[name] == get_preset(name)


def test_get_preset_returns_independent_copies():
    a = get_preset("deepseek-v3")
    a.rope_scaling["factor"] = 1
    assert get_preset("deepseek-v3").rope_scaling["factor"] == 40


def test_deepseek_v3_preset_routes_as_published():
    """DeepSeek-V3's routing (HF deepseek-ai/DeepSeek-V3 config.json): top-8 of 256 sigmoid-scored
    experts from the best 4 of 8 groups, weights renormalised then scaled by 2.5. The parameter counts
    pinned above do not see these fields."""
    m = get_preset("deepseek-v3")
    got = (m.n_routed_experts, m.num_experts_per_tok, m.n_group, m.topk_group, m.routed_scaling_factor)
    assert got == (256, 8, 8, 4, 2.5)
    assert (m.scoring_func, m.effective_topk_method, m.norm_topk_prob) == ("sigmoid", "noaux_tc", True)
    assert m.group_limited


def test_seed_presets_carry_recipe_tokenizer_and_notes():
    for name in SEED_PRESETS:
        recipe = TRAIN_DEFAULTS[name]
        assert recipe["data.tokenizer"] in ("gpt2", "smollm2", "deepseek-moe")
        assert NOTES[name], name
        cfg = build_run_config(name)  # the recipe validates against its model
        assert cfg.train.seq_len <= cfg.model.max_position_embeddings
    opt = build_run_config("optimal-moe").train
    assert (opt.lr, opt.warmup_steps, opt.batch_size, opt.grad_accum, opt.seq_len, opt.precision) == (
        3e-4, 2000, 4, 16, 512, "bf16",
    )  # fmt: skip
    mini = build_run_config("deepseek-mini").train
    assert (mini.lr, mini.warmup_steps, mini.batch_size, mini.seq_len, mini.precision) == (
        3e-4, 20, 8, 128, "fp16",
    )  # fmt: skip
    big = build_run_config("deepseek-moe-16b")
    assert big.train.batch_size * big.train.grad_accum == 4608 and big.train.lr == 4.2e-4
    # the published model: no renormalisation of the top-6 weights, MHA
    assert not big.model.norm_topk_prob and big.model.kv_heads == big.model.num_attention_heads == 16


def test_deepseek_v3_preset_has_the_published_yarn_scaling():
    """HF deepseek-ai/DeepSeek-V3 config.json's rope_scaling (REFERENCE.md); the parameter counts
    pinned above do not see it."""
    assert get_preset("deepseek-v3").rope_scaling == {
        "type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
        "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0,
    }  # fmt: skip


def test_deepseek_moe_16b_recipe_is_the_papers_schedule():
    """DeepSeekMoE paper, section 5.1: 2T tokens in batches of 4608 x 4096 tokens, and the step decay
    (x0.316 at 80% and 90% of training) run as WSD: linear decay over the last 20% to 0.316^2 x lr."""
    t = build_run_config("deepseek-moe-16b").train
    tokens = t.max_steps * t.batch_size * t.grad_accum * t.seq_len
    assert t.seq_len == 4096 and abs(tokens / 2e12 - 1) < 0.01, tokens
    assert (t.warmup_steps, t.schedule, t.decay_fraction) == (2000, "wsd", 0.2)
    assert t.min_lr_ratio == pytest.approx(0.316**2, rel=0.01)


def test_mymoe_uses_the_switch_transformer_values_its_notes_name():
    """NOTES: capacity factor 1.25, router jitter 0.01 and aux loss 0.01 (Switch Transformer), lr 3e-4
    with 100 warmup steps like the sibling seeds, the document's sequence length 128."""
    cfg = build_run_config("mymoe")
    m, t = cfg.model, cfg.train
    assert (m.capacity_factor, m.router_jitter, m.aux_loss_alpha) == (1.25, 0.01, 0.01)
    assert (t.lr, t.warmup_steps, t.seq_len) == (3e-4, 100, 128)


def test_quickstart_presets_train_a_bpe_of_their_own_vocabulary():
    """`tiny` and `small` train a BPE on the data: its size must be the model's vocabulary (a smaller
    one would leave embedding rows untrained, a larger one would not fit), and `tiny` stops at the
    README's 8 minutes."""
    for name in ("tiny", "small"):
        cfg = build_run_config(name)
        assert cfg.data.tokenizer == f"bpe:{cfg.model.vocab_size}", name
    assert build_run_config("tiny").train.max_minutes == 8


def test_preset_recipes_are_fresh_copies():
    from minimoe.presets import preset_train_defaults

    preset_train_defaults("tiny")["train.seq_len"] = 7
    assert build_run_config("tiny").train.seq_len == 128


def test_yaml_preset_key_brings_its_recipe(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("preset: optimal-moe\ntrain:\n  lr: 1.0e-4\n")
    cfg = build_run_config(config_path=str(f))
    assert cfg.model == get_preset("optimal-moe")
    assert (cfg.train.lr, cfg.train.seq_len, cfg.data.tokenizer) == (1e-4, 512, "gpt2")


# ---------------------------------------------------------------- module structure


def _minimoe_imports(path: Path, skip_function: str | None = None) -> set[str]:
    """Every minimoe module `path` imports, at module level or inside functions."""
    tree = ast.parse(path.read_text())
    skipped = set()
    if skip_function:
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name == skip_function:
                skipped |= {id(n) for n in ast.walk(node)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("minimoe"):
            out |= {
                f"{node.module}.{a.name}" if node.module == "minimoe" else node.module for a in node.names
            }
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("minimoe")}
    return out


def test_a_yaml_preset_key_wins_over_the_preset_argument(tmp_path):
    """`build_run_config(preset, config)`: the YAML file's `preset:` key replaces the named preset, model
    and recipe, and the file's own settings still apply over it."""
    f = tmp_path / "c.yaml"
    f.write_text("preset: optimal-moe\ntrain:\n  lr: 1.0e-4\n")
    cfg = build_run_config("tiny", str(f))
    assert cfg.model == get_preset("optimal-moe")
    assert (cfg.train.lr, cfg.train.seq_len, cfg.data.tokenizer) == (1e-4, 512, "gpt2")


def test_a_config_file_without_a_preset_key_keeps_the_preset_argument(tmp_path):
    """`minimoe train --preset tiny --config c.yaml`: the file's settings go over the preset."""
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 1.0e-4\n")
    cfg = build_run_config("tiny", str(f))
    assert cfg.model == get_preset("tiny")
    assert (cfg.train.lr, cfg.train.seq_len, cfg.data.tokenizer) == (1e-4, 128, "bpe:4096")


def test_config_presets_and_yaml_form_no_cycle():
    # config (the dataclasses) <- presets <- config_yaml; only config's compatibility __getattr__ for
    # names that moved reaches up, and nothing in the package uses it
    assert _minimoe_imports(SRC / "config.py", skip_function="__getattr__") == {"minimoe.errors"}
    assert _minimoe_imports(SRC / "presets.py") == {"minimoe.config", "minimoe.errors"}
    assert _minimoe_imports(SRC / "config_yaml.py") == {"minimoe.config", "minimoe.errors", "minimoe.presets"}
    moved = ("build_run_config", "set_dotted", "load_yaml", "dataclass_from_dict", "parse_overrides")
    for f in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "minimoe.config":
                used = {a.name for a in node.names} & set(moved)
                assert not used, f"{f.relative_to(SRC)} imports {used} from minimoe.config"


def test_importing_config_loads_neither_presets_nor_yaml():
    code = (
        "import sys, minimoe.config as c\n"
        "assert 'minimoe.presets' not in sys.modules and 'minimoe.config_yaml' not in sys.modules\n"
        "assert not hasattr(c, 'build_run_config')\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


# ---------------------------------------------------------------- named tokenizers


def _tok_json(folder: Path, texts: list[str] | None = None) -> Tokenizer:
    """A small real BPE tokenizer.json (with `<|endoftext|>`) in `folder`."""
    tok = train_bpe(texts or [" ".join(WORDS)] * 20, 300)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(tok.to_hf_json(), encoding="utf-8")
    return tok


@pytest.fixture
def clean_env(tmp_path, monkeypatch):
    """No tokenizer anywhere: empty minimoe and Hugging Face caches, no MINIMOE_TOKENIZERS."""
    monkeypatch.setenv("MINIMOE_CACHE", str(tmp_path / "mcache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.delenv("MINIMOE_TOKENIZERS", raising=False)
    return tmp_path


def test_named_tokenizer_lookup_order(clean_env, monkeypatch):
    root = clean_env
    assert find_named_tokenizer("gpt2") is None
    # Hugging Face cache: the snapshot refs/main names, not an older one
    repo = root / "hf" / "hub" / "models--openai-community--gpt2"
    _tok_json(repo / "snapshots" / "abc123")
    _tok_json(repo / "snapshots" / "newer")
    os.utime(repo / "snapshots" / "newer" / "tokenizer.json", (2e9, 2e9))  # newest, but not refs/main
    assert find_named_tokenizer("gpt2") == repo / "snapshots" / "newer"  # without refs: the newest
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    assert find_named_tokenizer("gpt2") == repo / "snapshots" / "abc123"
    assert find_named_tokenizer("hf:openai-community/gpt2") == repo / "snapshots" / "abc123"
    # minimoe's cache wins over the Hugging Face cache, MINIMOE_TOKENIZERS over both
    _tok_json(root / "mcache" / "tokenizers" / "gpt2")
    assert find_named_tokenizer("gpt2") == root / "mcache" / "tokenizers" / "gpt2"
    monkeypatch.setenv("MINIMOE_TOKENIZERS", str(root / "mine"))
    want = _tok_json(root / "mine" / "gpt2")
    assert find_named_tokenizer("gpt2") == root / "mine" / "gpt2"
    got = resolve_tokenizer("gpt2")
    assert got.kind == "pretrained" and got.encode("the cat sat") == want.encode("the cat sat")
    # a second name of the same tokenizer: SmolLM2 found under its Instruct repo
    _tok_json(root / "hf" / "hub" / "models--HuggingFaceTB--SmolLM2-135M-Instruct" / "snapshots" / "r1")
    assert find_named_tokenizer("smollm2").name == "r1"
    # HF_HUB_CACHE names the hub cache itself, in place of HF_HOME/hub
    monkeypatch.setenv("HF_HUB_CACHE", str(root / "hub2"))
    assert find_named_tokenizer("smollm2") is None
    _tok_json(root / "hub2" / "models--deepseek-ai--deepseek-moe-16b-chat" / "snapshots" / "r2")
    assert (
        find_named_tokenizer("deepseek-moe")
        == root / "hub2" / "models--deepseek-ai--deepseek-moe-16b-chat" / "snapshots" / "r2"
    )


def test_missing_named_tokenizer_is_one_sentence_saying_where_to_put_it(clean_env):
    with pytest.raises(MinimoeError) as e:
        resolve_tokenizer("gpt2")
    where = clean_env / "mcache" / "tokenizers" / "gpt2"
    assert str(e.value) == (
        f"tokenizer 'gpt2' (GPT-2's 50257-token BPE) was not found and nothing is downloaded: put its "
        f"tokenizer.json in {where}/ (or in $MINIMOE_TOKENIZERS/gpt2/), keep openai-community/gpt2 in the "
        "Hugging Face cache, or pass --tokenizer PATH"
    )
    with pytest.raises(MinimoeError, match="is not in the Hugging Face cache"):
        resolve_tokenizer("hf:nobody/nothing")


# ---------------------------------------------------------------- `minimoe train --preset SEED`


@pytest.fixture
def text_file(tmp_path):
    import random

    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(150)) for _ in range(60)]
    f = tmp_path / "d.txt"
    f.write_text("\n\n".join(docs))
    return f


class Stop(BaseException):
    """Ends `minimoe train` where a test has seen enough (the CLI catches only Exception subclasses)."""


class Recorder:
    """Stands in for Trainer: records what `minimoe train` would train, builds the model on the meta
    device (a 530M-parameter model is too big to allocate in a unit test) and stops."""

    seen: dict = {}

    def __init__(self, cfg, run_dir, data, tokenizer, **kw):
        with torch.device("meta"):
            model = Transformer(cfg.model)
        biases = sum(b.numel() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias"))
        Recorder.seen = {"cfg": cfg, "tokenizer": tokenizer, "params": model.num_params() + biases}
        raise Stop  # nothing below Trainer runs


def _train(args, monkeypatch, recorder=True) -> dict:
    if recorder:
        monkeypatch.setattr("minimoe.train.run.Trainer", Recorder)
        Recorder.seen = {}
        with pytest.raises(Stop):
            main(["train", *args])
        return Recorder.seen
    return {"code": main(["train", *args])}


COMMON = ["--no-progress", "--no-sample", "data.val_fraction=0.3"]


@pytest.mark.parametrize("name", SEED_PRESETS)
def test_seed_preset_trains_the_model_params_reports(name, clean_env, text_file, monkeypatch, caplog):
    # the seed's tokenizer is on this machine (a stand-in tokenizer.json under its name)
    tok_name = TRAIN_DEFAULTS[name]["data.tokenizer"]
    monkeypatch.setenv("MINIMOE_TOKENIZERS", str(clean_env / "toks"))
    _tok_json(clean_env / "toks" / tok_name)
    with caplog.at_level(logging.INFO, logger="minimoe.train.run"):
        seen = _train(
            ["--preset", name, "--data", str(text_file), "--out", str(clean_env / "r"), *COMMON], monkeypatch
        )
    assert seen["cfg"].model == get_preset(name)  # the vocabulary is the seed's, not refitted
    assert seen["params"] == count_params(get_preset(name)).total == COUNTS[name][0]
    assert seen["cfg"].data.tokenizer == tok_name and seen["tokenizer"].vocab_size < 400
    assert sum(f"preset {name}: " in r.getMessage() for r in caplog.records) == len(NOTES[name])
    if name == "deepseek-mini":  # fp16 + GradScaler is the recipe, and needs CUDA: bf16 on the CPU
        assert seen["cfg"].train.precision == "bf16"


def test_deepseek_mini_without_smollm2_trains_the_stated_fallback(clean_env, text_file, monkeypatch, caplog):
    with caplog.at_level(logging.WARNING, logger="minimoe.train.run"):
        seen = _train(
            ["--preset", "deepseek-mini", "--data", str(text_file), "--out", str(clean_env / "r"), *COMMON],
            monkeypatch,
        )
    assert seen["cfg"].data.tokenizer == "bpe:49152" and seen["tokenizer"].kind == "bpe"
    assert seen["cfg"].model.vocab_size == 49152 and seen["params"] == COUNTS["deepseek-mini"][0]
    (warning,) = [r.getMessage() for r in caplog.records if "smollm2" in r.getMessage()]
    assert str(clean_env / "mcache" / "tokenizers" / "smollm2") in warning and "--tokenizer PATH" in warning


def test_seed_preset_with_another_tokenizer_refits_the_vocabulary(clean_env, text_file, monkeypatch):
    seen = _train(
        [
            "--preset",
            "mymoe",
            "--tokenizer",
            "byte",
            "--data",
            str(text_file),
            "--out",
            str(clean_env / "r"),
            *COMMON,
        ],
        monkeypatch,
    )
    assert seen["cfg"].model.vocab_size == 320  # 258 byte tokens, rounded up to 64
    assert dataclasses.replace(seen["cfg"].model, vocab_size=50304) == get_preset("mymoe")


def test_seed_preset_keeps_its_vocabulary_for_its_own_tokenizer_however_named(
    clean_env, text_file, monkeypatch
):
    # data.tokenizer=gpt2 said explicitly, and a 50257-token tokenizer.json given as a path (GPT-2's size;
    # refitting would round it up to 50304 for optimal-moe)
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    monkeypatch.setenv("MINIMOE_TOKENIZERS", str(clean_env / "toks"))
    _tok_json(clean_env / "toks" / "gpt2")
    seen = _train(
        [
            "--preset",
            "optimal-moe",
            "--data",
            str(text_file),
            "--out",
            str(clean_env / "a"),
            *COMMON,
            "data.tokenizer=gpt2",
        ],
        monkeypatch,
    )
    assert seen["cfg"].model == get_preset("optimal-moe")
    vocab = (
        {w: i for i, w in enumerate(WORDS[:13])}
        | {f"w{i}": i for i in range(13, 50256)}
        | {"<|endoftext|>": 50256}
    )
    hf = HFTokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    (clean_env / "big").mkdir()
    hf.save(str(clean_env / "big" / "tokenizer.json"))
    seen = _train(
        [
            "--preset",
            "optimal-moe",
            "--tokenizer",
            str(clean_env / "big"),
            "--data",
            str(text_file),
            "--out",
            str(clean_env / "b"),
            *COMMON,
        ],
        monkeypatch,
    )
    assert seen["tokenizer"].vocab_size == 50257 and seen["cfg"].model == get_preset("optimal-moe")


def test_a_tokenizer_one_padding_step_short_refits_the_vocabulary_exactly(clean_env, text_file, monkeypatch):
    """A tokenizer of exactly the seed's vocabulary minus 64 is another tokenizer, not the seed's padded:
    the vocabulary is refitted to its size, a multiple of 64 already, so nothing is added."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    n = get_preset("mymoe").vocab_size - 64
    vocab = (
        {w: i for i, w in enumerate(WORDS[:13])}
        | {f"w{i}": i for i in range(13, n - 1)}
        | {"<|endoftext|>": n - 1}
    )
    hf = HFTokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    (clean_env / "tok").mkdir()
    hf.save(str(clean_env / "tok" / "tokenizer.json"))
    argv = ["--preset", "mymoe", "--tokenizer", str(clean_env / "tok"), "--data", str(text_file)]
    seen = _train([*argv, "--out", str(clean_env / "r"), *COMMON], monkeypatch)
    assert seen["tokenizer"].vocab_size == n and seen["cfg"].model.vocab_size == n


def test_seed_preset_without_its_tokenizer_stops_with_one_sentence(clean_env, text_file, capsys):
    code = main(
        ["train", "--preset", "optimal-moe", "--data", str(text_file), "--out", str(clean_env / "r"), *COMMON]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("minimoe train: error: tokenizer 'gpt2' (GPT-2's 50257-token BPE) was not found")


def test_explicit_fp16_on_cpu_is_refused(clean_env, text_file, monkeypatch, capsys):
    monkeypatch.setenv("MINIMOE_TOKENIZERS", str(clean_env / "toks"))
    _tok_json(clean_env / "toks" / "smollm2")
    code = main(
        [
            "train",
            "--preset",
            "deepseek-mini",
            "--data",
            str(text_file),
            "--out",
            str(clean_env / "r"),
            *COMMON,
            "train.precision=fp16",
        ]
    )
    assert code == 2 and "train.precision=fp16 needs a CUDA GPU" in capsys.readouterr().err


def test_train_optimal_moe_builds_the_model_params_reports(clean_env, text_file, monkeypatch, capsys):
    """`minimoe train --preset optimal-moe train.max_steps=1`, the real Trainer up to its first step:
    the model it builds has exactly the parameters `minimoe params optimal-moe` reports."""
    from minimoe.train.trainer import Trainer

    monkeypatch.setenv("MINIMOE_TOKENIZERS", str(clean_env / "toks"))
    _tok_json(clean_env / "toks" / "gpt2")
    built = {}

    def fit(self, stop_after=None):
        biases = sum(m.gate.e_score_correction_bias.numel() for m in self.model.moe_layers().values())
        built["params"] = sum(p.numel() for p in self.model.parameters()) + biases
        built["cfg"] = self.cfg
        raise Stop

    monkeypatch.setattr(Trainer, "fit", fit)
    run = clean_env / "r"
    with pytest.raises(Stop):
        main(
            [
                "train",
                "--preset",
                "optimal-moe",
                "--data",
                str(text_file),
                "--out",
                str(run),
                *COMMON,
                "train.max_steps=1",
            ]
        )
    assert main(["params", "optimal-moe", "--json"]) == 0
    reported = json.loads(capsys.readouterr().out)
    assert built["params"] == reported["total"] == COUNTS["optimal-moe"][0]
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"] == dataclasses.asdict(get_preset("optimal-moe"))
    assert saved["data"]["tokenizer"] == "gpt2" and saved["train"]["precision"] == "bf16"
    assert reported["notes"] == NOTES["optimal-moe"]
