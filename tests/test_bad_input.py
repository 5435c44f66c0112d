"""Bad input for every subcommand: each case must end with exit code 2 and one line on stderr that names
the problem, never a traceback (SPEC §6).

The table runs in-process through `minimoe.cli.main.main` (fast); a few cases run again in a real
`python -m minimoe` process to check the process exit code. One tiny trained run, its Hugging Face export
and a hand-made dense Llama folder are built once per module; cases that need a damaged copy of them
(truncated weights, an edited config, a swapped tokenizer) share module-level copies that no case writes.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from minimoe.cli.main import COMMANDS, main
from minimoe.errors import MinimoeError
from tiny import TINY_TRAIN

TINY = [*TINY_TRAIN, "train.max_steps=2", "train.eval_every=2"]
WORDS = "the cat sat on a mat and the dog ran to the red ball while a bird sang".split()
CHAT = '{"prompt": "hi", "response": "hello there"}\n' * 8
BINARY = bytes(range(128, 256)) * 8 + b"\xff\xfe\x00"  # no valid UTF-8 in it


_CAP_DAC_OVERRIDE = 1  # linux/capability.h: bypass file read, write and execute permission checks


def _capabilities(libc, effective: int | None = None) -> tuple[int, int]:
    """(effective, permitted) low 32 capability bits of this thread; sets `effective` when given."""
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
    data = (ctypes.c_uint32 * 6)()  # two {effective, permitted, inheritable} words
    if libc.capget(header, data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    if effective is not None:
        data[0] = effective
        if libc.capset(header, data) != 0:
            raise OSError(ctypes.get_errno(), "capset")
    return data[0], data[1]


@contextlib.contextmanager
def permissions_enforced_for_root():
    """Root writes into a read-only directory through CAP_DAC_OVERRIDE; drop it from this thread's
    effective set for the block (it stays permitted, so it comes back after), so that a mode-0500
    directory is unwritable for root too. A no-op for other users and where capabilities are absent."""
    if os.geteuid() != 0 or not sys.platform.startswith("linux"):
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)
    effective, _ = _capabilities(libc)
    if not effective & (1 << _CAP_DAC_OVERRIDE):
        yield
        return
    _capabilities(libc, effective & ~(1 << _CAP_DAC_OVERRIDE))
    try:
        yield
    finally:
        _capabilities(libc, effective)


def _permissions_enforced() -> bool:
    """False where a read-only directory can be written anyway (root, with CAP_DAC_OVERRIDE)."""
    with tempfile.TemporaryDirectory() as d, permissions_enforced_for_root():
        ro = Path(d) / "ro"
        ro.mkdir(mode=0o500)
        try:
            (ro / "x").write_text("x")
        except PermissionError:
            return True
        finally:
            ro.chmod(0o700)
        return False


PERMISSIONS_ENFORCED = _permissions_enforced()

# ---------------------------------------------------------------- shared fixtures


def _truncate(f: Path) -> None:
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])


def _steps(run: Path) -> list[Path]:
    return sorted((run / "checkpoints").glob("step_*"))


def _big_tokenizer(folder: Path, n: int = 400) -> None:
    """A word-level tokenizer.json with `n` tokens: more than the tiny run's 320 embeddings."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "<|pad|>": 1, **{f"w{i}": i + 2 for i in range(n - 2)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|pad|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    tok.save(str(folder / "tokenizer.json"))


def _llama(folder: Path) -> Path:
    """A tiny dense Llama checkpoint folder written by hand (no transformers import)."""
    from safetensors.torch import save_file

    D, inter, V, L, kv = 32, 64, 300, 2, 16
    folder.mkdir(parents=True)
    config = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": V, "hidden_size": D,
        "intermediate_size": inter, "num_hidden_layers": L, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 64, "hidden_act": "silu", "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "tie_word_embeddings": False,
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    g = torch.Generator().manual_seed(0)
    sd = {"model.embed_tokens.weight": torch.randn(V, D, generator=g), "model.norm.weight": torch.ones(D)}
    sd["lm_head.weight"] = torch.randn(V, D, generator=g)
    for i in range(L):
        p = f"model.layers.{i}."
        shapes = {
            "self_attn.q_proj.weight": (D, D), "self_attn.k_proj.weight": (kv, D),
            "self_attn.v_proj.weight": (kv, D), "self_attn.o_proj.weight": (D, D),
            "mlp.gate_proj.weight": (inter, D), "mlp.up_proj.weight": (inter, D),
            "mlp.down_proj.weight": (D, inter),
        }  # fmt: skip
        for name, shape in shapes.items():
            sd[p + name] = torch.randn(*shape, generator=g) * 0.1
        sd[p + "input_layernorm.weight"] = torch.ones(D)
        sd[p + "post_attention_layernorm.weight"] = torch.ones(D)
    save_file(sd, str(folder / "model.safetensors"))
    return folder


@dataclass
class World:
    """What the cases share: good inputs and damaged copies, built once per module, never written."""

    root: Path
    run: Path  # a trained tiny run (MLA, 4 experts, byte tokenizer, vocab 320)
    run_trunc: Path  # model.safetensors cut in half
    run_incompat: Path  # config.yaml says hidden_size 48: every shape differs from the weights
    run_bigtok: Path  # tokenizer swapped for one with 400 tokens
    run_badcfg: Path  # checkpoint config.yaml is binary
    run_badtok: Path  # minimoe_tokenizer.json is binary
    run_badmeta: Path  # meta.json cut short, as a disk that filled up leaves it
    run_nomtp: Path  # an upcycled GQA run without MTP modules
    hf: Path  # the run exported as a DeepSeek-V3 folder
    hf_trunc: Path
    hf_incompat: Path  # config.json hidden_size edited
    hf_bigtok: Path  # tokenizer.json with more tokens than vocab_size
    llama: Path  # a dense Llama folder to upcycle
    llama_trunc: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    from minimoe.hf.export import export_model
    from minimoe.hf.upcycle import upcycle
    from minimoe.train.checkpoint import load_run
    from minimoe.train.run import train_from_config

    root = tmp_path_factory.mktemp("bad_input")
    corpus = root / "corpus.txt"
    g = torch.Generator().manual_seed(0)
    corpus.write_text(
        "\n".join(
            " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (12,), generator=g)) for _ in range(300)
        )
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINIMOE_CACHE", str(root / "cache"))
        run = root / "run"
        train_from_config("tiny", None, TINY + [f"data.path={corpus}"], run, progress=False, sample=False)

    def copy(name: str, edit: Callable[[Path], None]) -> Path:
        dst = root / name
        shutil.copytree(run, dst)
        edit(dst)
        return dst

    def incompat(r: Path) -> None:
        for f in [r / "config.yaml", *(s / "config.yaml" for s in _steps(r))]:
            cfg = yaml.safe_load(f.read_text())
            cfg["model"]["hidden_size"] = 48
            f.write_text(yaml.safe_dump(cfg))

    def bigtok(r: Path) -> None:
        for d in [r / "tokenizer", *(s / "tokenizer" for s in _steps(r))]:
            _big_tokenizer(d)

    def each_step(fn: Callable[[Path], None]) -> Callable[[Path], None]:
        return lambda r: [fn(s) for s in _steps(r)]

    w = World(
        root=root,
        run=run,
        run_trunc=copy("run_trunc", each_step(lambda s: _truncate(s / "model.safetensors"))),
        run_incompat=copy("run_incompat", incompat),
        run_bigtok=copy("run_bigtok", bigtok),
        run_badcfg=copy("run_badcfg", each_step(lambda s: (s / "config.yaml").write_bytes(BINARY))),
        run_badtok=copy(
            "run_badtok", each_step(lambda s: (s / "tokenizer/minimoe_tokenizer.json").write_bytes(BINARY))
        ),
        run_badmeta=copy(
            "run_badmeta",
            each_step(lambda s: (s / "meta.json").write_text((s / "meta.json").read_text()[:40])),
        ),
        run_nomtp=root / "run_nomtp",
        hf=root / "hf",
        hf_trunc=root / "hf_trunc",
        hf_incompat=root / "hf_incompat",
        hf_bigtok=root / "hf_bigtok",
        llama=_llama(root / "llama"),
        llama_trunc=root / "llama_trunc",
    )
    model, tok, _, _ = load_run(run)
    export_model(model, tok, w.hf)
    for d in (w.hf_trunc, w.hf_incompat, w.hf_bigtok):
        shutil.copytree(w.hf, d)
    _truncate(w.hf_trunc / "model.safetensors")
    c = json.loads((w.hf_incompat / "config.json").read_text())
    c["hidden_size"] = 48
    (w.hf_incompat / "config.json").write_text(json.dumps(c))
    for f in ("tokenizer.json", "minimoe_tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (w.hf_bigtok / f).unlink(missing_ok=True)
    _big_tokenizer(root / "bigtok")
    shutil.copy(root / "bigtok/tokenizer.json", w.hf_bigtok / "tokenizer.json")
    shutil.copytree(w.llama, w.llama_trunc)
    _truncate(w.llama_trunc / "model.safetensors")
    upcycle(w.llama, w.run_nomtp, experts=4, top_k=2, tokenizer="byte")
    return w


class Ctx:
    """Per-case paths: the shared World plus files made in this case's own tmp_path."""

    def __init__(self, world: World, tmp: Path) -> None:
        self.w = world
        self.tmp = tmp
        self.paths: dict[str, Path] = {}  # what `readonly` and `under_file` made, for exact messages

    def __getattr__(self, name: str):
        return getattr(self.w, name)

    @property
    def missing(self) -> Path:
        return self.tmp / "missing.txt"

    @property
    def out(self) -> Path:
        """An output path that does not exist yet."""
        return self.tmp / "out"

    def dir(self, name: str = "adir") -> Path:
        d = self.tmp / name
        d.mkdir(exist_ok=True)
        return d

    def file(self, name: str, content: str | bytes = "") -> Path:
        f = self.tmp / name
        f.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            f.write_bytes(content)
        else:
            f.write_text(content, encoding="utf-8")
        return f

    def empty(self, name: str = "empty.txt") -> Path:
        return self.file(name, "")

    def binary(self, name: str = "binary.txt") -> Path:
        return self.file(name, BINARY)

    def text(self, name: str = "text.txt") -> Path:
        return self.file(name, "the cat sat on the mat\n" * 40)

    def chat(self, name: str = "chat.jsonl") -> Path:
        return self.file(name, CHAT)

    def gen(self, name: str = "gen.jsonl") -> Path:
        """Examples for `eval --task generation`."""
        return self.file(name, '{"prompt": "the cat", "reference": "sat"}\n' * 4)

    def hf_copy(self, **config) -> Path:
        """A copy of the exported folder with `config` replacing keys of its config.json."""
        d = self.tmp / "hf_copy"
        shutil.copytree(self.w.hf, d)
        c = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**c, **config}))
        return d

    def plot_run(self, metrics: str | bytes) -> Path:
        """A run directory (config.yaml) whose metrics.jsonl holds `metrics`."""
        self.file("r/metrics.jsonl", metrics)
        shutil.copy(self.w.run / "config.yaml", self.tmp / "r/config.yaml")
        return self.tmp / "r"

    def sweep(self, extra: str = "", **over) -> Path:
        """A sweep file that plans, with `over` replacing its keys and `extra` YAML appended."""
        self.text()
        return self.file("s.yaml", sweep_yaml(**over) + extra)

    def readonly(self, name: str = "ro") -> Path:
        """An output path inside a mode-0500 directory (root too: see permissions_enforced_for_root)."""
        d = self.dir(name)
        d.chmod(0o500)
        self.paths["ro"] = d / "out"
        return d / "out"

    def under_file(self) -> Path:
        """An output path whose parent is a regular file (fails for root too)."""
        self.paths["under"] = self.file("plain_file", "x") / "out"
        return self.paths["under"]

    def bigtok_dir(self) -> Path:
        """A tokenizer folder with 400 tokens."""
        return self.w.root / "bigtok"

    def busy_port(self) -> int:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        self.tmp_socket = s  # closed by the test
        return s.getsockname()[1]


