"""Supervised fine-tuning (loss masking, packing, CLI) and LoRA through PEFT."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from minimoe.cli.main import main
from minimoe.config import ModelConfig
from minimoe.data import Tokenizer
from minimoe.errors import MinimoeError
from minimoe.finetune.chat import DEFAULT_CHAT_TEMPLATE, encode_conversation, read_conversations
from minimoe.finetune.sft import PaddedBatches, batches, build_examples
from minimoe.hf.load import write_run
from minimoe.model.transformer import Transformer
from minimoe.train.checkpoint import load_run

TINY = dict(
    vocab_size=320, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, kv_lora_rank=16, qk_nope_head_dim=8,
    qk_rope_head_dim=8, v_head_dim=8, intermediate_size=64, moe_intermediate_size=16, n_routed_experts=4,
    num_experts_per_tok=2, max_position_embeddings=128, mtp_depth=1,
)  # fmt: skip
SEQ_TRAIN = ["train.seq_len=48", "train.batch_size=8", "train.lr=1e-2"]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.byte()


def _conv(prompt: str, response: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def test_prompt_tokens_carry_no_loss(tok):
    ids, mask = encode_conversation(tok, _conv("What is 2+2?", "four"), DEFAULT_CHAT_TEMPLATE)
    assert (
        tok.decode(ids, skip_special_tokens=False)
        == "<|user|>\nWhat is 2+2?<|endoftext|><|assistant|>\nfour<|endoftext|>"
    )
    assert (
        tok.decode(ids[mask], skip_special_tokens=False) == "four<|endoftext|>"
    )  # only the answer and its end
    (x, y), = build_examples(tok, [_conv("What is 2+2?", "four")], DEFAULT_CHAT_TEMPLATE, seq_len=64)[0]  # fmt: skip
    assert (y != -100).sum() == len("four") + 1
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**TINY, "mtp_depth": 0})).eval()
    X, Y = torch.from_numpy(x)[None], torch.from_numpy(y)[None]
    loss = model(X, targets=Y).losses["ce"]
    # by hand: mean -log p over the response positions only
    logp = F.log_softmax(model(X).logits[0].float(), dim=-1)
    pos = np.flatnonzero(mask[1:])
    hand = -torch.stack([logp[t, int(ids[t + 1])] for t in pos]).mean()
    torch.testing.assert_close(loss, hand)
    # the gradient of the mean CE with respect to the logits: (softmax - onehot(target)) / n at the n
    # response positions, exactly zero at the prompt positions
    seen = {}

    def keep(module, inputs, logits):  # returns None: the output is unchanged
        logits.retain_grad()
        seen["logits"] = logits

    hook = model.lm_head.register_forward_hook(keep)
    model(X, targets=Y).losses["ce"].backward()
    hook.remove()
    logits = seen["logits"].detach()[0]  # (T, V)
    want = torch.zeros_like(logits)
    resp = torch.from_numpy(mask[1:])
    want[resp] = (logits[resp].softmax(-1) - F.one_hot(Y[0, resp], logits.shape[-1])) / int(resp.sum())
    torch.testing.assert_close(seen["logits"].grad[0], want)
    assert (seen["logits"].grad[0][~resp] == 0).all()


CONVERSATION = (  # a system message and two exchanges
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": "bye"},
    {"role": "assistant", "content": "ciao"},
)


def test_multi_turn_masks_every_assistant_turn_only(tok):
    msgs = [dict(m) for m in CONVERSATION]
    ids, mask = encode_conversation(tok, msgs, DEFAULT_CHAT_TEMPLATE)
    assert tok.decode(ids[mask], skip_special_tokens=False) == "hello<|endoftext|>ciao<|endoftext|>"
    # the pieces tokenized separately give the same ids as the whole rendered text (byte level)
    from minimoe.finetune.chat import render

    assert ids.tolist() == tok.encode(render(DEFAULT_CHAT_TEMPLATE, msgs, tok))


@pytest.mark.parametrize(
    "template",
    [
        DEFAULT_CHAT_TEMPLATE,
        "{% for m in messages %}[{{ m.role }}]{{ pad_token }}{{ m.content }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{{ pad_token }}{% endif %}",
    ],
)
def test_served_prompt_is_the_training_prefix(tok, template):
    """For every assistant turn, the prompt `minimoe serve` gives the model for the conversation so far
    is exactly what fine-tuning trained on before that turn's answer: same template, generation
    prompt and special tokens."""
    pytest.importorskip("fastapi")
    from minimoe.serve.limits import Limits
    from minimoe.serve.service import Service

    msgs = [dict(m) for m in CONVERSATION]
    served_tok = Tokenizer.byte()
    served_tok.chat_template = template
    model = Transformer(ModelConfig(**{**TINY, "mtp_depth": 0})).eval()
    service = Service(model, served_tok, "t", Limits(max_active=1))
    ids, mask = encode_conversation(tok, msgs, template)
    starts = np.flatnonzero(mask[1:] & ~mask[:-1]) + 1  # first trained token of each assistant turn
    assert len(starts) == 2
    for i, start in zip((2, 4), starts, strict=True):
        assert service._encode(service.render(msgs[:i])) == ids[:start].tolist()


def _sentencepiece_style(tmp_path, scheme: str) -> Tokenizer:
    """A small BPE tokenizer with SentencePiece's word-boundary marker (Metaspace), as Llama 2 and
    Mistral use: each text it encodes starts with a boundary, so pieces encoded apart differ from
    the whole."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme=scheme)
    hf.decoder = decoders.Metaspace(prepend_scheme=scheme)
    specials = ["<unk>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>"]
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=specials, show_progress=False)
    hf.train_from_iterator(["be brief, hi there, hello, bye and ciao\n"] * 20, trainer=trainer)
    hf.save(str(tmp_path / "tokenizer.json"))
    return Tokenizer.load(tmp_path / "tokenizer.json")


@pytest.mark.parametrize("scheme", ["always", "first"])
def test_conversation_is_tokenized_whole_as_served(tmp_path, scheme):
    """With a SentencePiece-style tokenizer the tokens fine-tuning puts before each answer are the
    tokens `minimoe serve` gives the model (the text is tokenized whole, not piece by piece), and the
    trained tokens are each answer's and its end of turn."""
    pytest.importorskip("fastapi")
    from minimoe.finetune.chat import render
    from minimoe.serve.limits import Limits
    from minimoe.serve.service import Service

    tok = _sentencepiece_style(tmp_path, scheme)
    tok.chat_template = DEFAULT_CHAT_TEMPLATE
    msgs = [dict(m) for m in CONVERSATION]
    ids, mask = encode_conversation(tok, msgs, DEFAULT_CHAT_TEMPLATE)
    assert ids.tolist() == tok.encode(render(DEFAULT_CHAT_TEMPLATE, msgs, tok))
    starts = np.flatnonzero(mask[1:] & ~mask[:-1]) + 1
    ends = np.flatnonzero(mask[:-1] & ~mask[1:]) + 1
    assert len(starts) == 2 and len(ends) == 1 and mask[-1]
    answers = [tok.decode(ids[a:b], skip_special_tokens=False) for a, b in zip(starts, [*ends, len(ids)])]
    assert [a.strip() for a in answers] == ["hello<|endoftext|>", "ciao<|endoftext|>"]
    model = Transformer(ModelConfig(**{**TINY, "vocab_size": tok.vocab_size, "mtp_depth": 0})).eval()
    service = Service(model, tok, "t", Limits(max_active=1))
    for i, start in zip((2, 4), starts, strict=True):
        assert service._encode(service.render(msgs[:i])) == ids[:start].tolist()


@pytest.mark.parametrize(
    "template, want",
    [
        (  # {% break %} (jinja2's loopcontrols, as transformers enables)
            "{% for m in messages %}{% if m.role == 'assistant' %}{% break %}{% endif %}{{ m.content }};"
            "{% endfor %}",
            "s <b>é</b>;hi;",
        ),
        (  # the {% generation %} block transformers uses to mark assistant text
            "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}"
            "{{ eos_token }}{% endgeneration %}{% else %}{{ m.content }}{% endif %}{% endfor %}",
            "s <b>é</b>hihello<|endoftext|>",
        ),
        (  # trim_blocks and lstrip_blocks: a block tag takes its line's indent and newline with it
            "{% for m in messages %}\n  {% if m.role != 'system' %}\n{{ m.content }}\n  {% endif %}\n{% endfor %}",
            "hi\nhello\n",
        ),
        (  # transformers' tojson: no HTML escaping, keys in order, non-ASCII kept
            "{{ messages[0] | tojson }}",
            '{"role": "system", "content": "s <b>é</b>"}',
        ),
        (  # tools and documents are passed as none (Mistral's template tests `tools is not none`)
            "{% if tools is not none %}[TOOLS]{% endif %}{% if documents is none %}{{ messages[1].content }}"
            "{% endif %}",
            "hi",
        ),
    ],
)
def test_templates_render_as_transformers_renders_them(tok, template, want):
    from minimoe.finetune.chat import render

    msgs = [
        {"role": "system", "content": "s <b>é</b>"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
    ]
    assert render(template, msgs, tok) == want
    try:  # the expected strings are what transformers' apply_chat_template gives
        from transformers.utils.chat_template_utils import render_jinja_template
    except ImportError:
        return
    kw = dict(bos_token=tok.bos_token, eos_token=tok.eos_token, pad_token=tok.pad_token)
    assert render_jinja_template([msgs], chat_template=template, **kw)[0][0] == want


def test_packing_keeps_every_trainable_target(tok):
    convs = [_conv(f"question {i}", "answer " * (i % 4 + 1)) for i in range(30)]
    plain, _ = build_examples(tok, convs, DEFAULT_CHAT_TEMPLATE, seq_len=200)
    packed, _ = build_examples(tok, convs, DEFAULT_CHAT_TEMPLATE, seq_len=64, packing=True)
    assert all(len(x) == 64 for x, _ in packed[:-1])
    count = lambda exs: sum(int((y != -100).sum()) for _, y in exs)  # noqa: E731
    assert count(packed) == count(plain)  # nothing truncated, nothing lost at window edges
    X, Y = next(batches(plain, 4, tok.pad_id, seed=0, epoch=0))
    assert X.shape == Y.shape and ((X == tok.pad_id) <= (Y == -100)).all()  # padding never has a target


def test_truncation_drops_and_counts_conversations_without_a_target(tok, caplog):
    # the answer of the first lies past seq_len: dropped and counted, not kept with no target
    convs = [_conv("x" * 100, "yes"), _conv("q", "yes"), _conv("q", "a" * 60)]
    with caplog.at_level(logging.WARNING, logger="minimoe"):
        examples, dropped = build_examples(tok, convs, DEFAULT_CHAT_TEMPLATE, seq_len=48)
    assert dropped == 1 and len(examples) == 2
    # the cut is said once: two conversations cut, one of them dropped
    (msg,) = [r.getMessage() for r in caplog.records]
    assert (
        msg.startswith("2 of 3 conversations are longer than train.seq_len=48 tokens") and "1 kept no" in msg
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="minimoe"):
        build_examples(tok, convs[1:2], DEFAULT_CHAT_TEMPLATE, seq_len=48)
    assert not caplog.records  # nothing cut, nothing said
    x, y = examples[0]
    assert tok.decode(y[y != -100], skip_special_tokens=False) == "yes<|endoftext|>"
    # a cut inside an answer keeps its beginning: seq_len inputs, targets shifted by one
    (x, y), = build_examples(tok, [_conv("q", "a" * 100)], DEFAULT_CHAT_TEMPLATE, seq_len=48)[0]  # fmt: skip
    ids, mask = encode_conversation(tok, _conv("q", "a" * 100), DEFAULT_CHAT_TEMPLATE)
    assert x.tolist() == ids[:48].tolist() and y.tolist() == np.where(mask[1:49], ids[1:49], -100).tolist()


def test_read_conversations_prompt_response_lines(tmp_path):
    """A `{"prompt", "response"}` line becomes a user and an assistant turn, after its `system` message
    when the line has one."""
    data = tmp_path / "pr.jsonl"
    data.write_text(
        '{"prompt": "q1", "response": "a1"}\n{"system": "be brief", "prompt": "q2", "response": "a2"}\n'
    )
    assert read_conversations(data) == [
        [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}],
        [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "q2"},
            {"role": "assistant", "content": "a2"},
        ],
    ]