@dataclass
class Case:
    id: str
    argv: Callable[[Ctx], list]
    expect: str  # a substring of the one-line message (case-insensitive); with `exact`, the whole line
    code: int = 2
    nonroot: bool = False  # needs file permissions enforced (for root: permissions_enforced_for_root)
    exact: bool = False  # `expect` is the whole line, with {ro} / {under} for Ctx.readonly / under_file


def sweep_yaml(**over) -> str:
    """Sweep YAML training on text.txt next to it (see Ctx.sweep), with `over` replacing keys."""
    d = {
        "budget": {"tokens": 100_000}, "variants": {"a": ["model.num_hidden_layers=2"]}, "data": "text.txt",
        "base": {"preset": "tiny", "overrides": [o for o in TINY if not o.startswith("train.max_steps")]},
    }  # fmt: skip
    d.update(over)
    return yaml.safe_dump(d)


def base(c: Ctx, cmd: str) -> list:
    """An argv that gets `cmd` past its required arguments (a command not listed here: just its name)."""
    return {
        "train": ["train"],
        "generate": ["generate", c.run, "--prompt", "a"],
        "eval": ["eval", c.run, "--task", "perplexity", "--data", c.text()],
        "export": ["export", c.run, "--out", c.out],
        "import": ["import", c.hf, "--out", c.out],
        "params": ["params", "tiny"],
        "plot": ["plot", c.run, "--out", c.out],
        "serve": ["serve", c.run, "--port", "0"],
        "quantize": ["quantize", c.run, "--bits", "8", "--out", c.out],
        "sft": ["sft", c.run, "--data", c.chat(), "--out", c.out],
        "lora": ["lora", c.run, "--data", c.chat(), "--out", c.out],
        "upcycle": ["upcycle", c.llama, "--experts", "4", "--top-k", "2", "--out", c.out],
        "compare": ["compare", c.sweep(), "--plan"],
        "inspect": ["inspect", c.run, "--text", "a cat"],
        "bench": ["bench", "--quick", "--no-progress"],
    }.get(cmd, [cmd])


def T(c: Ctx, *extra, out: Path | None = None) -> list:
    """`minimoe train` on a small text file with the tiny overrides, plus `extra`, into `out`."""
    return ["train", "--data", c.text(), "--out", out or c.out, "--no-progress", "--no-sample", *TINY, *extra]


# fmt: off
CASES: list[Case] = []
# ---- every command: an unknown flag, a stray argument, a missing required argument
for _cmd in COMMANDS:
    CASES.append(Case(f"{_cmd}-unknown-flag", lambda c, k=_cmd: [*base(c, k), "--bogus-flag"],
                      f"--bogus-flag (see 'minimoe {_cmd} --help')"))
for _cmd in ("generate", "eval", "export", "import", "plot", "serve", "quantize", "compare", "inspect"):
    CASES.append(Case(f"{_cmd}-stray-argument", lambda c, k=_cmd: [*base(c, k), "stray"],
                      f"unrecognized arguments: stray (see 'minimoe {_cmd} --help')"))
for _cmd in ("train", "params", "sft", "lora", "upcycle"):  # they take dotted overrides
    CASES.append(Case(f"{_cmd}-not-an-override", lambda c, k=_cmd: [*base(c, k), "stray"], "stray"))
CASES += [
    Case("generate-no-run", lambda c: ["generate"], "required: run_dir"),
    Case("eval-no-task", lambda c: ["eval", c.run, "--data", c.text()], "required: --task"),
    Case("export-no-out", lambda c: ["export", c.run], "required: --out"),
    Case("import-no-out", lambda c: ["import", c.hf], "required: --out"),
    Case("quantize-no-bits", lambda c: ["quantize", c.run, "--out", c.out], "required: --bits"),
    Case("sft-no-out", lambda c: ["sft", c.run, "--data", c.chat()], "required: --out"),
    Case("upcycle-no-experts", lambda c: ["upcycle", c.llama, "--top-k", "2", "--out", c.out], "--experts"),
    Case("plot-no-run", lambda c: ["plot"], "required: RUN_DIR"),
    Case("compare-no-sweep", lambda c: ["compare"], "required: sweep"),
    Case("no-such-command", lambda c: ["trian"], "invalid choice: 'trian'"),
]

# ---- train
CASES += [
    Case("train-config-missing", lambda c: ["train", "--config", c.tmp / "nope.yaml"], "does not exist"),
    Case("train-config-dir", lambda c: ["train", "--config", c.dir()], "is a directory"),
    Case("train-config-binary", lambda c: ["train", "--config", c.binary("b.yaml")], "not UTF-8"),
    Case("train-config-invalid-yaml", lambda c: ["train", "--config", c.file("b.yaml", "model: [1, 2\n")], "not valid YAML"),
    Case("train-config-repeated-key", lambda c: ["train", "--config", c.file("b.yaml", "train:\n  lr: 1e-3\n  max_steps: 2\n  lr: 3e-3\n")], "'lr' is given twice (line 4)"),
    Case("train-config-list", lambda c: ["train", "--config", c.file("b.yaml", "- 1\n- 2\n")], "mapping"),
    Case("train-config-unknown-key", lambda c: ["train", "--config", c.file("b.yaml", "model:\n  hiden_size: 32\n")], "did you mean 'model.hidden_size'"),
    Case("train-config-unknown-section", lambda c: ["train", "--config", c.file("b.yaml", "modle:\n  num_hidden_layers: 2\n")], "did you mean 'model'"),
    Case("train-config-section-not-mapping", lambda c: ["train", "--config", c.file("b.yaml", "train: 5\n")], "'train' must be a mapping"),
    Case("train-config-wrong-type", lambda c: ["train", "--config", c.file("b.yaml", "train:\n  max_steps: lots\n")], "train.max_steps must be an integer"),
    Case("train-config-bad-preset", lambda c: ["train", "--config", c.file("b.yaml", "preset: tinyy\n")], "tinyy"),
    Case("train-preset-typo", lambda c: ["train", "--preset", "tinny"], "did you mean 'tiny'"),
    Case("train-override-unknown", lambda c: ["train", "model.num_expert_per_tok=2"], "did you mean 'model.num_experts_per_tok'"),
    Case("train-override-unknown-section", lambda c: ["train", "trian.lr=1"], "did you mean 'train'"),
    Case("train-override-no-subkey", lambda c: ["train", "train.lr.x=1"], "train.lr"),
    Case("train-override-wrong-type", lambda c: ["train", "train.lr=fast"], "train.lr must be a number"),
    Case("train-override-bool", lambda c: ["train", "model.tie_word_embeddings=maybe"], "tie_word_embeddings must be true or false"),
    Case("train-negative-lr", lambda c: ["train", "train.lr=-1"], "train.lr must be positive"),
    Case("train-zero-batch", lambda c: ["train", "train.batch_size=0"], "train.batch_size must be positive"),
    Case("train-zero-steps", lambda c: ["train", "train.max_steps=0"], "train.max_steps must be positive"),
    Case("train-val-fraction", lambda c: ["train", "data.val_fraction=1.5"], "data.val_fraction"),
    Case("train-workers-negative", lambda c: ["train", "data.workers=-1"], "data.workers must be >= 0, got -1"),
    Case("train-seq-len-too-long", lambda c: ["train", "train.seq_len=4096"], "exceeds model.max_position_embeddings"),
    Case("train-bad-choice", lambda c: ["train", "train.precision=fp8"], "train.precision must be one of"),
    Case("train-bad-attn-type", lambda c: ["train", "model.attn_type=flash"], "model.attn_type must be one of"),
    Case("train-topk-gt-experts", lambda c: ["train", "model.num_experts_per_tok=99"], "is larger than n_routed_experts"),
    Case("train-topk-zero", lambda c: ["train", "model.num_experts_per_tok=0"], "num_experts_per_tok must be at least 1"),
    Case("train-heads-not-dividing", lambda c: ["train", "model.attn_type=gqa", "model.num_attention_heads=3", "model.hidden_size=64"], "does not divide hidden_size"),
    Case("train-kv-heads-not-dividing", lambda c: ["train", "model.attn_type=gqa", "model.num_attention_heads=4", "model.num_key_value_heads=3"], "num_key_value_heads (3) must divide num_attention_heads"),
    Case("train-mla-no-kv-lora", lambda c: ["train", "model.attn_type=mla", "model.kv_lora_rank=null"], "kv_lora_rank"),
    Case("train-mla-zero-kv-lora", lambda c: ["train", "model.attn_type=mla", "model.kv_lora_rank=0"], "kv_lora_rank must be positive"),
    Case("train-odd-rope-dim", lambda c: ["train", "model.attn_type=mla", "model.qk_rope_head_dim=7"], "qk_rope_head_dim (7) must be even"),
    Case("train-groups-not-dividing", lambda c: ["train", "model.n_group=3"], "n_group (3)"),
    Case("train-topk-group-gt-groups", lambda c: ["train", "model.n_group=2", "model.topk_group=3"], "topk_group (3)"),
    Case("train-first-k-dense", lambda c: ["train", "model.first_k_dense_replace=99"], "first_k_dense_replace (99)"),
    Case("train-dropout-one", lambda c: ["train", "model.dropout=1.0"], "dropout must be in [0, 1)"),
    Case("train-capacity-zero", lambda c: ["train", "model.capacity_factor=0"], "capacity_factor must be positive"),
    Case("train-rope-scaling-type", lambda c: ["train", "model.rope_scaling={type: linear, factor: 2}"], "rope_scaling type"),
    Case("train-rope-scaling-string", lambda c: ["train", "model.rope_scaling=yes"], "rope_scaling must be a mapping"),
    Case("train-expert-parallel", lambda c: ["train", "dist.expert_parallel=3"], "dist.expert_parallel (3)"),
    Case("train-resume-and-preset", lambda c: ["train", "--resume", c.run, "--preset", "tiny"], "drop --preset"),
    Case("train-resume-missing", lambda c: ["train", "--resume", c.missing], "no config.yaml"),
    Case("train-resume-a-file", lambda c: ["train", "--resume", c.text()], "no config.yaml"),
    Case("train-resume-truncated", lambda c: ["train", "--resume", c.run_trunc, "--no-progress", "--no-sample"], "corrupt or truncated"),
    Case("train-resume-damaged-meta", lambda c: ["train", "--resume", c.run_badmeta, "--no-progress", "--no-sample"], "meta.json is not valid JSON"),
    Case("train-out-holds-run", lambda c: T(c, out=c.run), "already holds a run"),
    Case("train-data-missing", lambda c: ["train", "--data", c.missing, *TINY], "missing.txt"),
    Case("train-data-empty-dir", lambda c: ["train", "--data", c.dir(), "--out", c.out, *TINY], "adir"),
    Case("train-data-empty-file", lambda c: ["train", "--data", c.empty(), "--out", c.out, *TINY], "empty.txt"),
    Case("train-data-binary", lambda c: ["train", "--data", c.binary(), "--out", c.out, *TINY], "binary.txt"),
    Case("train-data-bad-jsonl", lambda c: ["train", "--data", c.file("d.jsonl", "{not json\n"), "--out", c.out, *TINY], "d.jsonl"),
    Case("train-val-data-missing", lambda c: [*T(c), "--val-data", c.missing], "missing.txt"),
    Case("train-tokenizer-missing", lambda c: [*T(c), "--tokenizer", c.missing], "missing.txt"),
    Case("train-tokenizer-binary", lambda c: [*T(c), "--tokenizer", c.binary("tokenizer.json")], "tokenizer.json"),
    Case("train-tokenizer-bad-spec", lambda c: [*T(c), "--tokenizer", "bpe:lots"], "bpe:lots"),
    Case("train-tokenizer-larger-than-vocab", lambda c: [*T(c), "model.vocab_size=100"], "model.vocab_size is 100"),
    Case("train-big-tokenizer-larger-than-vocab", lambda c: [*T(c), "--tokenizer", c.bigtok_dir(), "model.vocab_size=320"], "400 tokens"),
    Case("train-out-unwritable", lambda c: T(c, out=c.readonly()), "minimoe train: error: cannot write to output directory {ro} (Permission denied)", nonroot=True, exact=True),
    Case("train-out-under-file", lambda c: T(c, out=c.under_file()), "plain_file"),
]