def test_read_conversations_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": 3}\n')
    with pytest.raises(MinimoeError, match="line 2"):
        read_conversations(bad)
    bad.write_text('{"messages": [{"role": "user", "content": "only a question"}]}\n')
    with pytest.raises(MinimoeError, match="no assistant message"):
        read_conversations(bad)
    with pytest.raises(MinimoeError, match="does not exist"):
        read_conversations(tmp_path / "missing.jsonl")


def test_developer_message_trains_as_system(tmp_path, tok):
    """SFT data may hold OpenAI's `developer` role (serve takes it): it reads, and it is tokenized as
    the system message it renders as."""
    data = tmp_path / "dev.jsonl"
    data.write_text(
        '{"messages": [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi"},'
        ' {"role": "assistant", "content": "hello"}]}\n'
    )
    (msgs,) = read_conversations(data)
    sys_ = [{**m, "role": "system"} if m["role"] == "developer" else m for m in msgs]
    got, want = (encode_conversation(tok, m, DEFAULT_CHAT_TEMPLATE) for m in (msgs, sys_))
    assert got[0].tolist() == want[0].tolist() and got[1].tolist() == want[1].tolist()


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("sft")
    torch.manual_seed(0)
    write_run(root / "base", Transformer(ModelConfig(**{**TINY, "mtp_depth": 0})), tok, {"source": "test"})
    rows = [{"prompt": f"Say the word for {i}", "response": "yes"} for i in range(24)]
    rows += [{"messages": _conv("hello there", "yes")}]
    (root / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


def _losses(run) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def _sft_argv(base_run, out) -> list[str]:
    """`minimoe sft` of the base run on the chat file into `out`."""
    return [
        "sft",
        str(base_run / "base"),
        "--data",
        str(base_run / "chat.jsonl"),
        "--out",
        str(out),
        "--no-progress",
    ]


def test_cli_sft_learns_the_responses(base_run, tmp_path, capsys):
    out = tmp_path / "sft"
    argv = _sft_argv(base_run, out)
    assert main([*argv, *SEQ_TRAIN, "train.max_steps=20", "--val-data", str(base_run / "chat.jsonl")]) == 0
    losses = _losses(out)
    assert len(losses) == 20 and losses[-1] < 0.5 * losses[0]
    model, tok2, cfg, meta = load_run(out)
    assert tok2.chat_template == DEFAULT_CHAT_TEMPLATE and meta["sft"]["packing"] is False
    assert meta["val_loss"] < losses[0]
    assert main(["generate", str(out), "--prompt", "<|user|>\nhi<|endoftext|><|assistant|>\n", "--temperature", "0",
                 "--max-new-tokens", "8"]) == 0  # fmt: skip
    assert "yes" in capsys.readouterr().out
    assert main(argv) == 2  # the output run exists: refused, untouched
    assert main([*argv[:-2], str(tmp_path / "x"), "model.hidden_size=64"]) == 2


def test_cli_sft_packing(base_run, tmp_path):
    out = tmp_path / "packed"
    argv = ["sft", str(base_run / "base"), "--data", str(base_run / "chat.jsonl"), "--out", str(out)]
    assert (
        main([*argv, "--packing", "--no-progress", *SEQ_TRAIN, "--epochs", "2", "train.batch_size=16"]) == 0
    )
    assert load_run(out)[3]["sft"]["packing"] is True and len(_losses(out)) >= 2


def test_sft_runs_in_the_training_loop(base_run, tmp_path, monkeypatch, caplog):
    """Fine-tuning gets the pretraining loop's gradient accumulation, non-finite-step skipping, bias
    balancing and resumable checkpoints."""
    import logging

    from minimoe.finetune.sft import finetune
    from minimoe.train.checkpoint import find_checkpoint, load_state

    real, calls = Transformer.forward, {"n": 0}

    def forward(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        if self.training:
            calls["n"] += 1
            if calls["n"] == 3:  # the first micro-batch of step 2
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(Transformer, "forward", forward)
    out = tmp_path / "acc"
    with caplog.at_level(logging.WARNING, logger="minimoe.train"):
        res = finetune(
            base_run / "base", base_run / "chat.jsonl", out, [*SEQ_TRAIN, "train.max_steps=3", "train.grad_accum=2"],
            progress=False,
        )  # fmt: skip
    assert res.steps == 3 and calls["n"] == 8  # 3 steps and the skipped one, 2 micro-batches each
    assert any("step skipped" in r.getMessage() for r in caplog.records)
    # 25 examples in batches of 8: 4 per epoch; 8 batches read = the whole of epochs 0 and 1
    state = load_state(find_checkpoint(out, "latest"))
    assert state["loader"]["epoch"] == 1 and state["loader"]["pos"] == 4
    assert "optimizer" in state and state["step"] == 3
    tuned, base = load_run(out)[0].state_dict(), load_run(base_run / "base")[0].state_dict()
    bias = "layers.1.mlp.gate.e_score_correction_bias"  # full fine-tuning keeps balancing the experts
    assert not torch.equal(tuned[bias], base[bias])
    _, tok2, cfg, meta = load_run(out)
    assert meta["sft"]["packing"] is False
    # tokens count the padded batches' positions, not batch_size x seq_len; the skipped step's two
    # micro-batches (the 3rd and 4th read) are not counted
    ex, _ = build_examples(
        tok2, read_conversations(base_run / "chat.jsonl"), tok2.chat_template, 48, False, cfg.train.seed
    )
    source = PaddedBatches(ex, 8, tok2.pad_id, cfg.train.seed)
    sizes = [next(source)[0].numel() for _ in range(8)]
    assert meta["tokens"] == sum(sizes) - sizes[2] - sizes[3] < 6 * 8 * 48


def test_train_resume_of_a_fine_tuned_or_weights_only_run_says_what_to_do(base_run, tmp_path, capsys):
    """`minimoe train --resume` cannot continue an SFT run (its batches are conversations) nor a run
    that holds weights only (upcycle, import, a merged adapter): one sentence naming `minimoe sft`,
    not a KeyError's name or "its state has no optimizer"."""
    out = tmp_path / "sft"
    argv = _sft_argv(base_run, out)
    assert main([*argv, *SEQ_TRAIN, "train.max_steps=2"]) == 0
    capsys.readouterr()
    for run, words in (
        (out, "written by `minimoe sft`"),
        (base_run / "base", "holds weights without training state"),
    ):
        assert main(["train", "--resume", str(run), "--no-progress", "train.max_steps=4"]) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and f"minimoe sft {run}" in err and len(err.splitlines()) == 1, err


def test_ctrl_c_during_sft_says_the_run_was_interrupted(base_run, tmp_path):
    """SIGINT saves and exits 0 as in pre-training, and the summary says the run stopped early
    (fine-tuning has no --resume), rather than reading like a finished run."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "sft"
    cmd = [sys.executable, "-m", "minimoe", "sft", str(base_run / "base"), "--data", str(base_run / "chat.jsonl"),
           "--out", str(out), "--no-progress", *SEQ_TRAIN, "train.max_steps=100000"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics, deadline = out / "metrics.jsonl", time.time() + 120
    while not (metrics.exists() and metrics.stat().st_size > 0) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "interrupted at step" in stdout and "of 100000" in stdout and "no --resume" in stdout, stdout
    assert "saved " in stdout


# ------------------------------------------------------------------ LoRA / QLoRA

peft = pytest.importorskip("peft")


def test_lora_targets_attention_and_stacked_experts(tok):
    from minimoe.finetune.lora import apply_lora, merge_lora

    torch.manual_seed(0)
    model = Transformer(ModelConfig(**TINY)).eval()
    x = torch.randint(0, 258, (2, 16), generator=torch.Generator().manual_seed(0))
    base = model(x).logits.detach()
    pm = apply_lora(model, r=4, alpha=8, targets=["experts"])
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("mlp.experts" in n for n in trainable) and not any("self_attn" in n for n in trainable)
    torch.testing.assert_close(pm(x).logits, base)  # B = 0 at start: the model is unchanged
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    adapted = pm(x).logits.detach()
    assert (adapted - base).abs().max() > 1e-3  # the expert adapters act on the routed experts
    merged = merge_lora(pm)
    assert type(merged) is Transformer
    assert all(p.requires_grad for p in merged.parameters())  # trainable again, as a plain model
    torch.testing.assert_close(merged(x).logits, adapted, atol=1e-5, rtol=1e-5)


def test_lora_of_a_dense_model_with_the_default_targets():
    """A dense model has no stacked experts: the default targets (experts among them) adapt its
    attention and MLPs."""
    from minimoe.finetune.lora import apply_lora

    model = Transformer(ModelConfig(**{**TINY, "n_routed_experts": 0})).eval()
    trainable = [n for n, p in apply_lora(model, r=2).named_parameters() if p.requires_grad]
    assert any("self_attn" in n for n in trainable) and any("mlp" in n for n in trainable)


def test_cli_fine_tuning_reads_the_checkpoint_it_is_given(tmp_path, monkeypatch, capsys):
    """`--checkpoint latest` reaches the fine-tuning (sft, lora) and the merge of a saved adapter."""
    import minimoe.finetune.lora as lora
    import minimoe.finetune.sft as sft

    seen = []
    done = sft.SFTResult(tmp_path, 0, 0, 0, 0, 0.0, None, None)
    monkeypatch.setattr(sft, "finetune", lambda *a, **kw: seen.append(kw["which"]) or done)
    monkeypatch.setattr(
        lora, "merge_saved_adapter", lambda run, adapter, out, which: seen.append(which) or out
    )
    common = ["run", "--out", str(tmp_path / "out"), "--checkpoint", "latest"]
    assert main(["sft", *common, "--data", "chat.jsonl"]) == 0
    assert main(["lora", *common, "--data", "chat.jsonl"]) == 0
    assert main(["lora", *common, "--adapter", "adapter", "--merge"]) == 0
    assert seen == ["latest"] * 3
    capsys.readouterr()


def test_epochs_must_be_finite_and_positive():
    from minimoe.cli.sft import check_epochs

    check_epochs(0.5)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(MinimoeError, match="--epochs must be a positive number"):
            check_epochs(bad)


def test_lora_update_is_scaled_by_alpha_over_rank():
    """An adapted linear layer computes W x + (alpha / r) B A x, and merging folds exactly that product
    into W."""
    from minimoe.finetune.lora import apply_lora, merge_lora

    torch.manual_seed(0)
    model = Transformer(ModelConfig(**TINY)).eval()
    name = "layers.0.self_attn.o_proj"
    w = model.get_submodule(name).weight.detach().clone()
    pm = apply_lora(model, r=4, alpha=12, targets=["attention"])
    params = dict(pm.named_parameters())
    a = next(p for n, p in params.items() if n.endswith(f"{name}.lora_A.default.weight"))
    b = next(p for n, p in params.items() if n.endswith(f"{name}.lora_B.default.weight"))
    with torch.no_grad():
        b.normal_(0, 0.2)
    x = torch.randn(3, w.shape[1])
    layer = pm.get_submodule(f"base_model.model.{name}")
    want = x @ w.T + 3.0 * (x @ a.T) @ b.T
    torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)
    merged = merge_lora(pm).get_submodule(name).weight
    torch.testing.assert_close(merged, w + 3.0 * b.detach() @ a.detach(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("attn_type", ["mla", "gqa"])
def test_lora_default_targets_every_documented_projection(attn_type):
    """The default targets adapt every attention projection but kv_b_proj (q, kv_a and o for MLA;
    q, k, v, o for GQA), the dense and shared-expert SwiGLU projections and the stacked routed experts;
    never the router, the norms, the embedding or the head."""
    from minimoe.finetune.lora import apply_lora

    kw = dict(attn_type="gqa", num_key_value_heads=1) if attn_type == "gqa" else {}
    model = Transformer(ModelConfig(**{**TINY, "first_k_dense_replace": 1, "n_shared_experts": 1, **kw}))
    pm = apply_lora(model, r=2, alpha=4)
    lora_a = [n for n, _ in pm.named_parameters() if ".lora_A" in n]
    adapted = {n.split(".lora_A")[0].removeprefix("base_model.model.") for n in lora_a}
    attn = (
        ["q_proj", "kv_a_proj_with_mqa", "o_proj"]
        if attn_type == "mla"
        else ["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    want = {f"layers.{i}.self_attn.{p}" for i in (0, 1) for p in attn}
    want |= {f"layers.0.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")}
    want |= {f"layers.1.mlp.shared_experts.{p}" for p in ("gate_proj", "up_proj", "down_proj")}
    assert want <= adapted, want - adapted
    assert any("layers.1.mlp.experts" in n for n in adapted)
    frozen = ("kv_b_proj", "mlp.gate.", "embed", "lm_head", "norm")
    assert not [n for n in adapted if any(f in n + "." for f in frozen)], adapted


def test_cli_lora_saves_adapter_and_merges(base_run, tmp_path, capsys):
    out = tmp_path / "lora"
    data = ["--data", str(base_run / "chat.jsonl")]
    argv = [
        "lora",
        str(base_run / "base"),
        *data,
        "--out",
        str(out),
        "--rank",
        "4",
        "--alpha",
        "12",
        "--merge",
        "--no-progress",
    ]
    assert main([*argv, *SEQ_TRAIN, "train.max_steps=12"]) == 0
    printed = capsys.readouterr().out
    assert "saved the merged model in " in printed and f"adapter in {out / 'adapter'}" in printed, printed
    assert "response tokens trained on, repeats over epochs counted" in printed
    adapter = out / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 12 and cfg["target_parameters"]
    losses = _losses(out)
    assert losses[-1] < losses[0]
    merged, _, _, meta = load_run(out)
    base = load_run(base_run / "base")[0]
    assert meta["sft"]["lora"]["r"] == 4
    # frozen base: only the LoRA product changed weights, so non-targeted tensors are identical
    b, m = base.state_dict(), merged.state_dict()
    assert torch.equal(b["embed_tokens.weight"], m["embed_tokens.weight"])
    assert torch.equal(b["layers.1.mlp.gate.weight"], m["layers.1.mlp.gate.weight"])
    bias = "layers.1.mlp.gate.e_score_correction_bias"  # LoRA leaves the balancing bias alone too
    assert torch.equal(b[bias], m[bias])
    assert not torch.equal(b["layers.1.mlp.experts.up_proj"], m["layers.1.mlp.experts.up_proj"])
    # merging the saved adapter again gives the same weights
    assert (
        main(
            [
                "lora",
                str(base_run / "base"),
                "--adapter",
                str(adapter),
                "--merge",
                "--out",
                str(tmp_path / "m2"),
            ]
        )
        == 0
    )
    m2_model, m2_tok, _, _ = load_run(tmp_path / "m2")
    m2 = m2_model.state_dict()
    assert all(torch.allclose(m[k], m2[k], atol=1e-6) for k in m)
    # and the chat template the adapter was trained with, which the base run does not have
    template = load_run(out)[1].chat_template
    assert template and load_run(base_run / "base")[1].chat_template != template
    assert m2_tok.chat_template == template
    # the adapter merged into other weights (the fine-tuned run, not its base): refused in one sentence
    assert main(["lora", str(out), "--adapter", str(adapter), "--merge", "--out", str(tmp_path / "m3")]) == 2
    err = capsys.readouterr().err
    assert "was trained on other weights" in err and not (tmp_path / "m3").exists()


def test_a_lora_run_without_merge_is_named_as_an_adapter_by_generate(base_run, tmp_path, capsys):
    """An unmerged LoRA run holds only OUT/adapter: generate/serve say how to merge it, and a Hugging
    Face folder is pointed at `minimoe import`, instead of just "holds no complete checkpoint"."""
    out = tmp_path / "lora"
    argv = ["lora", str(base_run / "base"), "--data", str(base_run / "chat.jsonl"), "--out", str(out)]
    assert main([*argv, "--rank", "4", "--no-progress", *SEQ_TRAIN, "train.max_steps=2"]) == 0
    capsys.readouterr()
    for folder in (out, out / "adapter"):
        assert main(["generate", str(folder), "--prompt", "hi"]) == 2
        err = capsys.readouterr().err.strip()
        assert f"--adapter {out / 'adapter'} --merge" in err and len(err.splitlines()) == 1, err
        assert str((base_run / "base").resolve()) in err  # the base run the adapter was trained on
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    assert main(["generate", str(hf), "--prompt", "hi"]) == 2
    assert f"minimoe import {hf} --out" in capsys.readouterr().err


def test_qlora_needs_bitsandbytes_and_cuda(base_run, tmp_path, capsys):
    from minimoe.finetune.lora import qlora_available

    argv = [
        "lora",
        str(base_run / "base"),
        "--data",
        str(base_run / "chat.jsonl"),
        "--out",
        str(tmp_path / "q"),
    ]
    if qlora_available() is None:
        pytest.skip("bitsandbytes and CUDA are present: QLoRA runs")
    assert main([*argv, "--qlora", "--no-progress", "train.max_steps=1"]) == 2
    err = capsys.readouterr().err
    assert "QLoRA" in err and "use plain LoRA" in err


def test_a_quantized_run_is_refused_in_one_sentence(base_run, tmp_path, capsys):
    """A run written by `minimoe quantize` holds integer weights: full fine-tuning would train only the
    float embedding, norms and routers and save a run that does not load, and PEFT has no adapter for
    its layers. sft, lora and an adapter merge all refuse it in one sentence, writing nothing."""
    from minimoe.finetune.lora import apply_lora, save_adapter

    quantized = tmp_path / "int8"
    assert main(["quantize", str(base_run / "base"), "--bits", "8", "--out", str(quantized)]) == 0
    torch.manual_seed(0)
    adapter = save_adapter(apply_lora(Transformer(ModelConfig(**{**TINY, "mtp_depth": 0}))), tmp_path / "a")
    capsys.readouterr()
    data = ["--data", str(base_run / "chat.jsonl"), "--no-progress", "train.max_steps=1"]
    for i, argv in enumerate(
        [["sft", *data], ["lora", *data], ["lora", "--adapter", str(adapter), "--merge"]]
    ):
        out = tmp_path / f"out{i}"
        assert main([argv[0], str(quantized), *argv[1:], "--out", str(out)]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "minimoe quantize" in err and "internal error" not in err
        assert str(base_run / "base") in err  # names the run to use instead
        assert not out.exists()


# Templates that break the growing-prefix rule at each of the two places it is checked: a trailing
# mark after the last user message that the generation prompt replaces (the header does not extend
# the text so far), and a mark after the last assistant message that the next user turn drops (a
# later non-assistant message rewrites earlier text). Either would misplace the answer spans.
@pytest.mark.parametrize(
    "template",
    [
        "{% for m in messages %}[{{ m.role }}]{{ m.content }}{{ eos_token }}{% endfor %}"
        "{% if messages[-1].role == 'user' and not add_generation_prompt %}TRAIL{% endif %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}",
        "{% for m in messages %}[{{ m.role }}]{{ m.content }}{{ eos_token }}{% endfor %}"
        "{% if messages[-1].role == 'assistant' %}!{% endif %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}",
    ],
    ids=["header-rewrites-prefix", "user-turn-rewrites-prefix"],
)
def test_templates_that_do_not_grow_by_prefixes_are_refused(tok, template):
    with pytest.raises(MinimoeError, match="growing prefixes"):
        encode_conversation(tok, [dict(m) for m in CONVERSATION], template)


def test_a_token_straddling_the_answer_start_is_trained(tmp_path):
    """A token whose text is partly header, partly answer overlaps the answer, so it is trained (as
    transformers' assistant-token mask marks it); tokens wholly in the header or user text are not."""
    from tokenizers import AddedToken, models
    from tokenizers import Tokenizer as HFTokenizer

    chars = sorted(set("Q:hi\nA:yes"))
    vocab = {"<unk>": 0, **{c: i + 1 for i, c in enumerate(chars)}}
    vocab[":y"] = len(vocab)
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[(":", "y")], unk_token="<unk>"))
    hf.add_special_tokens([AddedToken("</s>", special=True)])
    hf.save(str(tmp_path / "tokenizer.json"))
    t = Tokenizer.load(tmp_path / "tokenizer.json")
    template = (
        "{% for m in messages %}{% if m.role == 'user' %}Q:{{ m.content }}\n"
        "{% else %}A:{{ m.content }}{{ eos_token }}\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}A:{% endif %}"
    )
    ids, mask = encode_conversation(t, _conv("hi", "yes"), template)
    text = "Q:hi\nA:yes</s>\n"
    a, b = len("Q:hi\nA:"), len(text)  # the answer's characters
    got_ids, spans = t.encode_offsets(text)
    assert ids.tolist() == got_ids.tolist() and t.encode(":y") == [vocab[":y"]]
    assert vocab[":y"] in ids.tolist()  # the tokenizer does merge across the boundary
    want = [any(a <= c < b for c in range(int(s), int(e))) for s, e in spans]  # slow reference
    assert mask.tolist() == want
    assert mask[ids.tolist().index(vocab[":y"])]


class _ZeroWidthMarkers:
    """The byte tokenizer plus a token spanning no characters (id 300, like a word-boundary marker
    some HF tokenizers prepend) before every line's first character."""

    def __init__(self, tok):
        self.tok, self.bos_token, self.eos_token, self.pad_token = (
            tok,
            tok.bos_token,
            tok.eos_token,
            tok.pad_token,
        )

    def encode_offsets(self, text):
        ids, spans = self.tok.encode_offsets(text)
        out_ids, out_spans = [], []
        for i, (s, e) in zip(ids.tolist(), spans.tolist()):
            if s > 0 and text[s - 1] == "\n" and (not out_spans or out_spans[-1][0] != s):
                out_ids.append(300)
                out_spans.append((s, s))
            out_ids.append(i)
            out_spans.append((s, e))
        return np.array(out_ids), np.array(out_spans, dtype=np.int64).reshape(-1, 2)


def test_a_zero_width_token_at_the_answer_start_is_trained(tok):
    """A token that spans no characters belongs to the answer when it sits at or after the answer's
    first character: the marker before "four" is trained, the one before the user's text is not."""
    ids, mask = encode_conversation(_ZeroWidthMarkers(tok), _conv("What?", "four"), DEFAULT_CHAT_TEMPLATE)
    markers = np.flatnonzero(ids == 300)
    assert len(markers) == 2  # "<|user|>\n|What?" and "<|assistant|>\n|four"
    assert mask.tolist() == [False] * markers[1] + [True] * (len(ids) - markers[1])
    assert tok.decode(ids[mask & (ids != 300)], skip_special_tokens=False) == "four<|endoftext|>"


def test_chat_template_generation_prompt_bos_and_end_of_turn():
    """The plain default adds `assistant:` only when asked; `bos_token` is the BOS string; the end of
    turn is the longest special token that starts the text after the reply, and nothing further on."""
    from minimoe.data.chat_template import end_of_turn, render, render_plain

    msgs = [{"role": "user", "content": "hi"}]
    assert render_plain(msgs, add_generation_prompt=False) == "user: hi\n"
    assert render_plain(msgs) == "user: hi\nassistant:"
    bos = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}"
    assert render(bos, msgs, bos_token="<s>", eos_token="</s>") == "<s>hi</s>"
    closes = "{% for m in messages %}{{ m['content'] }}<|end_of_turn|>{% endfor %}"
    assert end_of_turn(closes, ["<|end", "<|end_of_turn|>"], eos_token="</s>") == "<|end_of_turn|>"
    newline = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}<|sep|>"  # a turn closed by text
    assert end_of_turn(newline, ["<|sep|>", "</s>"], eos_token="</s>") is None
    refuses = "{% if messages[0]['role'] != 'system' %}{{ raise_exception('system first') }}{% endif %}"
    assert end_of_turn(refuses + closes, ["<|end_of_turn|>"], eos_token="</s>") is None


def test_packing_keeps_the_last_target_of_the_stream(tok):
    """A stream two tokens longer than a window ends in a one-token window: its target still trains."""
    conv = _conv("q", "yes")
    ids, mask = encode_conversation(tok, conv, DEFAULT_CHAT_TEMPLATE)
    packed, _ = build_examples(tok, [conv], DEFAULT_CHAT_TEMPLATE, seq_len=len(ids) - 2, packing=True)
    assert [len(x) for x, _ in packed] == [len(ids) - 2, 1]
    assert sum(int((y != -100).sum()) for _, y in packed) == int(mask[1:].sum())


def test_padded_batches_pad_on_the_right_count_responses_and_resume(tok):
    """Rows start at column 0 (padding after them); the response tokens handed out are counted; a
    source loaded from a state goes on with the next batch; validation reads every example once."""
    from minimoe.finetune.sft import ValBatches

    convs = [_conv("q" * (i + 1), "answer " * (i % 3 + 1)) for i in range(5)]
    ex, _ = build_examples(tok, convs, DEFAULT_CHAT_TEMPLATE, seq_len=64)
    X, Y = next(batches(ex, 5, tok.pad_id, seed=0, epoch=0))
    rows = {tuple(x.tolist()): y.tolist() for x, y in ex}
    for x, y in zip(X.tolist(), Y.tolist()):
        n = next(n for n in range(len(x), 0, -1) if tuple(x[:n]) in rows)
        assert y[:n] == rows[tuple(x[:n])] and set(y[n:]) <= {-100}
    source = PaddedBatches(ex, 2, tok.pad_id, seed=0)
    ys = [next(source)[1] for _ in range(4)]  # into the second epoch
    assert source.response_tokens == sum(int((y != -100).sum()) for y in ys)
    resumed = PaddedBatches(ex, 2, tok.pad_id, seed=0)
    resumed.load_state_dict(source.state_dict())
    assert torch.equal(next(resumed)[0], next(source)[0])
    assert sum(len(x) for x, _ in ValBatches(ex, 2, tok.pad_id)) == len(ex)