# ---- generate
CASES += [
    Case("generate-run-missing", lambda c: ["generate", c.missing, "--prompt", "a"], "does not exist"),
    Case("generate-run-is-file", lambda c: ["generate", c.text(), "--prompt", "a"], "not a run or checkpoint directory"),
    Case("generate-run-empty-dir", lambda c: ["generate", c.dir(), "--prompt", "a"], "no complete checkpoint"),
    Case("generate-truncated-safetensors", lambda c: ["generate", c.run_trunc, "--prompt", "a"], "corrupt or truncated"),
    Case("generate-damaged-meta", lambda c: ["generate", c.run_badmeta, "--prompt", "a"], "is damaged"),
    Case("generate-incompatible-config", lambda c: ["generate", c.run_incompat, "--prompt", "a"], "different model config"),
    Case("generate-tokenizer-larger-than-vocab", lambda c: ["generate", c.run_bigtok, "--prompt", "a"], "400 tokens"),
    Case("generate-binary-config", lambda c: ["generate", c.run_badcfg, "--prompt", "a"], "not UTF-8"),
    Case("generate-broken-tokenizer", lambda c: ["generate", c.run_badtok, "--prompt", "a"], "minimoe_tokenizer.json"),
    Case("generate-max-new-tokens-abc", lambda c: [*base(c, "generate"), "--max-new-tokens", "abc"], "invalid int value: 'abc'"),
    Case("generate-max-new-tokens-negative", lambda c: [*base(c, "generate"), "--max-new-tokens", "-1"], "--max-new-tokens must be >= 0"),
    Case("generate-temperature-negative", lambda c: [*base(c, "generate"), "--temperature", "-0.5"], "temperature"),
    Case("generate-temperature-nan", lambda c: [*base(c, "generate"), "--temperature", "nan"], "temperature"),
    Case("generate-top-p-above-one", lambda c: [*base(c, "generate"), "--top-p", "1.5"], "top_p"),
    Case("generate-top-p-zero", lambda c: [*base(c, "generate"), "--top-p", "0"], "top_p"),
    Case("generate-top-k-negative", lambda c: [*base(c, "generate"), "--top-k", "-3"], "top_k"),
    Case("generate-repetition-penalty-zero", lambda c: [*base(c, "generate"), "--repetition-penalty", "0"], "repetition_penalty"),
    Case("generate-beams-zero", lambda c: [*base(c, "generate"), "--beams", "0"], "--beams must be >= 1"),
    Case("generate-batch-size-zero", lambda c: [*base(c, "generate"), "--batch-size", "0"], "--batch-size must be >= 1"),
    Case("generate-threads-negative", lambda c: [*base(c, "generate"), "--threads", "-2"], "--threads must be >= 0"),
    Case("generate-speculative-and-beams", lambda c: [*base(c, "generate"), "--speculative", "--beams", "2"], "cannot be combined"),
    Case("generate-speculative-without-mtp", lambda c: ["generate", c.run_nomtp, "--prompt", "a", "--speculative"], "mtp_depth"),
    Case("generate-quantize-three", lambda c: [*base(c, "generate"), "--quantize", "3"], "invalid choice: 3"),
    Case("generate-group-size-zero", lambda c: [*base(c, "generate"), "--quantize", "4", "--group-size", "0"], "group"),
    Case("generate-group-size-not-dividing", lambda c: [*base(c, "generate"), "--quantize", "4", "--group-size", "7"], "group"),
    Case("generate-checkpoint-choice", lambda c: [*base(c, "generate"), "--checkpoint", "worst"], "invalid choice: 'worst'"),
    Case("generate-output-choice", lambda c: [*base(c, "generate"), "--output", "xml"], "invalid choice: 'xml'"),
    Case("generate-device-unknown", lambda c: [*base(c, "generate"), "--device", "tpu9"], "--device 'tpu9'"),
    Case("generate-device-no-cuda", lambda c: [*base(c, "generate"), "--device", "cuda"] if not torch.cuda.is_available() else pytest.skip("CUDA is available"), "no CUDA GPU"),
    Case("generate-prompt-file-missing", lambda c: ["generate", c.run, "--prompt-file", c.missing], "does not exist"),
    Case("generate-prompt-file-dir", lambda c: ["generate", c.run, "--prompt-file", c.dir()], "is a directory"),
    Case("generate-prompt-file-empty", lambda c: ["generate", c.run, "--prompt-file", c.empty()], "holds no prompts"),
    Case("generate-prompt-file-binary", lambda c: ["generate", c.run, "--prompt-file", c.binary()], "not UTF-8"),
    Case("generate-prompt-file-bad-json", lambda c: ["generate", c.run, "--prompt-file", c.file("p.jsonl", '{"prompt": "a"\n')], "line 1 is not valid JSON"),
    Case("generate-prompt-file-no-field", lambda c: ["generate", c.run, "--prompt-file", c.file("p.jsonl", '{"text": "a"}\n')], "no string 'prompt' field"),
]