def test_a_conversation_that_fits_seq_len_plus_one_is_not_reported_cut(tok, caplog):
    """seq_len inputs take seq_len + 1 tokens: a conversation of exactly that many is whole."""
    conv = _conv("q", "yes")
    n = len(encode_conversation(tok, conv, DEFAULT_CHAT_TEMPLATE)[0])
    with caplog.at_level(logging.WARNING, logger="minimoe"):
        ((x, y),), _ = build_examples(tok, [conv], DEFAULT_CHAT_TEMPLATE, seq_len=n - 1)
    assert len(x) == n - 1 and not caplog.records


def test_a_zero_width_token_after_the_answer_end_is_not_trained(tok):
    """A marker at the first character after an answer (the next user turn's) carries no loss."""
    template = (
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    conv = _conv("a?", "four") + _conv("b?", "five")
    ids, mask = encode_conversation(_ZeroWidthMarkers(tok), conv, template)
    assert tok.decode(ids[mask & (ids != 300)]) == "four\nfive\n"
    markers = np.flatnonzero(
        ids == 300
    )  # before every line but the first: "a?", "<|assistant|>", "four", ...
    assert [bool(mask[i]) for i in markers] == [False, False, True, False, False, False, True]


def test_sft_defaults_from_the_data_and_the_source_run(base_run, tmp_path):
    """Without overrides: a tenth of the source's lr, ceil(batches per epoch * epochs) steps, 10% warmup;
    the summary counts the training sequences."""
    from minimoe.finetune.sft import finetune

    out, data = tmp_path / "defaults", tmp_path / "chat.jsonl"
    long = json.dumps({"prompt": "x" * 100, "response": "yes"})  # its answer lies past seq_len: dropped
    data.write_text((base_run / "chat.jsonl").read_text() + long + "\n")
    res = finetune(
        base_run / "base", data, out, ["train.seq_len=48", "train.batch_size=4"], epochs=1.5, progress=False
    )
    cfg, base_cfg = load_run(out)[2], load_run(base_run / "base")[2]
    # 25 examples in batches of 4: 7 per epoch, 10.5 for 1.5 epochs
    assert (res.max_steps, res.steps, cfg.train.max_steps, cfg.train.warmup_steps) == (11, 11, 11, 1)
    assert cfg.train.lr == pytest.approx(base_cfg.train.lr * 0.1)
    assert (res.examples, res.dropped) == (25, 1)
    # gradient accumulation: an optimizer step takes two batches, so 10.5 batches are 6 steps
    accum = ["train.seq_len=48", "train.batch_size=4", "train.grad_accum=2"]
    assert (
        finetune(base_run / "base", data, tmp_path / "accum", accum, epochs=1.5, progress=False).max_steps
        == 6
    )


def test_lora_trains_with_adamw_and_a_full_fine_tune_keeps_the_runs_optimizer(
    base_run, tmp_path, monkeypatch
):
    """A run trained with Muon (the `tiny` recipe): a full fine-tune keeps Muon, LoRA's adapters train
    with AdamW unless train.optimizer is given."""
    import shutil

    from minimoe.finetune.sft import finetune
    from minimoe.train.trainer import Trainer

    src = tmp_path / "muon-run"
    shutil.copytree(base_run / "base", src)
    for config in src.rglob("config.yaml"):  # the run's and its checkpoint's
        assert "optimizer: adamw" in config.read_text()
        config.write_text(config.read_text().replace("optimizer: adamw", "optimizer: muon"))
    seen = []
    init = Trainer.__init__

    def spy(self, cfg, *args, **kw):
        seen.append(cfg.train.optimizer)
        init(self, cfg, *args, **kw)

    monkeypatch.setattr(Trainer, "__init__", spy)
    data, steps = base_run / "chat.jsonl", [*SEQ_TRAIN, "train.max_steps=1"]
    finetune(src, data, tmp_path / "full", steps, progress=False)
    finetune(src, data, tmp_path / "lora", steps, lora={"r": 2}, merge=False, progress=False)
    muon = [*steps, "train.optimizer=muon"]
    finetune(src, data, tmp_path / "lora-muon", muon, lora={"r": 2}, merge=False, progress=False)
    assert seen == ["muon", "adamw", "muon"]


def test_sft_trains_with_the_dropout_it_is_given(base_run, tmp_path, monkeypatch):
    """model.dropout and model.attn_dropout overrides reach the loaded model's modules (which were built
    with the source run's values)."""
    from minimoe.finetune.sft import finetune
    from minimoe.train.trainer import Trainer

    seen = {}
    init = Trainer.__init__

    def spy(self, *args, **kw):
        seen["dropout"] = {m.p for m in kw["model"].modules() if isinstance(m, torch.nn.Dropout)}
        seen["attn"] = {blk.self_attn.attn_dropout for blk in kw["model"].layers}
        init(self, *args, **kw)

    monkeypatch.setattr(Trainer, "__init__", spy)
    overrides = [*SEQ_TRAIN, "train.max_steps=1", "model.dropout=0.25", "model.attn_dropout=0.125"]
    finetune(base_run / "base", base_run / "chat.jsonl", tmp_path / "drop", overrides, progress=False)
    assert seen == {"dropout": {0.25}, "attn": {0.125}}


def test_packing_shuffles_the_conversations_by_seed(tok):
    """Packing concatenates the conversations in a seeded random order, not the file's."""
    convs = [_conv("q" * (i + 1), "a") for i in range(12)]
    in_order = np.concatenate([encode_conversation(tok, c, DEFAULT_CHAT_TEMPLATE)[0] for c in convs])

    def stream(seed: int) -> list[int]:
        packed, _ = build_examples(tok, convs, DEFAULT_CHAT_TEMPLATE, seq_len=1000, packing=True, seed=seed)
        ((x, _),) = packed
        return x.tolist()

    assert stream(0) == stream(0) != stream(1)
    assert stream(0) != in_order[:-1].tolist()  # not the file's order
    assert len(stream(0)) == len(in_order) - 1  # every token an input but the stream's last


def test_each_epoch_has_its_own_order(tok):
    """The batches of one epoch come in a seeded order, and the next epoch in another one."""
    convs = [_conv("q" * (i + 1), "a") for i in range(12)]
    ex, _ = build_examples(tok, convs, DEFAULT_CHAT_TEMPLATE, seq_len=64)
    firsts = [next(batches(ex, 1, tok.pad_id, seed=0, epoch=e))[0].tolist() for e in range(4)]
    assert len({str(f) for f in firsts}) > 1
    assert firsts[0] == next(batches(ex, 1, tok.pad_id, seed=0, epoch=0))[0].tolist()


def test_a_qlora_adapter_records_the_base_as_loaded_so_it_merges_later(base_run, tmp_path, monkeypatch):
    """QLoRA casts the base to bf16 (and quantizes it, on CUDA) before the adapter trains: the adapter
    records the fingerprint of the weights as loaded, so `lora --adapter --merge` on the fp32 base run
    accepts it. (Without CUDA and bitsandbytes the quantization is stood in for by the bf16 cast alone,
    which changes the fingerprint just as well.)"""
    import minimoe.finetune.lora as lora_mod

    monkeypatch.setattr(lora_mod, "qlora_available", lambda: None)
    monkeypatch.setattr(lora_mod, "_quantize_linears", lambda model, regex: None)
    out = tmp_path / "q"
    argv = ["lora", str(base_run / "base"), "--data", str(base_run / "chat.jsonl"), "--out", str(out)]
    assert main([*argv, "--qlora", "--rank", "4", "--no-progress", *SEQ_TRAIN, "train.max_steps=2"]) == 0
    merge = [
        "lora",
        str(base_run / "base"),
        "--adapter",
        str(out / "adapter"),
        "--merge",
        "--out",
        str(tmp_path / "m"),
    ]
    assert main(merge) == 0
    assert load_run(tmp_path / "m")[0] is not None


def test_base_fingerprint_tells_weights_apart_and_ignores_the_adapter():
    """The fingerprint an adapter records of its base: a tensor small enough to be read whole changes it
    wherever one of its values changes; PEFT's wrapping and the LoRA weights leave it as it was."""
    from minimoe.finetune.lora import apply_lora, base_fingerprint

    torch.manual_seed(0)
    model = Transformer(ModelConfig(**TINY))
    before = base_fingerprint(model)
    assert base_fingerprint(apply_lora(Transformer(ModelConfig(**TINY)), r=2)) != before  # other weights
    torch.manual_seed(0)
    assert base_fingerprint(apply_lora(Transformer(ModelConfig(**TINY)), r=2)) == before
    norm = model.norm.weight
    with torch.no_grad():
        norm[norm.numel() // 2] += 0.5
    assert base_fingerprint(model) != before