# ---- eval
EV = ["--task", "perplexity", "--no-progress"]
CASES += [
    Case("eval-task-choice", lambda c: ["eval", c.run, "--task", "vibes", "--data", c.text()], "invalid choice: 'vibes'"),
    Case("eval-run-missing", lambda c: ["eval", c.missing, *EV, "--data", c.text()], "does not exist"),
    Case("eval-truncated-safetensors", lambda c: ["eval", c.run_trunc, *EV, "--data", c.text()], "corrupt or truncated"),
    Case("eval-incompatible-config", lambda c: ["eval", c.run_incompat, *EV, "--data", c.text()], "different model config"),
    Case("eval-tokenizer-larger-than-vocab", lambda c: ["eval", c.run_bigtok, *EV, "--data", c.text()], "400 tokens"),
    Case("eval-data-missing", lambda c: ["eval", c.run, *EV, "--data", c.missing], "missing.txt"),
    Case("eval-data-empty-dir", lambda c: ["eval", c.run, *EV, "--data", c.dir()], "adir"),
    Case("eval-data-empty-file", lambda c: ["eval", c.run, *EV, "--data", c.empty()], "empty.txt"),
    Case("eval-data-binary", lambda c: ["eval", c.run, *EV, "--data", c.binary()], "binary.txt"),
    Case("eval-mc-data-binary", lambda c: ["eval", c.run, "--task", "multiple-choice", "--data", c.binary("mc.jsonl")], "mc.jsonl"),
    Case("eval-mc-bad-json", lambda c: ["eval", c.run, "--task", "multiple-choice", "--data", c.file("mc.jsonl", "{nope\n")], "mc.jsonl"),
    Case("eval-mc-missing-field", lambda c: ["eval", c.run, "--task", "multiple-choice", "--data", c.file("mc.jsonl", '{"context": "a", "label": 0}\n')], "choices"),
    Case("eval-pairs-empty", lambda c: ["eval", c.run, "--task", "minimal-pairs", "--data", c.empty("p.jsonl")], "p.jsonl"),
    Case("eval-batch-size-zero", lambda c: ["eval", c.run, *EV, "--data", c.text(), "--batch-size", "0"], "--batch-size must be positive"),
    Case("eval-window-zero", lambda c: ["eval", c.run, *EV, "--data", c.text(), "--window", "0"], "window"),
    Case("eval-window-too-long", lambda c: ["eval", c.run, *EV, "--data", c.text(), "--window", "100000"], "window"),
    Case("eval-stride-zero", lambda c: ["eval", c.run, *EV, "--data", c.text(), "--stride", "0"], "stride"),
    Case("eval-limit-abc", lambda c: ["eval", c.run, *EV, "--data", c.text(), "--limit", "abc"], "invalid int value: 'abc'"),
    Case("eval-limit-zero", lambda c: ["eval", c.run, *EV, "--data", c.text(), "--limit", "0"], "limit"),
    Case("eval-option-for-other-task", lambda c: ["eval", c.run, *EV, "--data", c.text(), "--top-p", "0.5"], "--top-p applies only to"),
    Case("eval-field-not-role", lambda c: ["eval", c.run, "--task", "multiple-choice", "--data", c.text(), "--field", "oops"], "ROLE=NAME"),
    Case("eval-gen-temperature", lambda c: ["eval", c.run, "--task", "generation", "--data", c.gen(), "--temperature", "-1"], "--temperature must be >= 0"),
    Case("eval-gen-top-p", lambda c: ["eval", c.run, "--task", "generation", "--data", c.gen(), "--top-p", "2"], "--top-p must be in (0, 1]"),
    Case("eval-gen-max-new-tokens", lambda c: ["eval", c.run, "--task", "generation", "--data", c.gen(), "--max-new-tokens", "-5"], "--max-new-tokens must be >= 1, got -5"),
    Case("eval-gen-max-new-tokens-zero", lambda c: ["eval", c.run, "--task", "generation", "--data", c.gen(), "--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
    Case("eval-gen-top-k", lambda c: ["eval", c.run, "--task", "generation", "--data", c.gen(), "--top-k", "-5"], "--top-k must be >= 0"),
    Case("eval-device-unknown", lambda c: ["eval", c.run, *EV, "--data", c.text(), "--device", "gpu"], "--device 'gpu'"),
    Case("eval-gen-predictions-unwritable", lambda c: ["eval", c.run, "--task", "generation", "--data", c.gen(), "--predictions", c.under_file()], "minimoe eval: error: cannot write predictions ({under}: a parent of it is a file, not a directory)", exact=True),
    Case("eval-out-under-file", lambda c: ["eval", c.run, *EV, "--data", c.text(), "--out", c.under_file()], "plain_file already exists and is not a directory"),
    Case("eval-out-unwritable", lambda c: ["eval", c.run, *EV, "--data", c.text(), "--out", c.readonly()], "minimoe eval: error: cannot write results (permission denied for {ro}); choose another --out", nonroot=True, exact=True),
    Case("eval-dtype-choice", lambda c: ["eval", c.run, *EV, "--data", c.text(), "--dtype", "int8"], "invalid choice: 'int8'"),
]

# ---- export / import
CASES += [
    Case("export-run-missing", lambda c: ["export", c.missing, "--out", c.out], "does not exist"),
    Case("export-truncated-safetensors", lambda c: ["export", c.run_trunc, "--out", c.out], "corrupt or truncated"),
    Case("export-damaged-meta", lambda c: ["export", c.run_badmeta, "--out", c.out], "is damaged"),
    Case("export-incompatible-config", lambda c: ["export", c.run_incompat, "--out", c.out], "different model config"),
    Case("export-tokenizer-larger-than-vocab", lambda c: ["export", c.run_bigtok, "--out", c.out], "400 tokens"),
    Case("export-shard-size-abc", lambda c: ["export", c.run, "--out", c.out, "--shard-size", "abc"], "shard"),
    Case("export-shard-size-zero", lambda c: ["export", c.run, "--out", c.out, "--shard-size", "0MB"], "shard"),
    Case("export-out-not-empty", lambda c: ["export", c.run, "--out", c.file("exists/x.txt", "x").parent], "exists"),
    Case("export-out-under-file", lambda c: ["export", c.run, "--out", c.under_file()], "plain_file"),
    Case("export-out-unwritable", lambda c: ["export", c.run, "--out", c.readonly()], "minimoe export: error: cannot create {ro} (permission denied for {ro})", nonroot=True, exact=True),
    Case("export-format-choice", lambda c: ["export", c.run, "--out", c.out, "--format", "gpt2"], "invalid choice: 'gpt2'"),
    Case("export-out-a-file-force", lambda c: ["export", c.run, "--out", c.file("afile", "x"), "--force"], "afile is a file; --out names the folder"),
    Case("export-out-inside-the-run", lambda c: ["export", c.run, "--out", c.run / "hf", "--force"], "overlaps the run"),
    Case("export-format-cannot-express", lambda c: ["export", c.run, "--out", c.out, "--format", "mixtral"], "mixtral"),
    Case("import-missing", lambda c: ["import", c.missing, "--out", c.out], "missing.txt"),
    Case("import-a-file", lambda c: ["import", c.text(), "--out", c.out], "is not a directory"),
    Case("import-empty-dir", lambda c: ["import", c.dir(), "--out", c.out], "no config.json"),
    Case("import-config-invalid-json", lambda c: ["import", c.file("h/config.json", "{nope").parent, "--out", c.out], "is not valid JSON"),
    Case("import-config-binary", lambda c: ["import", c.file("h/config.json", BINARY).parent, "--out", c.out], "config.json"),
    Case("import-config-empty", lambda c: ["import", c.file("h/config.json", "").parent, "--out", c.out], "config.json"),
    Case("import-config-list", lambda c: ["import", c.file("h/config.json", "[1]").parent, "--out", c.out], "does not hold a JSON object"),
    Case("import-config-is-dir", lambda c: ["import", (c.dir("h"), c.dir("h/config.json"))[0], "--out", c.out], "config.json"),
    Case("import-no-weights", lambda c: ["import", c.file("h/config.json", (c.hf / "config.json").read_text()).parent, "--out", c.out], "no model.safetensors"),
    Case("import-unknown-model-type", lambda c: ["import", c.hf_copy(model_type="gpt2"), "--out", c.out], "'gpt2'"),
    Case("import-topk-gt-experts", lambda c: ["import", c.hf_copy(num_experts_per_tok=9), "--out", c.out], "num_experts_per_tok (9)"),
    Case("import-config-wrong-type", lambda c: ["import", c.hf_copy(hidden_size="wide"), "--out", c.out], "hidden_size"),
    Case("import-null-routed-scaling", lambda c: ["import", c.hf_copy(routed_scaling_factor=None), "--out", c.out], "'routed_scaling_factor' must be a number, got null"),
    Case("import-rope-scaling-not-a-mapping", lambda c: ["import", c.hf_copy(rope_scaling="yarn"), "--out", c.out], "'rope_scaling' must be a mapping"),
    Case("import-rope-scaling-bad-factor", lambda c: ["import", c.hf_copy(rope_scaling={"type": "yarn", "factor": "big"}), "--out", c.out], "'rope_scaling' cannot be read"),
    Case("import-truncated-safetensors", lambda c: ["import", c.hf_trunc, "--out", c.out], "corrupt or truncated"),
    Case("import-incompatible-config", lambda c: ["import", c.hf_incompat, "--out", c.out], "the config implies"),
    Case("import-tokenizer-larger-than-vocab", lambda c: ["import", c.hf_bigtok, "--out", c.out], "400 tokens"),
    Case("import-tokenizer-missing", lambda c: ["import", c.hf, "--out", c.out, "--tokenizer", c.missing], "missing.txt"),
    Case("import-out-holds-run", lambda c: ["import", c.hf, "--out", c.run], "already holds a run"),
    Case("import-out-under-file", lambda c: ["import", c.hf, "--out", c.under_file()], "plain_file"),
    Case("import-out-unwritable", lambda c: ["import", c.hf, "--out", c.readonly()], "minimoe import: error: permission denied for {ro}", nonroot=True, exact=True),
]

# ---- params
CASES += [
    Case("params-config-missing", lambda c: ["params", c.tmp / "nope.yaml"], "does not exist"),
    Case("params-target-and-preset", lambda c: ["params", "tiny", "--preset", "small"], "give either tiny or --preset small, not both"),
    Case("params-config-dir", lambda c: ["params", c.dir("cfg.yaml")], "is a directory"),
    Case("params-config-binary", lambda c: ["params", c.binary("b.yaml")], "not UTF-8"),
    Case("params-config-invalid-yaml", lambda c: ["params", c.file("b.yaml", "model: {num_hidden_layers: 2\n")], "not valid YAML"),
    Case("params-config-unknown-key", lambda c: ["params", c.file("b.yaml", "model:\n  n_layer: 2\n")], "did you mean 'model.num_hidden_layers'"),
    Case("params-preset-typo", lambda c: ["params", "deepseek-v4"], "deepseek-v4"),
    Case("params-context-abc", lambda c: ["params", "tiny", "--context", "abc"], "invalid int value: 'abc'"),
    Case("params-context-zero", lambda c: ["params", "tiny", "--memory", "--context", "0"], "--context"),
    Case("params-override-unknown", lambda c: ["params", "tiny", "model.n_head=4"], "did you mean 'model.num_attention_heads'"),
    Case("params-topk-gt-experts", lambda c: ["params", "tiny", "model.num_experts_per_tok=64"], "is larger than n_routed_experts"),
    Case("params-zero-heads", lambda c: ["params", "tiny", "model.num_attention_heads=0"], "num_attention_heads must be positive"),
    Case("params-negative-vocab", lambda c: ["params", "tiny", "model.vocab_size=-5"], "vocab_size must be positive"),
    Case("params-mtp-negative", lambda c: ["params", "tiny", "model.mtp_depth=-1"], "mtp_depth must be >= 0"),
    Case("params-scoring-choice", lambda c: ["params", "tiny", "model.scoring_func=relu"], "scoring_func must be one of"),
    Case("params-sigmoid-groups-of-one", lambda c: ["params", "tiny", "model.n_routed_experts=4", "model.n_group=4", "model.topk_group=2", "model.num_experts_per_tok=2"], "n_group (4) leaves 1 expert per group"),
]

# ---- plot
CASES += [
    Case("plot-run-missing", lambda c: ["plot", c.missing, "--out", c.out], "missing.txt"),
    Case("plot-run-is-file", lambda c: ["plot", c.text(), "--out", c.out], "is a file, not a run directory"),
    Case("plot-not-a-run", lambda c: ["plot", c.dir(), "--out", c.out], "not a run directory"),
    Case("plot-no-metrics", lambda c: ["plot", (c.plot_run(""), (c.tmp / "r/metrics.jsonl").unlink())[0], "--out", c.out], "metrics.jsonl"),
    Case("plot-empty-metrics", lambda c: ["plot", c.plot_run(""), "--out", c.out], "metrics.jsonl"),
    Case("plot-binary-metrics", lambda c: ["plot", c.plot_run(BINARY), "--out", c.out], "metrics.jsonl"),
    Case("plot-garbage-metrics", lambda c: ["plot", c.plot_run("{oops\n[1,2]\n"), "--out", c.out], "metrics.jsonl"),
    Case("plot-metrics-is-dir", lambda c: ["plot", (c.plot_run(""), (c.tmp / "r/metrics.jsonl").unlink(), c.dir("r/metrics.jsonl"))[0], "--out", c.out], "metrics.jsonl"),
    Case("plot-dpi-zero", lambda c: ["plot", c.run, "--out", c.out, "--dpi", "0"], "--dpi must be positive"),
    Case("plot-dpi-abc", lambda c: ["plot", c.run, "--out", c.out, "--dpi", "abc"], "invalid int value: 'abc'"),
    Case("plot-steps-abc", lambda c: ["plot", c.run, "--out", c.out, "--steps", "1,b"], "--steps must be comma-separated integers"),
    Case("plot-steps-negative", lambda c: ["plot", c.run, "--out", c.out, "--steps", "-1"], "--steps must be non-negative"),
    Case("plot-out-under-file", lambda c: ["plot", c.run, "--out", c.under_file()], "plain_file"),
    Case("plot-out-unwritable", lambda c: ["plot", c.run, "--out", c.readonly()], "minimoe plot: error: cannot create output directory {ro} (Permission denied)", nonroot=True, exact=True),
]

# ---- serve
CASES += [
    Case("serve-port-in-use", lambda c: ["serve", c.run, "--port", c.busy_port()], "already in use"),
    Case("serve-port-too-large", lambda c: ["serve", c.run, "--port", "70000"], "--port must be between 0 and 65535"),
    Case("serve-port-negative", lambda c: ["serve", c.run, "--port", "-1"], "--port must be between 0 and 65535"),
    Case("serve-model-name-empty", lambda c: ["serve", c.run, "--port", "0", "--model-name", " "], "--model-name must not be empty"),
    Case("serve-port-abc", lambda c: ["serve", c.run, "--port", "http"], "invalid int value: 'http'"),
    Case("serve-run-missing", lambda c: ["serve", c.missing, "--port", "0"], "does not exist"),
    Case("serve-run-empty-dir", lambda c: ["serve", c.dir(), "--port", "0"], "no complete checkpoint"),
    Case("serve-truncated-safetensors", lambda c: ["serve", c.run_trunc, "--port", "0"], "corrupt or truncated"),
    Case("serve-incompatible-config", lambda c: ["serve", c.run_incompat, "--port", "0"], "different model config"),
    Case("serve-tokenizer-larger-than-vocab", lambda c: ["serve", c.run_bigtok, "--port", "0"], "400 tokens"),
    Case("serve-max-active-zero", lambda c: ["serve", c.run, "--port", "0", "--max-active", "0"], "--max-active must be >= 1"),
    Case("serve-device-unknown", lambda c: ["serve", c.run, "--port", "0", "--device", "tpu9"], "--device 'tpu9'"),
    Case("serve-log-level-choice", lambda c: ["serve", c.run, "--log-level", "loud"], "invalid choice: 'loud'"),
    Case("serve-forwarded-not-an-address", lambda c: ["serve", c.run, "--forwarded-allow-ips", "127.0.0.1,proxy"], "'proxy' is not an IP address or network"),
    Case("serve-forwarded-empty", lambda c: ["serve", c.run, "--forwarded-allow-ips", " , "], "got nothing"),
    Case("serve-forwarded-host-bits", lambda c: ["serve", c.run, "--forwarded-allow-ips", "10.0.0.1/8"], "the network is 10.0.0.0/8"),
]

# ---- quantize
Q = ["--bits", "8"]
CASES += [
    Case("quantize-bits-three", lambda c: ["quantize", c.run, "--bits", "3", "--out", c.out], "invalid choice: 3"),
    Case("quantize-bits-abc", lambda c: ["quantize", c.run, "--bits", "eight", "--out", c.out], "invalid int value: 'eight'"),
    Case("quantize-group-size-zero", lambda c: ["quantize", c.run, "--bits", "4", "--group-size", "0", "--out", c.out], "group"),
    Case("quantize-group-size-not-dividing", lambda c: ["quantize", c.run, "--bits", "4", "--group-size", "7", "--out", c.out], "group"),
    Case("quantize-eval-tokens-one", lambda c: ["quantize", c.run, *Q, "--out", c.out, "--eval-tokens", "1"], "--eval-tokens must be at least 2"),
    Case("quantize-threads-negative", lambda c: ["quantize", c.run, *Q, "--out", c.out, "--threads", "-1"], "--threads must be >= 0"),
    Case("quantize-seq-len-zero", lambda c: ["quantize", c.run, *Q, "--out", c.out, "--eval-data", c.text(), "--seq-len", "0"], "seq-len"),
    Case("quantize-eval-data-missing", lambda c: ["quantize", c.run, *Q, "--out", c.out, "--eval-data", c.missing], "missing.txt"),
    Case("quantize-eval-data-empty", lambda c: ["quantize", c.run, *Q, "--out", c.out, "--eval-data", c.empty()], "empty.txt"),
    Case("quantize-eval-data-binary", lambda c: ["quantize", c.run, *Q, "--out", c.out, "--eval-data", c.binary()], "binary.txt"),
    Case("quantize-run-missing", lambda c: ["quantize", c.missing, *Q, "--out", c.out], "does not exist"),
    Case("quantize-truncated-safetensors", lambda c: ["quantize", c.run_trunc, *Q, "--out", c.out], "corrupt or truncated"),
    Case("quantize-tokenizer-larger-than-vocab", lambda c: ["quantize", c.run_bigtok, *Q, "--out", c.out], "400 tokens"),
    Case("quantize-incompatible-config", lambda c: ["quantize", c.run_incompat, *Q, "--out", c.out], "different model config"),
    Case("quantize-out-holds-run", lambda c: ["quantize", c.run, *Q, "--out", c.run], "run"),
    Case("quantize-out-under-file", lambda c: ["quantize", c.run, *Q, "--out", c.under_file()], "plain_file"),
    Case("quantize-out-unwritable", lambda c: ["quantize", c.run, *Q, "--out", c.readonly()], "minimoe quantize: error: cannot create {ro} (permission denied for {ro})", nonroot=True, exact=True),
]

# ---- sft / lora
CASES += [
    Case("sft-no-data", lambda c: ["sft", c.run, "--out", c.out], "--data is required"),
    Case("sft-data-missing", lambda c: ["sft", c.run, "--data", c.missing, "--out", c.out], "missing.txt"),
    Case("sft-data-dir", lambda c: ["sft", c.run, "--data", c.dir(), "--out", c.out], "is a directory"),
    Case("sft-data-empty", lambda c: ["sft", c.run, "--data", c.empty("c.jsonl"), "--out", c.out], "c.jsonl"),
    Case("sft-data-binary", lambda c: ["sft", c.run, "--data", c.binary("c.jsonl"), "--out", c.out], "c.jsonl"),
    Case("sft-data-bad-json", lambda c: ["sft", c.run, "--data", c.file("c.jsonl", "{nope\n"), "--out", c.out], "c.jsonl"),
    Case("sft-data-no-fields", lambda c: ["sft", c.run, "--data", c.file("c.jsonl", '{"text": "a"}\n'), "--out", c.out], "c.jsonl"),
    Case("sft-val-data-missing", lambda c: [*base(c, "sft"), "--val-data", c.missing], "missing.txt"),
    Case("sft-run-missing", lambda c: ["sft", c.missing, "--data", c.chat(), "--out", c.out], "does not exist"),
    Case("sft-truncated-safetensors", lambda c: ["sft", c.run_trunc, "--data", c.chat(), "--out", c.out], "corrupt or truncated"),
    Case("sft-tokenizer-larger-than-vocab", lambda c: ["sft", c.run_bigtok, "--data", c.chat(), "--out", c.out], "400 tokens"),
    Case("sft-epochs-zero", lambda c: [*base(c, "sft"), "--epochs", "0"], "--epochs"),
    Case("sft-epochs-abc", lambda c: [*base(c, "sft"), "--epochs", "many"], "invalid float value: 'many'"),
    Case("sft-override-unknown", lambda c: [*base(c, "sft"), "train.lrr=0.1"], "did you mean 'train.lr'"),
    Case("sft-override-negative-lr", lambda c: [*base(c, "sft"), "train.lr=-1"], "train.lr must be positive"),
    Case("sft-override-model", lambda c: [*base(c, "sft"), "model.hidden_size=64"], "model.hidden_size"),
    Case("sft-out-holds-run", lambda c: ["sft", c.run, "--data", c.chat(), "--out", c.run], "already holds a run"),
    Case("sft-out-under-file", lambda c: ["sft", c.run, "--data", c.chat(), "--out", c.under_file()], "plain_file"),
    Case("sft-out-unwritable", lambda c: ["sft", c.run, "--data", c.chat(), "--out", c.readonly()], "minimoe sft: error: cannot write to output directory {ro} (Permission denied)", nonroot=True, exact=True),
    Case("lora-rank-zero", lambda c: [*base(c, "lora"), "--rank", "0"], "--rank"),
    Case("lora-rank-abc", lambda c: [*base(c, "lora"), "--rank", "r"], "invalid int value: 'r'"),
    Case("lora-alpha-zero", lambda c: [*base(c, "lora"), "--alpha", "0"], "--alpha"),
    Case("lora-targets-unknown", lambda c: [*base(c, "lora"), "--targets", "attention,everything"], "everything"),
    Case("lora-targets-empty", lambda c: [*base(c, "lora"), "--targets", ","], "targets"),
    Case("lora-adapter-without-merge", lambda c: ["lora", c.run, "--out", c.out, "--adapter", c.dir()], "--adapter merges a saved adapter"),
    Case("lora-adapter-missing", lambda c: ["lora", c.run, "--out", c.out, "--merge", "--adapter", c.missing], "missing.txt"),
    Case("lora-adapter-empty-dir", lambda c: ["lora", c.run, "--out", c.out, "--merge", "--adapter", c.dir()], "adir"),
    Case("lora-no-data", lambda c: ["lora", c.run, "--out", c.out], "--data is required"),
    Case("lora-data-binary", lambda c: ["lora", c.run, "--data", c.binary("c.jsonl"), "--out", c.out], "c.jsonl"),
]

# ---- upcycle
U = ["--experts", "4", "--top-k", "2", "--tokenizer", "byte"]
CASES += [
    Case("upcycle-dense-missing", lambda c: ["upcycle", c.missing, *U, "--out", c.out], "missing.txt"),
    Case("upcycle-dense-is-file", lambda c: ["upcycle", c.text(), *U, "--out", c.out], "is not a directory"),
    Case("upcycle-dense-empty-dir", lambda c: ["upcycle", c.dir(), *U, "--out", c.out], "no config.json"),
    Case("upcycle-config-invalid-json", lambda c: ["upcycle", c.file("d/config.json", "{oops").parent, *U, "--out", c.out], "not valid JSON"),
    Case("upcycle-config-binary", lambda c: ["upcycle", c.file("d/config.json", BINARY).parent, *U, "--out", c.out], "config.json"),
    Case("upcycle-config-incomplete", lambda c: ["upcycle", c.file("d/config.json", '{"model_type": "llama"}').parent, *U, "--out", c.out], "config.json"),
    Case("upcycle-not-llama", lambda c: ["upcycle", c.hf, *U, "--out", c.out], "deepseek_v3"),
    Case("upcycle-truncated-safetensors", lambda c: ["upcycle", c.llama_trunc, *U, "--out", c.out], "corrupt or truncated"),
    Case("upcycle-experts-zero", lambda c: ["upcycle", c.llama, "--experts", "0", "--top-k", "1", "--out", c.out], "--experts"),
    Case("upcycle-experts-abc", lambda c: ["upcycle", c.llama, "--experts", "four", "--top-k", "1", "--out", c.out], "invalid int value: 'four'"),
    Case("upcycle-topk-gt-experts", lambda c: ["upcycle", c.llama, "--experts", "4", "--top-k", "5", "--out", c.out], "num_experts_per_tok (5)"),
    Case("upcycle-topk-zero", lambda c: ["upcycle", c.llama, "--experts", "4", "--top-k", "0", "--out", c.out], "num_experts_per_tok"),
    Case("upcycle-granularity-zero", lambda c: ["upcycle", c.llama, *U, "--granularity", "0", "--out", c.out], "--granularity 0"),
    Case("upcycle-granularity-not-dividing", lambda c: ["upcycle", c.llama, *U, "--granularity", "3", "--out", c.out], "--granularity 3"),
    Case("upcycle-dense-layers", lambda c: ["upcycle", c.llama, *U, "--dense-layers", "5", "--out", c.out], "--dense-layers"),
    Case("upcycle-router-std-negative", lambda c: ["upcycle", c.llama, *U, "--router-std", "-1", "--out", c.out], "--router-std"),
    Case("upcycle-scoring-choice", lambda c: ["upcycle", c.llama, *U, "--scoring", "relu", "--out", c.out], "invalid choice: 'relu'"),
    Case("upcycle-override-fixed", lambda c: ["upcycle", c.llama, *U, "--out", c.out, "model.hidden_size=64"], "model.hidden_size is fixed"),
    Case("upcycle-override-unknown", lambda c: ["upcycle", c.llama, *U, "--out", c.out, "model.aux_fre_bias=false"], "did you mean 'model.aux_free_bias'"),
    Case("upcycle-override-not-model", lambda c: ["upcycle", c.llama, *U, "--out", c.out, "train.lr=1"], "model.KEY=VALUE"),
    Case("upcycle-tokenizer-larger-than-vocab", lambda c: ["upcycle", c.llama, "--experts", "4", "--top-k", "2", "--tokenizer", c.bigtok_dir(), "--out", c.out], "400 tokens"),
    Case("upcycle-out-holds-run", lambda c: ["upcycle", c.llama, *U, "--out", c.run], "already holds a run"),
    Case("upcycle-out-under-file", lambda c: ["upcycle", c.llama, *U, "--out", c.under_file()], "plain_file"),
    Case("upcycle-out-unwritable", lambda c: ["upcycle", c.llama, *U, "--out", c.readonly()], "minimoe upcycle: error: permission denied for {ro}", nonroot=True, exact=True),
]

# ---- compare
CASES += [
    Case("compare-sweep-missing", lambda c: ["compare", c.tmp / "nope.yaml", "--plan"], "does not exist"),
    Case("compare-sweep-dir", lambda c: ["compare", c.dir(), "--plan"], "is a directory"),
    Case("compare-sweep-empty", lambda c: ["compare", c.empty("s.yaml"), "--plan"], "variants"),
    Case("compare-sweep-binary", lambda c: ["compare", c.binary("s.yaml"), "--plan"], "not UTF-8"),
    Case("compare-sweep-invalid-yaml", lambda c: ["compare", c.file("s.yaml", "variants: {a: [x\n"), "--plan"], "not valid YAML"),
    Case("compare-sweep-unknown-key", lambda c: ["compare", c.sweep(extra="variant: {}\n"), "--plan"], "did you mean 'variants'"),
    Case("compare-sweep-bad-budget", lambda c: ["compare", c.sweep(budget={"hours": 3}), "--plan"], "budget"),
    Case("compare-sweep-clock-without-minutes", lambda c: ["compare", c.sweep(budget={"steps": 3, "clock": "cpu"}), "--plan"], "clock goes with a minutes budget"),
    Case("compare-cpu-clock-on-two-threads", lambda c: ["compare", c.sweep(budget={"minutes": 3, "clock": "cpu"}, variants={"a": ["train.threads=2"]}), "--plan"], "runs on train.threads=2 would not be charged alike; add train.threads=1"),
    Case("compare-sweep-bad-clock", lambda c: ["compare", c.sweep(budget={"minutes": 3, "clock": "gpu"}), "--plan"], "clock must be wall or cpu"),
    Case("compare-sweep-bad-report", lambda c: ["compare", c.sweep(extra="report: ../r.md\n"), "--plan"], "report must be a file name"),
    Case("compare-sweep-negative-budget", lambda c: ["compare", c.sweep(budget={"tokens": -3}), "--plan"], "budget tokens must be a positive finite number"),
    Case("compare-sweep-infinite-steps", lambda c: ["compare", c.sweep(budget={"steps": float("inf")}), "--plan"], "budget steps must be a positive finite number"),
    Case("compare-sweep-infinite-flops", lambda c: ["compare", c.sweep(budget={"flops": float("inf")}), "--plan"], "budget flops must be a positive finite number"),
    Case("compare-sweep-bad-seeds", lambda c: ["compare", c.sweep(seeds="one"), "--plan"], "seeds"),
    Case("compare-jobs-zero", lambda c: ["compare", c.sweep(), "--plan", "--jobs", "0"], "--jobs must be at least 1, got 0"),
    Case("compare-contrast-with-itself", lambda c: ["compare", c.sweep(contrasts=[["a", "a"]]), "--plan"], "compares a variant with itself"),
    Case("compare-report-only-no-runs", lambda c: ["compare", c.sweep(), "--report-only", "--out", c.tmp / "typo"], "holds no run of this sweep"),
    Case("compare-out-a-file", lambda c: ["compare", c.sweep(), "--out", c.file("afile", "x")], "exists and is not a directory"),
    Case("compare-sweep-name-a-path", lambda c: ["compare", c.sweep(name="../up"), "--plan"], "name '../up' cannot be a directory name"),
    Case("compare-variant-name-a-path", lambda c: ["compare", c.sweep(variants={"a/b": []}), "--plan"], "variant name 'a/b' cannot be"),
    Case("compare-variant-unknown-key", lambda c: ["compare", c.sweep(variants={"a": ["model.n_layer=2"]}), "--plan"], "did you mean 'model.num_hidden_layers'"),
    Case("compare-variant-invalid-model", lambda c: ["compare", c.sweep(variants={"a": ["model.num_experts_per_tok=99"]}), "--plan"], "is larger than n_routed_experts"),
    Case("compare-data-missing", lambda c: ["compare", c.sweep(), "--plan", "--data", c.missing], "missing.txt"),
    Case("compare-out-under-file", lambda c: ["compare", c.sweep(), "--report-only", "--out", c.under_file()], "plain_file"),
    # refused once, before the first run (not once per run, every run failing, then the report)
    Case("compare-out-unwritable", lambda c: ["compare", c.sweep(), "--out", c.readonly()], "minimoe compare: error: cannot create the sweep's output directory {ro} (permission denied for {ro})", nonroot=True, exact=True),
]

# ---- inspect
I = ["--text", "a cat"]
CASES += [
    Case("inspect-nothing-asked", lambda c: ["inspect", c.run], "give --text"),
    Case("inspect-run-missing", lambda c: ["inspect", c.missing, *I], "does not exist"),
    Case("inspect-truncated-safetensors", lambda c: ["inspect", c.run_trunc, *I], "corrupt or truncated"),
    Case("inspect-incompatible-config", lambda c: ["inspect", c.run_incompat, *I], "different model config"),
    Case("inspect-tokenizer-larger-than-vocab", lambda c: ["inspect", c.run_bigtok, *I], "400 tokens"),
    Case("inspect-corpus-missing", lambda c: ["inspect", c.run, "--corpus", c.missing], "missing.txt"),
    Case("inspect-corpus-empty", lambda c: ["inspect", c.run, "--corpus", c.empty()], "empty.txt"),
    Case("inspect-corpus-binary", lambda c: ["inspect", c.run, "--corpus", c.binary()], "binary.txt"),
    Case("inspect-corpus-empty-dir", lambda c: ["inspect", c.run, "--corpus", c.dir()], "adir"),
    Case("inspect-max-tokens-zero", lambda c: ["inspect", c.run, "--corpus", c.text(), "--max-tokens", "0"], "--max-tokens"),
    Case("inspect-top-zero", lambda c: ["inspect", c.run, "--corpus", c.text(), "--top", "0"], "--top"),
    Case("inspect-html-without-text", lambda c: ["inspect", c.run, "--corpus", c.text(), "--html", c.out], "--html needs --text"),
    Case("inspect-coact-without-corpus", lambda c: ["inspect", c.run, *I, "--coact-png", c.out], "--coact-png needs --corpus"),
    Case("inspect-html-under-file", lambda c: ["inspect", c.run, *I, "--html", c.under_file()], "plain_file"),
    Case("inspect-html-unwritable", lambda c: ["inspect", c.run, *I, "--html", c.readonly()], "minimoe inspect: error: cannot write the HTML page (permission denied for {ro})", nonroot=True, exact=True),
    Case("inspect-coact-under-file", lambda c: ["inspect", c.run, "--corpus", c.text(), "--coact-png", c.under_file()], "plain_file"),
    Case("inspect-which-choice", lambda c: ["inspect", c.run, *I, "--which", "worst"], "invalid choice: 'worst'"),
]

# ---- bench
B = ["bench", "--quick", "--no-progress"]
CASES += [
    Case("bench-config-missing", lambda c: [*B, "--config", c.tmp / "nope.yaml"], "does not exist"),
    Case("bench-config-dir", lambda c: [*B, "--config", c.dir()], "is a directory"),
    Case("bench-config-binary", lambda c: [*B, "--config", c.binary("b.yaml")], "not UTF-8"),
    Case("bench-config-invalid-yaml", lambda c: [*B, "--config", c.file("b.yaml", "model:\n  num_hidden_layers: [2\n")], "not valid YAML"),
    Case("bench-config-unknown-key", lambda c: [*B, "--config", c.file("b.yaml", "model:\n  n_expert: 4\n")], "did you mean"),
    Case("bench-override-unknown", lambda c: [*B, "train.batchsize=2"], "did you mean 'train.batch_size'"),
    Case("bench-invalid-model", lambda c: [*B, "model.num_experts_per_tok=99"], "is larger than n_routed_experts"),
    Case("bench-against-choice", lambda c: [*B, "--against", "vllm"], "invalid choice: 'vllm'"),
    Case("bench-precision-choice", lambda c: [*B, "--precision", "fp8"], "invalid choice: 'fp8'"),
    Case("bench-repeats-zero", lambda c: [*B, "--repeats", "0"], "--repeats must be at least 1"),
    Case("bench-repeats-abc", lambda c: [*B, "--repeats", "x"], "invalid int value: 'x'"),
    Case("bench-threads-zero", lambda c: [*B, "--threads", "0"], "--threads must be at least 1"),
    Case("bench-device-unknown", lambda c: [*B, "--device", "tpu9"], "tpu9"),
    Case("bench-preset-typo", lambda c: [*B, "--preset", "tinyy"], "tinyy"),
]
# fmt: on


def _ids(cases: list[Case]) -> list[str]:
    ids = [c.id for c in cases]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    return ids


def _check(case: Case, rc: int, out: str, err: str, ctx: Ctx | None = None) -> None:
    assert "Traceback" not in out + err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    assert rc == case.code, f"exit code {rc}, expected {case.code}: {err}"
    if case.exact:
        assert lines[0] == case.expect.format(**ctx.paths)
    else:
        assert case.expect.lower() in lines[0].lower(), f"{case.expect!r} not in {lines[0]!r}"


@pytest.fixture()
def ctx(world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MINIMOE_CACHE", str(tmp_path / "cache"))
    try:
        import uvicorn

        def no_serving(*a, **k):  # a serve case that gets this far would otherwise block forever
            raise RuntimeError("the server started")

        monkeypatch.setattr(uvicorn.Server, "run", no_serving)
    except ImportError:  # without the serve extra, `minimoe serve` stops before serving anyway
        pass
    c = Ctx(world, tmp_path)
    yield c
    if getattr(c, "tmp_socket", None) is not None:
        c.tmp_socket.close()
    for d in tmp_path.rglob("ro"):  # let pytest clean up
        d.chmod(0o700)


@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_bad_input(case: Case, ctx: Ctx, capsys):
    if case.nonroot and not PERMISSIONS_ENFORCED:
        pytest.skip("file permissions are not enforced for this user (root)")
    argv = [str(a) for a in case.argv(ctx)]
    with permissions_enforced_for_root() if case.nonroot else contextlib.nullcontext():
        rc = main(argv)
    out, err = capsys.readouterr()
    _check(case, rc, out, err, ctx)


def test_table_covers_every_command():
    covered = {c.id.split("-")[0] for c in CASES}
    assert set(COMMANDS) <= covered, set(COMMANDS) - covered
    assert len(CASES) >= 100


def test_good_inputs_work(ctx: Ctx, capsys):
    """The shared fixtures are valid where they are not damaged, so each case fails for its own reason."""
    assert main(["generate", str(ctx.run), "--prompt", "a", "--max-new-tokens", "2"]) == 0
    assert main(["import", str(ctx.hf), "--out", str(ctx.out / "imported")]) == 0
    assert main(["upcycle", str(ctx.llama), *U, "--out", str(ctx.out / "upcycled")]) == 0
    assert main(["compare", str(ctx.sweep()), "--plan"]) == 0
    capsys.readouterr()


def test_export_with_force_never_deletes_the_run_it_exports(ctx: Ctx, capsys):
    """`export RUN --out RUN --force` (or a folder holding the run) is refused before anything is written:
    --force would otherwise replace the run's own folder with the export."""
    import shutil

    run = ctx.tmp / "copy" / "run"
    shutil.copytree(ctx.run, run)
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    for out in (run, run.parent):
        assert main(["export", str(run), "--out", str(out), "--force"]) == 2
        err = capsys.readouterr().err
        assert "overlaps the run" in err and err.count("\n") == 1
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before


# ---------------------------------------------------------------- real processes

PROCESS_CASES = [
    "generate-run-missing",
    "train-override-unknown",
    "generate-max-new-tokens-abc",
    "generate-truncated-safetensors",
    "serve-port-in-use",
]


@pytest.mark.parametrize("case_id", PROCESS_CASES)
def test_bad_input_in_a_process(case_id: str, ctx: Ctx):
    case = next(c for c in CASES if c.id == case_id)
    argv = [str(a) for a in case.argv(ctx)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    p = subprocess.run(
        [sys.executable, "-m", "minimoe", *argv], capture_output=True, text=True, env=env, timeout=120
    )
    _check(case, p.returncode, p.stdout, p.stderr)


# ---------------------------------------------------------------- the CLI boundary


def _boom(args):
    raise RuntimeError("something broke\nacross two lines")


def test_internal_error_is_one_line_and_exit_1(monkeypatch, capsys):
    import minimoe.cli.params as params

    monkeypatch.setattr(params, "run", _boom)
    assert main(["params", "tiny"]) == 1
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and "Traceback" not in out + err
    assert "internal error: RuntimeError: something broke across two lines" in err
    assert "--debug" in err


@pytest.mark.parametrize("argv", [["--debug", "params", "tiny"], ["params", "--debug", "tiny"]])
def test_debug_reraises_before_or_after_the_command(monkeypatch, argv):
    import minimoe.cli.params as params

    monkeypatch.setattr(params, "run", _boom)
    with pytest.raises(RuntimeError, match="something broke"):
        main(argv)


def test_debug_shows_user_errors_too(capsys):
    assert main(["params", "tiny", "model.num_attention_heads=0"]) == 2
    with pytest.raises(MinimoeError, match="num_attention_heads must be positive"):
        main(["params", "--debug", "tiny", "model.num_attention_heads=0"])


def test_version(capsys):
    from importlib.metadata import version

    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"minimoe {version('minimoe')}\n"


def test_debug_after_the_command_parses_like_before():
    from minimoe.cli.main import build_parser

    parser = build_parser()
    for argv, debug in ((["train"], False), (["--debug", "train"], True), (["train", "--debug"], True)):
        args, _ = parser.parse_known_args(argv)
        assert args.debug is debug, argv


def test_multi_line_user_error_becomes_one_line(monkeypatch, capsys):
    import minimoe.cli.params as params

    def multi(args):
        raise MinimoeError("first part\n  second part")

    monkeypatch.setattr(params, "run", multi)
    assert main(["params"]) == 2
    assert capsys.readouterr().err == "minimoe params: error: first part second part\n"


@pytest.mark.parametrize(
    "exc, expect",
    [
        (FileNotFoundError(2, "No such file or directory", "/x/y"), "/x/y does not exist"),
        (PermissionError(13, "Permission denied", "/ro/out"), "permission denied for /ro/out"),
        (
            NotADirectoryError(20, "Not a directory", "/f/out"),
            "/f/out: a parent of it is a file, not a directory",
        ),
        (OSError(28, "No space left on device", "/full/x"), "no space left on the device holding /full/x"),
        (OSError(5, "Input/output error", "/bad/disk"), "cannot use /bad/disk (Input/output error)"),
    ],
)
def test_file_system_errors_naming_a_path_are_user_errors(monkeypatch, capsys, exc, expect):
    import minimoe.cli.params as params

    def fail(args):
        raise exc

    monkeypatch.setattr(params, "run", fail)
    assert main(["params"]) == 2
    assert capsys.readouterr().err == f"minimoe params: error: {expect}\n"


def test_a_missing_optional_package_names_its_extra(monkeypatch, capsys):
    """An optional integration that is not installed is the user's to install: one sentence naming the
    extra, exit 2, not an internal error."""
    import minimoe.cli.params as params

    def fail(args):
        raise ModuleNotFoundError("No module named 'rouge_score.scoring'", name="rouge_score.scoring")

    monkeypatch.setattr(params, "run", fail)
    assert main(["params"]) == 2
    assert (
        capsys.readouterr().err
        == "minimoe params: error: this needs rouge_score (pip install 'minimoe[eval]')\n"
    )

    def not_optional(args):
        raise ModuleNotFoundError("No module named 'minimoe.gone'", name="minimoe.gone")

    monkeypatch.setattr(params, "run", not_optional)
    assert main(["params"]) == 1 and "internal error: ModuleNotFoundError" in capsys.readouterr().err


def _without(monkeypatch, *missing: str) -> None:
    """Make importlib.util.find_spec report `missing` as not installed."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in missing else real(name, *a)
    )


def test_commands_name_a_missing_optional_package_before_their_work(ctx: Ctx, monkeypatch, capsys, tmp_path):
    import minimoe.eval.runner

    def started(*a, **k):
        raise AssertionError("the evaluation ran before its metrics' packages were checked")

    monkeypatch.setattr(minimoe.eval.runner, "evaluate_run", started)
    _without(monkeypatch, "sacrebleu", "matplotlib", "datasets", "transformers")
    gen = tmp_path / "gen.jsonl"
    gen.write_text('{"prompt": "a", "reference": "b"}\n')
    cases = [
        (["eval", ctx.run, "--task", "generation", "--data", gen], "sacrebleu (pip install 'minimoe[eval]')"),
        (
            ["plot", ctx.run, "--out", tmp_path / "p"],
            "minimoe plot needs matplotlib (pip install 'minimoe[plot]')",
        ),
        (["inspect", ctx.run, "--corpus", gen, "--coact-png", tmp_path / "c.png"], "needs matplotlib"),
        (
            ["train", "--data", "hf:stories", "--out", tmp_path / "r", *TINY],
            "needs datasets (pip install 'minimoe[data]')",
        ),
        (["export", ctx.run, "--out", tmp_path / "x", "--verify"], "--verify needs transformers"),
    ]
    for argv, expect in cases:
        assert main([str(a) for a in argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expect in err, (argv, err)
    assert not any((tmp_path / d).exists() for d in ("p", "r", "x"))


def test_os_error_without_a_path_is_internal(monkeypatch, capsys):
    import minimoe.cli.params as params

    def fail(args):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(params, "run", fail)
    assert main(["params"]) == 1
    assert "internal error: OSError" in capsys.readouterr().err


# ---------------------------------------------------------------- inputs that used to crash or hang


def _run_copy(c: Ctx, name: str, edit: Callable[[Path], None]) -> Path:
    """A copy of the trained run with `edit` applied to each checkpoint directory."""
    dst = c.tmp / name
    shutil.copytree(c.w.run, dst)
    for s in _steps(dst):
        edit(s)
    return dst


def _huge_config(step: Path) -> None:
    cfg = yaml.safe_load((step / "config.yaml").read_text())
    cfg["model"]["moe_intermediate_size"] = 100_000_000  # about 150 GiB of fp32 expert weights
    (step / "config.yaml").write_text(yaml.safe_dump(cfg))


def _nan_weight(step: Path) -> None:
    from safetensors.torch import load_file, save_file

    sd = load_file(str(step / "model.safetensors"))
    name = next(k for k in sd if k.endswith("o_proj.weight"))
    sd[name][0, 0] = float("nan")
    save_file(sd, str(step / "model.safetensors"))


def _loop(c: Ctx) -> Path:
    a, b = c.tmp / "loop_a", c.tmp / "loop_b"
    a.symlink_to(b)
    b.symlink_to(a)
    return a


def _train_on(c: Ctx, data, *extra) -> list:
    return ["train", "--data", data, "--out", c.out, "--no-progress", "--no-sample", *TINY, *extra]


G = ["generate", "--prompt", "a", "--max-new-tokens", "2"]
# fmt: off
MORE_CASES: list[Case] = [
    # a model far larger than memory is refused before anything is allocated
    Case("train-model-exceeds-memory", lambda c: T(c, "model.moe_intermediate_size=100000000"), "needs at least"),
    Case("generate-model-exceeds-memory", lambda c: [*G, _run_copy(c, "huge", _huge_config)], "needs at least"),
    # device files never end: refused, not read forever
    Case("train-data-device-file", lambda c: _train_on(c, "/dev/zero"), "not a regular file"),
    Case("train-val-data-device-file", lambda c: T(c, "--val-data", "/dev/zero"), "not a regular file"),
    Case("eval-data-device-file", lambda c: ["eval", c.run, "--task", "perplexity", "--data", "/dev/zero"], "not a regular file"),
    Case("train-data-symlink-loop", lambda c: _train_on(c, _loop(c)), "symbolic link loop"),
    # every number finite and in range, found before any work
    Case("train-lr-nan", lambda c: T(c, "train.lr=nan"), "train.lr must be a finite number"),
    Case("train-min-lr-ratio-nan", lambda c: T(c, "train.min_lr_ratio=nan"), "finite"),
    Case("train-max-minutes-inf", lambda c: T(c, "train.max_minutes=inf"), "finite"),
    Case("train-max-minutes-zero", lambda c: T(c, "train.max_minutes=0"), "train.max_minutes must be above 0"),
    Case("train-seed-overflow", lambda c: T(c, f"train.seed={2**70}"), "64-bit"),
    Case("train-seed-negative", lambda c: T(c, "train.seed=-1"), "train.seed must be between 0"),
    Case("train-beta2-one", lambda c: T(c, "train.beta2=1"), "train.beta2 must be between"),
    Case("train-eval-every-zero", lambda c: T(c, "train.eval_every=0"), "train.eval_every must be above 0"),
    Case("train-grad-clip-negative", lambda c: T(c, "train.grad_clip=-1"), "train.grad_clip must be at least"),
    Case("model-rope-theta-nan", lambda c: T(c, "model.rope_theta=nan"), "finite"),
    Case("generate-length-penalty-nan", lambda c: [*G, c.run, "--length-penalty", "nan"], "finite number"),
    Case("generate-seed-overflow", lambda c: [*G, c.run, "--seed", str(2**70)], "64-bit"),
    Case("eval-window-huge", lambda c: [*base(c, "eval"), "--window", str(2**64)], "64-bit"),
    Case("params-weight-overflows", lambda c: ["params", "tiny", f"model.hidden_size={10**16}"], "too large to exist"),
    # a damaged model is named at load, not inside sampling
    Case("generate-nonfinite-weights", lambda c: [*G, _run_copy(c, "nan", _nan_weight)], "NaN or infinite"),
    # resuming a run that is already past its new max_steps
    Case("train-resume-max-steps-below", lambda c: ["train", "--resume", shutil.copytree(c.w.run, c.tmp / "rs"),
                                                    "--no-progress", "train.max_steps=1"], "already at step 2"),
    # a resume that would write somewhere other than the user meant, or ignore what they asked for
    Case("train-resume-with-another-out", lambda c: ["train", "--resume", _run_copy(c, "rs2", lambda s: None),
                                                     "--out", c.out, "--no-progress", "train.max_steps=4"], "drop --out"),
    Case("train-resume-another-tokenizer", lambda c: ["train", "--resume", _run_copy(c, "rt", lambda s: None),
                                                      "--tokenizer", "bpe:300", "--no-progress", "train.max_steps=4"],
         "was trained with data.tokenizer=byte, not bpe:300"),
    Case("train-resume-another-seed", lambda c: ["train", "--resume", _run_copy(c, "rseed", lambda s: None),
                                                 "--no-progress", "train.max_steps=4", "train.seed=12345"],
         "not 12345; a resume continues the run's data order"),
    # a window past the context was cut to it, and the report named the uncut one
    Case("quantize-seq-len-past-context", lambda c: ["quantize", c.run, *Q, "--out", c.out, "--eval-data", c.text(),
                                                     "--seq-len", "100000"], "exceeds the model's context (64 tokens)"),
    # the figures' canvases are allocated whole: a huge --dpi was an allocator failure (exit 1)
    Case("plot-dpi-too-large", lambda c: ["plot", c.run, "--out", c.out, "--dpi", "12000"], "use --dpi"),
    # the serving cache is allocated whole at start-up: too many slots was an allocator failure (exit 1)
    Case("serve-max-active-exceeds-memory", lambda c: ["serve", c.run, "--port", "0", "--max-active", str(10**9)],
         "a lower --max-active"),
]
# fmt: on


def test_resume_of_a_checkpoint_directory_leaves_it_alone(ctx: Ctx, capsys):
    """`--resume RUN/checkpoints/step_N` (generate takes checkpoint directories) passed for a run, since a
    checkpoint holds a config.yaml: it rewrote the checkpoint's config.yaml and trained a run inside it."""
    run = shutil.copytree(ctx.w.run, ctx.tmp / "rc")
    step = _steps(run)[-1]
    before = {p.relative_to(step): p.read_bytes() for p in step.rglob("*") if p.is_file()}
    rc = main(["train", "--resume", str(step), "--no-progress", "--no-sample", "train.max_steps=6"])
    out, err = capsys.readouterr()
    expect = f"resume the run that holds it (--resume {run})"
    _check(Case("train-resume-a-checkpoint", lambda c: [], expect), rc, out, err)
    assert {p.relative_to(step): p.read_bytes() for p in step.rglob("*") if p.is_file()} == before


def test_resume_with_another_out_or_tokenizer_leaves_the_run_alone(ctx: Ctx, capsys):
    run = shutil.copytree(ctx.w.run, ctx.tmp / "rk")
    config, steps = (run / "config.yaml").read_text(), _steps(run)
    for extra in (["--out", str(ctx.out)], ["data.tokenizer=bpe:300"]):
        assert main(["train", "--resume", str(run), "--no-progress", "train.max_steps=4", *extra]) == 2
    assert (run / "config.yaml").read_text() == config and _steps(run) == steps
    assert not ctx.out.exists()
    capsys.readouterr()


@pytest.mark.parametrize("cmd", ["import", "upcycle"])
def test_a_new_run_does_not_replace_other_files_in_out(ctx: Ctx, capsys, cmd):
    """import and upcycle wrote config.yaml and tokenizer/ into any folder without a run, replacing a
    user's own files of those names; a folder holding anything now needs --force, as for export."""
    mine = ctx.file("mine/config.yaml", "model:\n  hidden_size: 64\n")
    argv = {"import": ["import", ctx.hf], "upcycle": ["upcycle", ctx.llama, *U]}[cmd]
    rc = main([str(a) for a in [*argv, "--out", mine.parent]])
    out, err = capsys.readouterr()
    _check(
        Case(f"{cmd}-out-holds-other-files", lambda c: [], "already exists and is not empty"), rc, out, err
    )
    assert mine.read_text() == "model:\n  hidden_size: 64\n" and sorted(mine.parent.iterdir()) == [mine]
    assert main([str(a) for a in [*argv, "--out", mine.parent, "--force"]]) == 0  # asked for: written
    capsys.readouterr()


def test_plot_with_a_refused_dpi_creates_nothing(ctx: Ctx, capsys):
    assert main(["plot", str(ctx.run), "--out", str(ctx.out), "--dpi", "12000"]) == 2
    assert "use --dpi" in capsys.readouterr().err and not ctx.out.exists()


@pytest.mark.parametrize("case", MORE_CASES, ids=_ids(MORE_CASES))
def test_bad_input_more(case: Case, ctx: Ctx, capsys):
    argv = [str(a) for a in case.argv(ctx)]
    rc = main(argv)
    out, err = capsys.readouterr()
    _check(case, rc, out, err)


def test_params_of_an_absurd_size_answers(tmp_path):
    """A million layers: the count comes from one layer of each kind, not a million modules (it used to
    hang); the answer is the same as scaling the per-layer count by hand."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    p = subprocess.run(
        [sys.executable, "-m", "minimoe", "params", "tiny", "--json", "model.num_hidden_layers=1000000", "model.mtp_depth=0"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    big = json.loads(p.stdout)
    from minimoe.config_yaml import build_run_config
    from minimoe.params import count_params

    two = count_params(
        build_run_config("tiny", None, ["model.num_hidden_layers=2", "model.mtp_depth=0"]).model
    )
    three = count_params(
        build_run_config("tiny", None, ["model.num_hidden_layers=3", "model.mtp_depth=0"]).model
    )
    per_moe_layer = three.total - two.total
    assert big["total"] == two.total + (1_000_000 - 2) * per_moe_layer


def test_eval_out_is_checked_before_the_evaluation(ctx: Ctx, capsys, monkeypatch):
    import minimoe.eval.runner

    def started(*a, **k):
        raise AssertionError("the evaluation ran before --out was checked")

    monkeypatch.setattr(minimoe.eval.runner, "evaluate_run", started)
    rc = main([str(a) for a in [*base(ctx, "eval"), "--out", ctx.under_file()]])
    out, err = capsys.readouterr()
    _check(Case("eval-out-first", lambda c: [], "cannot write results"), rc, out, err)


@pytest.mark.parametrize("kind", ["folder", "file"])
def test_quantize_out_is_checked_before_the_model_loads(ctx: Ctx, capsys, monkeypatch, kind):
    """An existing --out was refused only by save_quantized, after loading, quantizing and both
    perplexity passes; the same rule now runs before the run is loaded."""
    import minimoe.train.checkpoint

    def loaded(*a, **k):
        raise AssertionError("the run was loaded before --out was checked")

    monkeypatch.setattr(minimoe.train.checkpoint, "load_run", loaded)
    out = ctx.file("taken/x.txt", "x").parent if kind == "folder" else ctx.file("taken.bin", "x")
    rc = main([str(a) for a in ["quantize", ctx.run, *Q, "--eval-data", ctx.text(), "--out", out]])
    stdout, err = capsys.readouterr()
    expect = f"{out} already exists and is not an empty directory; choose another --out"
    _check(Case("quantize-out-first", lambda c: [], expect), rc, stdout, err)


def test_resume_from_another_directory(ctx: Ctx, capsys, monkeypatch):
    """config.yaml stores the data path absolute, so a relative --data still resolves after a cd."""
    ctx.file("rel.txt", "the cat sat on the mat\n" * 400)
    assert main([str(a) for a in _train_on(ctx, "rel.txt")]) == 0
    assert yaml.safe_load((ctx.out / "config.yaml").read_text())["data"]["path"] == str(ctx.tmp / "rel.txt")
    elsewhere = ctx.dir("elsewhere")
    monkeypatch.chdir(elsewhere)
    assert main(["train", "--resume", str(ctx.out), "--no-progress", "--no-sample", "train.max_steps=3"]) == 0
    capsys.readouterr()


def test_memory_check_names_both_numbers_and_has_an_override(monkeypatch):
    import minimoe.memory as memory

    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 2**30)
    with pytest.raises(MinimoeError, match=r"needs at least 2\.0 GiB but cpu has 1\.0 GiB available"):
        memory.check_fits(2 * 2**30, "cpu", "training this model", "pass --skip-memory-check")
    memory.check_fits(2**29, "cpu", "training this model", "pass --skip-memory-check")  # fits
    monkeypatch.setenv(memory.SKIP_ENV, "1")
    memory.check_fits(2 * 2**30, "cpu", "training this model", "pass --skip-memory-check")  # overridden


@pytest.mark.parametrize("name", ["#1.txt", "yes", "on", "- notes.txt", "a: b.txt"])
def test_a_path_override_is_text_not_yaml(name):
    """`--data '#1.txt'` became data.path=None (YAML reads a comment): training ran on the built-in corpus
    and exited 0; 'yes' or '- notes.txt' were 'must be a string' errors for a file that exists."""
    from minimoe.config_yaml import build_run_config

    cfg = build_run_config(
        "tiny", None, [f"data.path={name}", f"data.val_path={name}", f"data.cache_dir={name}"]
    )
    assert (cfg.data.path, cfg.data.val_path, cfg.data.cache_dir) == (name, name, name)
    for null in ("null", "None", "~", ""):  # still the built-in corpus
        assert build_run_config("tiny", None, [f"data.path={null}"]).data.path is None


def test_train_reads_a_data_file_named_like_a_yaml_comment(ctx: Ctx, capsys):
    ctx.file("#1.txt", "the cat sat on the mat\n" * 400)
    assert main([str(a) for a in _train_on(ctx, "#1.txt")]) == 0
    assert yaml.safe_load((ctx.out / "config.yaml").read_text())["data"]["path"] == str(ctx.tmp / "#1.txt")
    capsys.readouterr()


def test_available_memory_is_the_smaller_of_meminfo_and_the_cgroup_room(tmp_path, monkeypatch):
    """/proc/meminfo counts in KiB; under a cgroup v2 limit the room is the limit less the memory in
    use, where reclaimable page cache (inactive_file) does not count as used."""
    import minimoe.memory as memory

    real_path = memory.Path
    meminfo, cg = tmp_path / "meminfo", tmp_path / "cgroup"
    meminfo.write_text("MemTotal:       8000000 kB\nMemAvailable:    4000000 kB\n")
    cg.mkdir()
    (cg / "memory.max").write_text("max\n")
    fake = {"/proc/meminfo": meminfo, "/sys/fs/cgroup": cg}
    monkeypatch.setattr(memory, "Path", lambda p: fake.get(str(p)) or real_path(p))
    assert memory.available_bytes("cpu") == 4_000_000 * 1024  # no limit
    (cg / "memory.max").write_text(f"{3 * 2**30}\n")
    (cg / "memory.current").write_text(f"{2 * 2**30}\n")
    (cg / "memory.stat").write_text(f"anon 7\ninactive_file {2**29}\nactive_file 9\n")
    assert memory.available_bytes("cpu") == 3 * 2**30 - (2 * 2**30 - 2**29)  # 1.5 GiB, under MemAvailable
    (cg / "memory.max").write_text(f"{64 * 2**30}\n")
    assert memory.available_bytes("cpu") == 4_000_000 * 1024  # a limit above MemAvailable


def test_a_temp_dir_left_by_a_killed_export_is_emptied(tmp_path):
    """fresh_temp_dir gives an empty directory even where a killed export or quantize left its
    temporary one, so none of that attempt's files reach the new output."""
    from minimoe.files import fresh_temp_dir

    first = fresh_temp_dir(tmp_path / "out", "export")
    (first / "model.safetensors").write_text("half")
    again = fresh_temp_dir(tmp_path / "out", "export")
    assert again == first and again.is_dir() and list(again.iterdir()) == []
    assert again.parent == tmp_path and again.name != "out"


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_an_output_on_a_file_system_without_new_entries_is_named_as_such():
    """mkdir in /proc fails with "no such file": said as a place that takes no new directories, naming the
    path the user chose (not the temporary one beside it), not as a path that does not exist."""
    from minimoe.errors import MinimoeError
    from minimoe.files import fresh_temp_dir, make_dir

    with pytest.raises(MinimoeError) as e:
        fresh_temp_dir(Path("/proc/minimoe-out"), "export")
    assert (
        str(e.value)
        == "cannot create /proc/minimoe-out (the file system at /proc does not allow creating minimoe-out there)"
    )
    with pytest.raises(MinimoeError, match=r"^cannot create --out /proc/x/y \(the file system at /proc/x"):
        make_dir(Path("/proc/x/y"), "--out /proc/x/y")
