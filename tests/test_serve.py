"""The OpenAI-compatible server: the real `minimoe serve` process on loopback, spoken to with the
official `openai` client (completions, chat, streaming, n, seed, stop) and raw HTTP (every error
case, concurrent clients); the engine and the stop-string streamer on their own."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from test_train import TINY

from minimoe.cli.main import main
from minimoe.data.chat_template import PLAIN_CHAT_TEMPLATE, make_renderer, render_plain
from minimoe.errors import MinimoeError
from minimoe.infer.generate import generate_text
from minimoe.infer.text import TextStream, partial_stop_len
from minimoe.serve.engine import Delta, Engine, Failure, Finish, Job, JobParams
from minimoe.train.checkpoint import load_run
from minimoe.train.run import train_from_config

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

NAME = "tiny-serve"
CONTEXT = 128
KEY = "sk-test-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_TOKENS_LIMIT = 100  # below the context, so the two limits give different errors
MAX_PROMPT_TOKENS = 110
MAX_REQUEST_TOKENS = 4000


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread while this module runs: the model is tiny, and with threads competing
    for two shared cores, OpenMP spinning costs far more CPU than it saves. It also makes the
    in-process reference generation run exactly like the server (OMP_NUM_THREADS=1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serve")
    words = "the cat sat on a mat and the dog ran to the red ball while a bird sang".split()
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(words[i] for i in torch.randint(0, len(words), (12,), generator=g)) for _ in range(400)]
    (root / "corpus.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    overrides = TINY + [
        f"data.path={root / 'corpus.txt'}",
        f"data.cache_dir={root / 'cache'}",
        f"model.max_position_embeddings={CONTEXT}",
        "model.mtp_depth=0",  # --speculative is refused for this run (the MTP run is built below)
        "train.max_steps=40",
        "train.eval_every=1000",
        "train.lr=1e-2",
    ]
    train_from_config(overrides=overrides, run_dir=root / "run", progress=False, sample=False)
    return root / "run"


@pytest.fixture(scope="module")
def loaded(run_dir):
    model, tok, _, _ = load_run(run_dir)
    return model, tok


def _read_lines(stream, out: queue.Queue) -> None:
    for line in stream:
        out.put(line)


class Server:
    """`python -m minimoe serve RUN --port 0 ARGS` in a subprocess: its URL (the port it printed),
    process and stderr log."""

    def __init__(self, run_dir: Path, log_path: Path, args: list[str]) -> None:
        self.log_path = log_path
        self.log = open(log_path, "w+")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MINIMOE_API_KEY": "not-" + KEY}
        cmd = [sys.executable, "-m", "minimoe", "serve", str(run_dir), "--port", "0", "--model-name", NAME]
        self.proc = subprocess.Popen(
            cmd + args + ["--log-level", "info"], stdout=subprocess.PIPE, stderr=self.log, text=True, env=env
        )
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=_read_lines, args=(self.proc.stdout, lines), daemon=True).start()
        try:
            first = lines.get(timeout=60)
        except queue.Empty:
            self.stop()
            pytest.fail(f"the server did not start: {self.read_log()}")
        self.stdout = lines
        self.url = first.strip().rsplit(" ", 1)[-1].removesuffix("/v1")
        assert self.url.startswith("http://127.0.0.1:"), first
        self.host, self.port = "127.0.0.1", int(self.url.rsplit(":", 1)[1])
        deadline = time.time() + 30
        while True:  # the socket listens from the start; answers come once the app has started
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                if time.time() > deadline:
                    raise
                time.sleep(0.1)

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=30).json()

    def read_log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@pytest.fixture(scope="module")
def server_proc(run_dir, tmp_path_factory) -> Server:
    """The server the openai-client tests talk to: it needs the API key KEY (--api-key wins over the
    environment variable) and has low limits."""
    args = [
        "--api-key",
        KEY,
        "--max-tokens",
        str(MAX_TOKENS_LIMIT),
        "--max-prompt-tokens",
        str(MAX_PROMPT_TOKENS),
    ]
    args += ["--max-request-tokens", str(MAX_REQUEST_TOKENS)]
    srv = Server(run_dir, tmp_path_factory.mktemp("serve-log") / "stderr.txt", args)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def server(server_proc) -> str:
    return server_proc.url


@pytest.fixture(scope="module")
def tight(run_dir, tmp_path_factory) -> Server:
    """A server with one cache slot, a queue of two (one per client) and 1 s read timeouts."""
    args = ["--api-key", KEY, "--max-active", "1", "--max-queued", "2", "--max-queued-per-client", "1"]
    args += ["--header-timeout", "1", "--body-timeout", "1", "--prefill-chunk", "1"]
    args += ["--forwarded-allow-ips", "127.0.0.1"]  # a reverse proxy on 127.0.0.1; 127.0.0.2 is a client
    srv = Server(run_dir, tmp_path_factory.mktemp("tight-log") / "stderr.txt", args)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=60)


def _post(url: str, path: str, body) -> httpx.Response:
    content = body if isinstance(body, str | bytes) else json.dumps(body)
    headers = {"content-type": "application/json", **AUTH}
    return httpx.post(url + path, content=content, headers=headers, timeout=60)


# ---------------------------------------------------------------------- openai client


def test_models(client):
    models = client.models.list().data
    assert [m.id for m in models] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_completion_equals_library_generation(client, loaded):
    model, tok = loaded
    prompt = "the cat sat"
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=24, temperature=0)
    want = generate_text(model, tok, prompt, max_new_tokens=24, temperature=0)
    (choice,) = r.choices
    assert choice.text == want and choice.index == 0
    assert r.object == "text_completion" and r.model == NAME
    assert r.usage.prompt_tokens == len(tok.encode(prompt))
    assert r.usage.completion_tokens == len(tok.encode(choice.text))  # byte tokenizer, ASCII text
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert choice.finish_reason == ("length" if r.usage.completion_tokens == 24 else "stop")
    # the documented default of 16 tokens, and echo
    r16 = client.completions.create(model=NAME, prompt=prompt, temperature=0, echo=True)
    assert r16.usage.completion_tokens == 16 and r16.choices[0].text == prompt + want[:16]


def test_completion_stream_and_usage(client):
    kw = dict(model=NAME, prompt="a bird sang", max_tokens=20, temperature=0)
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert len(chunks) > 3  # really streamed, not one blob
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_chat_default_template_and_stream(client, loaded):
    model, tok = loaded
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the dog"}]
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=20, temperature=0)
    rendered = render_plain(messages)
    assert rendered == "system: be brief\nuser: the dog\nassistant:"
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == generate_text(
        model, tok, rendered, max_new_tokens=20, temperature=0
    )
    assert r.usage.prompt_tokens == len(tok.encode(rendered))
    stream = list(
        client.chat.completions.create(
            model=NAME, messages=messages, max_tokens=20, temperature=0, stream=True
        )
    )
    assert stream[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in stream)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == r.choices[0].message.content
    assert stream[-1].choices[0].finish_reason == r.choices[0].finish_reason
    # content as a list of text parts is the same message
    parts = [
        messages[0],
        {"role": "user", "content": [{"type": "text", "text": "the "}, {"type": "text", "text": "dog"}]},
    ]
    again = client.chat.completions.create(model=NAME, messages=parts, max_tokens=20, temperature=0)
    assert again.choices[0].message.content == r.choices[0].message.content


def test_n_and_seed(client):
    kw = dict(model=NAME, prompt="the red", max_tokens=24, temperature=1.0, seed=7)
    r = client.completions.create(**kw, n=2)
    assert [c.index for c in r.choices] == [0, 1]
    if all(c.finish_reason == "length" for c in r.choices):
        assert r.usage.completion_tokens == 2 * 24
    assert r.usage.prompt_tokens == len("the red")
    again = client.completions.create(**kw, n=2)
    assert [c.text for c in again.choices] == [c.text for c in r.choices]  # seeded: reproducible
    assert r.choices[0].text != r.choices[1].text  # choice j samples with seed + j
    assert client.completions.create(**{**kw, "seed": 8}).choices[0].text == r.choices[1].text
    # chat, streamed, n=2: each choice opens with the role and ends with a finish reason
    msgs = [{"role": "user", "content": "a cat"}]
    chunks = list(
        client.chat.completions.create(model=NAME, messages=msgs, max_tokens=10, n=2, seed=3, stream=True)
    )
    text = {0: "", 1: ""}
    for c in chunks:
        text[c.choices[0].index] += c.choices[0].delta.content or ""
    whole = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=10, n=2, seed=3)
    assert [text[0], text[1]] == [c.message.content for c in whole.choices]
    assert sum(1 for c in chunks if c.choices[0].finish_reason) == 2


def test_echo_and_indices_of_several_prompts_times_n(client):
    """Choice j of prompt i is index i * n + j, and echo puts prompt i in front of each of its choices."""
    prompts = ["ab", "the cat"]
    kw = dict(model=NAME, prompt=prompts, n=2, max_tokens=2, temperature=0, echo=True)
    r = client.completions.create(**kw)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    for c in r.choices:
        assert c.text.startswith(prompts[c.index // 2]) and len(c.text) > len(prompts[c.index // 2]), c.text
    streamed = {i: "" for i in range(4)}
    for chunk in client.completions.create(**kw, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert [streamed[i] for i in range(4)] == [c.text for c in r.choices]


def test_the_request_token_budget_counts_every_choice(client):
    # 1 prompt token + 100 completion tokens is well within the budget; 40 choices of it are not
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt="x", max_tokens=MAX_TOKENS_LIMIT, n=40)
    assert (e.value.body["param"], e.value.body["code"]) == ("max_tokens", "too_many_tokens")
    assert f"{40 * (1 + MAX_TOKENS_LIMIT)} tokens" in e.value.body["message"]


def test_a_chat_without_a_budget_fits_its_default_to_the_request_cap(client):
    """Chat's default budget is the rest of the context; with many choices it shrinks to what the
    per-request token cap leaves each (most clients send no max_tokens), instead of a 400 naming a
    max_tokens the client never sent. A prompt too long for n choices even so names n."""
    msgs = [{"role": "user", "content": "a"}]
    r = client.chat.completions.create(model=NAME, messages=msgs, n=40, temperature=1.0, seed=1)
    prompt = r.usage.prompt_tokens
    assert len(r.choices) == 40 and r.usage.completion_tokens <= 40 * (MAX_REQUEST_TOKENS // 40 - prompt)
    assert MAX_REQUEST_TOKENS // 40 - prompt < min(CONTEXT - prompt, MAX_TOKENS_LIMIT)  # it did shrink
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "x" * 85}], n=40)
    assert (e.value.body["param"], e.value.body["code"]) == ("n", "too_many_tokens")
    assert "the prompt and one completion token, times n=40" in e.value.body["message"]


def test_max_completion_tokens_wins_over_max_tokens(client):
    msgs = [{"role": "user", "content": "a cat"}]
    kw = dict(model=NAME, messages=msgs, temperature=0)
    r = client.chat.completions.create(**kw, max_tokens=30, max_completion_tokens=3)
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"
    assert client.chat.completions.create(**kw, max_tokens=30).usage.completion_tokens > 3


def test_stop_strings(client):
    kw = dict(model=NAME, prompt="the ball", max_tokens=40, temperature=1.0, seed=11)
    full = client.completions.create(**kw).choices[0].text
    assert len(full) > 15, full
    stop = full[10:13]  # three bytes, so three tokens: the match is assembled across steps
    cut = full.index(stop)
    r = client.completions.create(**kw, stop=[stop, "never-there"])
    assert r.choices[0].text == full[:cut] and r.choices[0].finish_reason == "stop"
    later = client.completions.create(**kw, stop=["never-there", stop])  # any stop of the list counts
    assert later.choices[0].text == full[:cut] and later.choices[0].finish_reason == "stop"
    if full.isascii():  # then one character is one token (byte tokenizer)
        assert r.usage.completion_tokens == cut + len(stop)  # generation ends on the stop's last token
    streamed = list(client.completions.create(**kw, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == full[:cut]
    assert streamed[-1].choices[0].finish_reason == "stop"
    chat = client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "x"}], max_tokens=30, temperature=0
    )
    text = chat.choices[0].message.content
    assert len(text) > 5, text
    short = client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "x"}], max_tokens=30, temperature=0, stop=text[3:5]
    )
    assert short.choices[0].message.content == text[: text.index(text[3:5])]


def test_openai_client_raises_on_bad_request(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt="x", max_tokens=-1)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])


def test_top_p_zero_keeps_the_most_likely_token(client):
    """top_p 0 is in OpenAI's range [0, 1]: the nucleus is the most likely token alone, so sampling
    at any temperature gives the greedy text (it was a 400)."""
    kw = dict(model=NAME, prompt="the dog", max_tokens=16)
    greedy = client.completions.create(**kw, temperature=0).choices[0].text
    for seed in (1, 2):
        r = client.completions.create(**kw, temperature=1.0, top_p=0, seed=seed)
        assert r.choices[0].text == greedy
    msgs = [{"role": "user", "content": "a cat"}]
    chat = dict(model=NAME, messages=msgs, max_completion_tokens=12)
    want = client.chat.completions.create(**chat, temperature=0).choices[0].message.content
    assert client.chat.completions.create(**chat, top_p=0, seed=3).choices[0].message.content == want


def test_a_null_prompt_starts_a_new_document(client):
    """The openai client types `prompt` as possibly None, which OpenAI documents as "no prompt": the
    model generates as from the start of a document, as for "" (it was a 400)."""
    kw = dict(model=NAME, max_tokens=8, temperature=0)
    r = client.completions.create(**kw, prompt=None, echo=True)
    want = client.completions.create(**kw, prompt="")
    assert r.choices[0].text == want.choices[0].text
    assert r.usage.model_dump() == want.usage.model_dump()


def _model_logprobs(model, ids: list[int], n_new: int) -> torch.Tensor:
    """Slow reference: (n_new, V) log-softmax of the raw logits that predicted the last n_new of `ids`,
    from one plain forward over the whole sequence (no cache)."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, -1)[len(ids) - 1 - n_new : len(ids) - 1]


def test_completion_logprobs_are_the_models_own(client, loaded):
    """Completions' `logprobs: k`: one entry per generated token, each the log-probability of the chosen
    token under the model's raw logits (temperature, top-k and top-p leave it alone), the k most likely
    tokens besides it, and where its text starts; the same numbers as one plain forward over prompt and
    output. `logprobs: 0` gives the chosen tokens' alone; without it the choice has none."""
    model, tok = loaded
    prompt = tok.encode("the cat")
    for kw in (dict(temperature=0), dict(temperature=1.5, seed=7, extra_body={"top_k": 3})):
        r = client.completions.create(model=NAME, prompt="the cat", max_tokens=12, logprobs=3, **kw)
        choice, lp = r.choices[0], r.choices[0].logprobs
        out = tok.encode(choice.text)
        assert len(lp.tokens) == len(out) == r.usage.completion_tokens and "".join(lp.tokens) == choice.text
        assert lp.text_offset == list(range(len(out)))  # one byte (and character) per token here
        want = _model_logprobs(model, prompt + out, len(out))
        assert lp.token_logprobs == pytest.approx(
            want.gather(1, torch.tensor(out)[:, None])[:, 0].tolist(), abs=1e-4
        )
        for j, top in enumerate(lp.top_logprobs):
            values, ids = want[j].topk(3)
            expect = {
                tok.decode([i], skip_special_tokens=False): v for i, v in zip(ids.tolist(), values.tolist())
            }
            expect[lp.tokens[j]] = lp.token_logprobs[j]  # the chosen token, listed too
            assert top.keys() == expect.keys() and list(top.values()) == pytest.approx(
                list(expect.values()), abs=1e-4
            )
            if kw["temperature"] == 0:
                assert lp.token_logprobs[j] == pytest.approx(values[0].item(), abs=1e-5)
    alone = client.completions.create(model=NAME, prompt="the cat", max_tokens=4, temperature=0, logprobs=0)
    assert [set(t) for t in alone.choices[0].logprobs.top_logprobs] == [
        {t} for t in alone.choices[0].logprobs.tokens
    ]
    assert client.completions.create(model=NAME, prompt="a", max_tokens=2).choices[0].logprobs is None


def test_chat_logprobs_stream_as_they_answer_whole(client, loaded):
    """Chat's `logprobs: true` with `top_logprobs`: per token its string, logprob, bytes (which add up to
    the reply) and alternatives, equal to the model's own; streamed, the chunks carry the same entries in
    order, for each of n seeded choices. Completions stream theirs the same way."""
    from minimoe.data.chat_template import chat_renderer

    model, tok = loaded
    msgs = [{"role": "user", "content": "the dog"}]
    kw = dict(
        model=NAME, messages=msgs, max_tokens=10, temperature=1.2, seed=3, n=2, logprobs=True, top_logprobs=2
    )
    whole = client.chat.completions.create(**kw)
    prompt = tok.encode(chat_renderer(tok)[0](msgs))
    for choice in whole.choices:
        content = choice.logprobs.content
        assert b"".join(bytes(c.bytes) for c in content) == choice.message.content.encode()
        out = [c.bytes[0] for c in content]
        want = _model_logprobs(model, prompt + out, len(out))
        assert [c.logprob for c in content] == pytest.approx(
            want.gather(1, torch.tensor(out)[:, None])[:, 0].tolist(), abs=1e-4
        )
        tops = [[tok.encode(bytes(t.bytes).decode()) for t in c.top_logprobs] for c in content]
        assert tops == [[[i] for i in row] for row in want.topk(2).indices.tolist()]
    streamed: dict[int, list] = {0: [], 1: []}
    for chunk in client.chat.completions.create(**kw, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.logprobs.content if c.logprobs else []
    for choice in whole.choices:
        assert [e.model_dump() for e in streamed[choice.index]] == [
            e.model_dump() for e in choice.logprobs.content
        ]
    bare = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=3, logprobs=True)
    assert [c.top_logprobs for c in bare.choices[0].logprobs.content] == [[]] * bare.usage.completion_tokens
    ckw = dict(model=NAME, prompt="on a", max_tokens=10, temperature=0.9, seed=5, logprobs=2)
    one = client.completions.create(**ckw).choices[0].logprobs
    tokens, offsets = [], []
    for chunk in client.completions.create(**ckw, stream=True):
        if chunk.choices[0].logprobs:
            tokens += chunk.choices[0].logprobs.tokens
            offsets += chunk.choices[0].logprobs.text_offset
    assert tokens == one.tokens and offsets == one.text_offset


def test_echo_with_logprobs_scores_the_prompt(client, loaded):
    """Completions' `echo` with `logprobs: k` (how lm-eval's API models score text): the prompt's tokens
    come first, the first without a logprob or alternatives, each other one's from the model's logits at
    the position before it, then the completion's; text offsets run through the echoed prompt into the
    completion. Two prompts as token ids (prefilled together), `max_tokens` 1 and 0, greedy; streamed,
    the chunks give the same text and entries. Checked against one plain forward."""
    model, tok = loaded
    prompts = [tok.encode("the cat sat on a mat and the dog ran"), tok.encode("a bird sang")]
    for max_tokens in (1, 0):
        r = client.completions.create(
            model=NAME, prompt=prompts, max_tokens=max_tokens, temperature=0, echo=True, logprobs=2
        )
        for choice, ids in zip(sorted(r.choices, key=lambda c: c.index), prompts):
            lp, text = choice.logprobs, tok.decode(ids)
            assert choice.text.startswith(text) and len(lp.tokens) == len(ids) + max_tokens
            whole = ids + tok.encode(choice.text[len(text) :])
            assert [tok.encode(t) for t in lp.tokens] == [[i] for i in whole]
            assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
            want = _model_logprobs(model, whole, len(whole) - 1)
            assert lp.token_logprobs[1:] == pytest.approx(
                want.gather(1, torch.tensor(whole[1:])[:, None])[:, 0].tolist(), abs=1e-4
            )
            for j, top in enumerate(lp.top_logprobs[1:]):
                expect = {tok.decode([i]) for i in want[j].topk(2).indices.tolist()} | {lp.tokens[j + 1]}
                assert set(top) == expect
            assert lp.text_offset == [len(tok.decode(whole[:j])) for j in range(len(whole))]
        streamed: dict[int, list] = {0: ["", [], []], 1: ["", [], []]}
        kw = dict(model=NAME, prompt=prompts, max_tokens=max_tokens, temperature=0, echo=True, logprobs=2)
        for chunk in client.completions.create(**kw, stream=True):
            for c in chunk.choices:
                if not streamed[c.index][0]:  # a choice opens with its prompt's text and entries together
                    assert c.text.startswith(tok.decode(prompts[c.index])) and c.logprobs.tokens
                streamed[c.index][0] += c.text
                if c.logprobs:
                    streamed[c.index][1] += c.logprobs.token_logprobs
                    streamed[c.index][2] += c.logprobs.text_offset
        for c in r.choices:
            assert streamed[c.index] == [c.text, c.logprobs.token_logprobs, c.logprobs.text_offset]


def test_lm_eval_scores_through_the_server_as_in_process(server, loaded, tmp_path, monkeypatch):
    """lm-eval's `local-completions` model (echo with logprobs, token ids, batches of prompts) pointed at
    `minimoe serve` gives the loglikelihoods and greedy flags that minimoe's own lm-eval model computes in
    process, and a perplexity task's rolling loglikelihood over several windows."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    from minimoe.eval.lm_eval import MinimoeLM
    from minimoe.hf.export import write_tokenizer_files

    model, tok = loaded
    write_tokenizer_files(tok, tmp_path, CONTEXT)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    api = LocalCompletionsAPI(
        base_url=f"{server}/v1/completions", model=NAME, tokenizer_backend="huggingface",
        tokenizer=str(tmp_path), max_length=MAX_PROMPT_TOKENS + 1, batch_size=3, max_retries=1,
    )  # fmt: skip
    pairs = [("the cat sat on", " a mat"), ("the dog", " ran to the red ball"), ("a", " bird"),
             ("the red ball while a bird", " sang"), ("sat", " on the")]  # fmt: skip
    ids = tok.encode("the dog ran")
    for _ in range(3):  # the model's own greedy continuation: a pair whose flag is true
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    pairs.append(("the dog ran", tok.decode(ids[-3:])))
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    served = api.loglikelihood(requests, disable_tqdm=True)
    # lm_eval's API models keep one position for the completion: windows of max_length - 1 tokens
    local_lm = MinimoeLM(model=model, tokenizer=tok, max_length=MAX_PROMPT_TOKENS)
    local = local_lm.loglikelihood(requests, disable_tqdm=True)
    assert [g for _, g in served] == [g for _, g in local] and any(g for _, g in local)
    assert [ll for ll, _ in served] == pytest.approx([ll for ll, _ in local], abs=1e-3)
    # a perplexity task's rolling windows: a text of about three windows
    text = " ".join(["the cat sat on a mat and the dog ran to the red ball while a bird sang"] * 5)
    rolling = [Instance("loglikelihood_rolling", {}, (text,), 0)]
    served = api.loglikelihood_rolling(rolling, disable_tqdm=True)
    assert served == pytest.approx(local_lm.loglikelihood_rolling(rolling, disable_tqdm=True), abs=1e-3)


def test_logprobs_requests_are_checked(server):
    """Bad logprobs requests are 400s naming the field: more alternatives than OpenAI allows (5 for
    completions, 20 for chat), a boolean where completions take a number, and chat's top_logprobs without
    logprobs. Chat's `logprobs: false` is the default and is accepted, as are the limits themselves."""
    msgs = [{"role": "user", "content": "a"}]
    cases = [
        ("/v1/completions", {"prompt": "x", "logprobs": 6}, "logprobs"),
        ("/v1/completions", {"prompt": "x", "logprobs": True}, "logprobs"),
        ("/v1/chat/completions", {"messages": msgs, "top_logprobs": 2}, "top_logprobs"),
        ("/v1/chat/completions", {"messages": msgs, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("/v1/chat/completions", {"messages": msgs, "logprobs": 1}, "logprobs"),
    ]
    for path, body, param in cases:
        r = _post(server, path, {"model": NAME, "max_tokens": 1, **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)
    r = _post(
        server, "/v1/chat/completions", {"model": NAME, "messages": msgs, "max_tokens": 1, "logprobs": False}
    )
    assert r.status_code == 200 and r.json()["choices"][0]["logprobs"] is None
    limits = [
        ("/v1/completions", {"prompt": "x", "logprobs": 5, "stop": "b" * 256}),
        ("/v1/chat/completions", {"messages": msgs, "logprobs": True, "top_logprobs": 20}),
    ]
    for path, body in limits:
        r = _post(server, path, {"model": NAME, "max_tokens": 1, **body})
        assert r.status_code == 200 and r.headers["content-type"] == "application/json", (body, r.text)
        assert len(r.json()["choices"][0]["logprobs"]["content" if "messages" in body else "tokens"]) == 1


def test_a_tool_choice_that_demands_a_call_is_refused_not_ignored(client):
    """This server calls no tools: `tool_choice` "required" or a named function (and the deprecated
    `function_call` naming one) cannot be honoured, so they are a 400 rather than a plain text reply;
    "none" and "auto" are what it does anyway."""
    msgs = [{"role": "user", "content": "a"}]
    named = {"type": "function", "function": {"name": "f"}}
    for param, value in (
        ("tool_choice", "required"),
        ("tool_choice", named),
        ("function_call", {"name": "f"}),
    ):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=NAME, messages=msgs, max_tokens=2, **{param: value})
        assert (e.value.body["param"], e.value.body["code"]) == (param, "unsupported_parameter")
    for value in ("none", "auto"):
        r = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=2, tool_choice=value)
        assert r.choices[0].finish_reason == "length"


# ---------------------------------------------------------------------- raw HTTP: errors


ERRORS = [
    # (path, body, status, param, code)
    ("/v1/completions", '{"model": "tiny-serve", "prompt": ', 400, None, "invalid_json"),
    ("/v1/completions", "", 400, None, "invalid_json"),
    ("/v1/completions", "[1, 2]", 400, None, "invalid_json"),
    ("/v1/completions", {"prompt": "x"}, 400, "model", "missing_required_parameter"),
    ("/v1/completions", {"model": NAME}, 400, "prompt", "missing_required_parameter"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "model", "model_not_found"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "max_tokens": -1}, 400, "max_tokens", "invalid_value"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "temperature": 2.5}, 400, "temperature", "invalid_value"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "temperature": -0.1}, 400, "temperature", "invalid_value"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "top_p": -0.1}, 400, "top_p", "invalid_value"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "top_p": 1.5}, 400, "top_p", "invalid_value"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "n": 0}, 400, "n", "invalid_value"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "stop": ""}, 400, "stop", None),
    ("/v1/completions", {"model": NAME, "prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options", None),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "x"}], "stream": False, "stream_options": {}}, 400, "stream_options", None),
    ("/v1/completions", {"model": NAME, "prompt": "x", "presence_penalty": 1}, 400, "presence_penalty", "unsupported_parameter"),
    ("/v1/completions", {"model": NAME, "prompt": [1, 2, 100000]}, 400, "prompt", None),
    ("/v1/completions", {"model": NAME, "prompt": []}, 400, "prompt", None),
    ("/v1/completions", {"model": NAME, "prompt": "x" * CONTEXT}, 400, "prompt", "context_length_exceeded"),
    ("/v1/completions", {"model": NAME, "prompt": "x" * 100, "max_tokens": 29}, 400, "max_tokens", "context_length_exceeded"),
    ("/v1/chat/completions", {"model": NAME, "messages": []}, 400, "messages", "invalid_value"),
    ("/v1/chat/completions", {"model": NAME}, 400, "messages", "missing_required_parameter"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role", "invalid_value"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "x" * CONTEXT}]}, 400, "messages", "context_length_exceeded"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": -3}, 400, "max_completion_tokens", "invalid_value"),
    # errors about chat's budget name the field the request gave it in
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": MAX_TOKENS_LIMIT + 1}, 400, "max_completion_tokens", "invalid_value"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "x" * 60}], "max_completion_tokens": 80}, 400, "max_completion_tokens", "context_length_exceeded"),
    # every field checked strictly: overflowing integers, booleans as numbers, invalid Unicode, NaN/inf
    ("/v1/completions", {"model": NAME, "prompt": "x", "seed": 2**70}, 400, "seed", "invalid_value"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "max_tokens": True}, 400, "max_tokens", "invalid_value"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "n": True}, 400, "n", "invalid_value"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "temperature": False}, 400, "temperature", "invalid_value"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "stream": 1}, 400, "stream", "invalid_value"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "max_tokens": "5"}, 400, "max_tokens", "invalid_value"),
    ("/v1/completions", {"model": NAME, "prompt": [[1, True]]}, 400, "prompt", "invalid_value"),
    ("/v1/completions", '{"model": "tiny-serve", "prompt": "a\\ud800b"}', 400, "prompt", "invalid_value"),
    ("/v1/completions", '{"model": "tiny-serve", "prompt": ["ok", "\\udfff"]}', 400, "prompt.1", "invalid_value"),
    ("/v1/chat/completions", '{"model": "tiny-serve", "messages": [{"role": "user", "content": "\\ud83d"}]}', 400, "messages.0.content", "invalid_value"),
    ("/v1/completions", '{"model": "tiny-serve", "prompt": "x", "temperature": NaN}', 400, None, "invalid_json"),
    ("/v1/completions", '{"model": "tiny-serve", "prompt": "x", "top_p": -Infinity}', 400, None, "invalid_json"),
    ("/v1/completions", '{"model": "tiny-serve", "prompt": "x", "temperature": 1e999}', 400, "temperature", "invalid_value"),
    ("/v1/completions", '{"model": "tiny-serve", "prompt": "x", "seed": ' + "9" * 5000 + "}", 400, None, "invalid_json"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "stop": ["a"] * 17}, 400, "stop", "invalid_value"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "n": 129}, 400, "n", "invalid_value"),
    # admission: prompts x n, and the tokens of the whole request
    ("/v1/completions", {"model": NAME, "prompt": ["a"] * 20000, "n": 32, "max_tokens": 500}, 400, "prompt", "too_many_choices"),
    ("/v1/completions", {"model": NAME, "prompt": "a", "n": 65}, 400, "n", "too_many_choices"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "a"}], "n": 65}, 400, "n", "too_many_choices"),
    ("/v1/completions", {"model": NAME, "prompt": ["x" * 100] * 60, "max_tokens": 28}, 400, "max_tokens", "too_many_tokens"),
    ("/v1/completions", {"model": NAME, "prompt": "x" * 100, "n": 40, "max_tokens": 20}, 400, "max_tokens", "too_many_tokens"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "seed": 2**63}, 400, "seed", "invalid_value"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "n": 2, "best_of": 1}, 400, "best_of", "unsupported_parameter"),
    # an empty stop string inside a list, a negative top_k, a number as include_usage, stream_options
    # with "stream": null, token ids below the vocabulary, and a lone surrogate in a key
    ("/v1/completions", {"model": NAME, "prompt": "x", "stop": ["a", ""]}, 400, "stop", None),
    # each stop string is matched against the text's tail after every token: a length cap
    ("/v1/completions", {"model": NAME, "prompt": "x", "stop": ["a", "b" * 257]}, 400, "stop", None),
    ("/v1/completions", {"model": NAME, "prompt": "x", "stop": "b" * 257}, 400, "stop", None),
    ("/v1/completions", {"model": NAME, "prompt": "x", "top_k": -1}, 400, "top_k", "invalid_value"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "stream": True, "stream_options": {"include_usage": 1}}, 400, "stream_options.include_usage", "invalid_value"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "stream": None, "stream_options": {"include_usage": True}}, 400, "stream_options", None),
    ("/v1/completions", {"model": NAME, "prompt": [5, -1]}, 400, "prompt", None),
    ("/v1/completions", '{"model": "tiny-serve", "prompt": "x", "\\ud800": 1}', 400, None, "invalid_value"),
    # a refused value is echoed cut short, not whole
    ("/v1/completions", {"model": NAME, "prompt": "x", "max_tokens": "9" * 100_000}, 400, "max_tokens", "invalid_value"),
    ("/v1/completions", {"model": "m" * 100_000, "prompt": "x"}, 404, "model", "model_not_found"),
]  # fmt: skip


def test_errors_have_openai_shape_and_server_keeps_serving(server):
    for path, body, status, param, code in ERRORS:
        r = _post(server, path, body)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert err["type"] == "invalid_request_error" and err["message"].endswith(".")
        assert (err["param"], err["code"]) == (param, code), (body, err)
        assert len(err["message"]) < 400, err["message"][:500]
    r = httpx.get(f"{server}/v1/nothing-here", headers=AUTH)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.get(f"{server}/v1/completions", headers=AUTH)
    assert r.status_code == 405 and "error" in r.json()
    # the exact fit is fine: 100 prompt tokens + 28 = the 128-token context
    ok = _post(
        server, "/v1/completions", {"model": NAME, "prompt": "x" * 100, "max_tokens": 28, "temperature": 0}
    )
    assert ok.status_code == 200 and ok.json()["usage"]["prompt_tokens"] == 100
    assert httpx.get(f"{server}/v1/models", headers=AUTH).json()["data"][0]["id"] == NAME


def test_zero_max_tokens_and_the_seed_range_ends_are_accepted(server):
    """max_tokens 0 is a valid request (an empty "length" choice); seeds at both ends of the signed
    64-bit range are accepted."""
    r = _post(server, "/v1/completions", {"model": NAME, "prompt": "the", "max_tokens": 0})
    assert r.status_code == 200, r.text
    (choice,) = r.json()["choices"]
    assert choice["text"] == "" and choice["finish_reason"] == "length"
    assert r.json()["usage"]["completion_tokens"] == 0
    for seed in (-(2**63), 2**63 - 1):
        body = {"model": NAME, "prompt": "the", "max_tokens": 2, "seed": seed}
        assert _post(server, "/v1/completions", body).status_code == 200, seed


def test_a_stop_string_longer_than_the_cap_on_stop_strings_is_accepted(server):
    """The cap on `stop` (16) counts the strings of a list: a lone string of 40 characters is one stop
    string, on both routes, as it is inside a list."""
    stop = "y" * 40
    bodies = {
        "/v1/completions": {"prompt": "the"},
        "/v1/chat/completions": {"messages": [{"role": "user", "content": "the"}]},
    }
    for path, body in bodies.items():
        for given in (stop, [stop]):
            r = _post(server, path, {"model": NAME, **body, "max_tokens": 2, "stop": given})
            assert r.status_code == 200, (path, given, r.text)


def test_seeded_choices_do_not_depend_on_the_other_prompts(server):
    """Choice j of every prompt samples with seed + j: a prompt's choices are the same alone or
    after other prompts in the request."""
    kw = {"model": NAME, "max_tokens": 12, "temperature": 1.0, "seed": 7, "n": 2}
    both = _post(server, "/v1/completions", {**kw, "prompt": ["the", "a bird"]}).json()["choices"]
    alone = _post(server, "/v1/completions", {**kw, "prompt": "a bird"}).json()["choices"]
    assert [c["index"] for c in both] == [0, 1, 2, 3]
    assert [c["text"] for c in both[2:]] == [c["text"] for c in alone]
    assert alone[0]["text"] != alone[1]["text"]


def test_choices_come_in_index_order_whatever_order_they_finish_in(server):
    """A plain (non-streamed) answer lists its choices by index even when a later choice finishes
    first (here: on a stop string early in its text; choice j samples with seed + j)."""
    kw = {"model": NAME, "prompt": "the", "max_tokens": 20, "temperature": 1.0}
    text = lambda seed: _post(server, "/v1/completions", {**kw, "seed": seed}).json()["choices"][0]["text"]  # noqa: E731
    texts = {seed: text(seed) for seed in range(7, 12)}
    seed, stop = next(
        (s, texts[s + 1][1:3])
        for s in range(7, 11)
        if len(texts[s + 1]) > 3 and texts[s + 1][1:3] not in texts[s]
    )
    r = _post(server, "/v1/completions", {**kw, "seed": seed, "n": 2, "stop": stop}).json()
    assert [c["index"] for c in r["choices"]] == [0, 1]
    assert [c["text"] for c in r["choices"]] == [texts[seed], texts[seed + 1][: texts[seed + 1].index(stop)]]


def test_a_body_of_exactly_the_limit_is_read_whole_and_the_key_must_match_exactly(server):
    """--max-body-bytes is inclusive: a body of exactly 1 MiB is answered, one byte more is a 413.
    A key with extra characters after the right one is refused."""
    body = {"model": NAME, "prompt": "the", "max_tokens": 1, "temperature": 0, "user": ""}
    pad = (1 << 20) - len(json.dumps(body))
    exact = json.dumps({**body, "user": "u" * pad})
    assert len(exact) == 1 << 20
    r = _post(server, "/v1/completions", exact)
    assert r.status_code == 200, r.text
    r = _post(server, "/v1/completions", json.dumps({**body, "user": "u" * (pad + 1)}))
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    for key in (KEY + "x", KEY[:-1]):
        r = httpx.get(f"{server}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=60)
        assert r.status_code == 401, key


def test_token_ids_up_to_the_last_of_the_vocabulary_are_accepted_and_an_empty_list_is_eos(server, loaded):
    """Token-id prompts: the last id of the vocabulary is fine, one past it is a 400 naming the prompt;
    an empty list of ids starts from the end-of-text token, as the empty string does."""
    _, tok = loaded
    body = {"model": NAME, "max_tokens": 4, "temperature": 0}
    assert _post(server, "/v1/completions", {**body, "prompt": [tok.vocab_size - 1]}).status_code == 200
    r = _post(server, "/v1/completions", {**body, "prompt": [tok.vocab_size]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
    empty = _post(server, "/v1/completions", {**body, "prompt": [[]]})
    assert empty.status_code == 200, empty.text
    want = _post(server, "/v1/completions", {**body, "prompt": ""}).json()
    assert empty.json()["choices"][0]["text"] == want["choices"][0]["text"]
    assert empty.json()["usage"] == want["usage"]  # the end-of-text token counts as the prompt


def test_every_unsupported_parameter_is_refused_and_its_default_accepted(server):
    """Each parameter minimoe cannot honour is a 400 naming it when set, on the route that has it; the
    values that ask for nothing different (best_of equal to n, a "text" response_format) are accepted."""
    refused = {
        "presence_penalty": 0.5,
        "frequency_penalty": 0.5,
        "logit_bias": {"5": 1},
        "suffix": "end",
        "tools": [{"type": "function", "function": {"name": "f"}}],
        "functions": [{"name": "f"}],
        "tool_choice": "required",
        "function_call": {"name": "f"},
        "response_format": {"type": "json_object"},
    }
    for param, value in refused.items():
        r = _post(server, "/v1/completions", {"model": NAME, "prompt": "x", "max_tokens": 1, param: value})
        assert r.status_code == 400, (param, r.text)
        assert (r.json()["error"]["param"], r.json()["error"]["code"]) == (param, "unsupported_parameter")
    msgs = [{"role": "user", "content": "a"}]
    for extra in ({"best_of": 1}, {"best_of": 2, "n": 2}, {"response_format": {"type": "text"}}):
        r = _post(server, "/v1/completions", {"model": NAME, "prompt": "x", "max_tokens": 1, **extra})
        assert r.status_code == 200, (extra, r.text)
    r = _post(
        server,
        "/v1/chat/completions",
        {"model": NAME, "messages": msgs, "max_tokens": 1, "response_format": {"type": "text"}},
    )
    assert r.status_code == 200, r.text


def test_the_bearer_scheme_is_case_insensitive_and_a_405_names_the_allowed_method(server):
    """`Authorization: bearer KEY` is the same credential (auth schemes are case-insensitive); a 405
    carries the Allow header."""
    r = httpx.get(f"{server}/v1/models", headers={"Authorization": f"bearer {KEY}"}, timeout=60)
    assert r.status_code == 200, r.text
    r = httpx.get(f"{server}/v1/completions", headers=AUTH, timeout=60)
    assert r.status_code == 405 and r.headers["allow"] == "POST"


def test_stream_framing_each_choice_opens_with_the_role_and_closes_with_an_empty_delta(server):
    """A streamed chat with n=2: each choice's first chunk is the role with empty content, its last an
    empty delta with the finish reason, and the usage counts both choices; the response is uncached
    text/event-stream. A streamed completion without echo sends no empty chunk before its text."""
    body = {"model": NAME, "messages": [{"role": "user", "content": "a"}], "max_tokens": 4, "n": 2}
    body |= {"temperature": 0, "stream_options": {"include_usage": True}}
    with httpx.stream(
        "POST", f"{server}/v1/chat/completions", json={**body, "stream": True}, headers=AUTH, timeout=60
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cache-control"] == "no-cache"
        data = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    *chunks, last = [json.loads(d) for d in data[:-1]]
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 2 * 4
    chunks = [c["choices"][0] for c in chunks]
    for index in (0, 1):
        mine = [c for c in chunks if c["index"] == index]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""} and mine[0]["finish_reason"] is None
        assert mine[-1]["delta"] == {} and mine[-1]["finish_reason"] == "length"
    data = _stream_chunks(server, "/v1/completions", {"model": NAME, "prompt": "the", "max_tokens": 4})
    texts = [json.loads(d)["choices"][0] for d in data[:-1]]
    assert texts[0]["text"] and all(c["text"] or c["finish_reason"] for c in texts)


def _stream_chunks(server: str, path: str, body: dict) -> list[str]:
    """The `data: ` payloads of a streamed response, in order."""
    with httpx.stream("POST", server + path, json={**body, "stream": True}, headers=AUTH, timeout=60) as r:
        assert r.status_code == 200
        return [line[6:] for line in r.iter_lines() if line.startswith("data: ")]


def test_stream_chunks_carry_a_null_usage_until_the_last_with_include_usage(server):
    """With include_usage every chunk has "usage": null and a last chunk with no choices holds the
    usage, then [DONE]; without it no chunk has a usage field (OpenAI's stream shape)."""
    for path, body in (
        ("/v1/completions", {"model": NAME, "prompt": "the", "max_tokens": 5, "temperature": 0}),
        (
            "/v1/chat/completions",
            {
                "model": NAME,
                "messages": [{"role": "user", "content": "a"}],
                "max_tokens": 5,
                "temperature": 0,
            },
        ),
    ):
        data = _stream_chunks(server, path, {**body, "stream_options": {"include_usage": True}})
        assert data[-1] == "[DONE]"
        chunks = [json.loads(d) for d in data[:-1]]
        assert all("usage" in c and c["usage"] is None for c in chunks[:-1]), path
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5
        want_object = "text_completion" if path == "/v1/completions" else "chat.completion.chunk"
        assert {c["object"] for c in chunks} == {want_object}, path  # the usage chunk's too
        whole = _post(server, path, body).json()["usage"]  # the same counts as the answer in one piece
        assert chunks[-1]["usage"] == whole, path
        plain = [json.loads(d) for d in _stream_chunks(server, path, body)[:-1]]
        assert plain and not any("usage" in c for c in plain), path


def test_concurrent_clients_get_what_a_lone_request_gets(server):
    prompts = ["the cat", "a dog ran to", "while a bird sang and the", "red", "the mat", "on a"]
    reqs = [
        {
            "model": NAME,
            "prompt": p,
            "max_tokens": 20 + 3 * i,
            "temperature": 0 if i % 2 else 1.0,
            "seed": 100 + i,
        }
        for i, p in enumerate(prompts)
    ]

    def ask(req: dict, stream: bool) -> str:
        if not stream:
            return _post(server, "/v1/completions", req).json()["choices"][0]["text"]
        text = ""
        body = {**req, "stream": True}
        with httpx.stream("POST", f"{server}/v1/completions", json=body, headers=AUTH, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    text += json.loads(line[6:])["choices"][0]["text"]
        return text

    alone = [ask(req, stream=False) for req in reqs]
    assert len(set(alone)) > 2  # the requests really differ, so a mix-up would show
    with ThreadPoolExecutor(len(reqs) * 2) as pool:
        futures = [pool.submit(ask, req, stream) for req in reqs for stream in (False, True)]
        together = [f.result() for f in futures]
    assert together == [a for a in alone for _ in range(2)]


# ---------------------------------------------------------------------- API key, limits, disconnects


def test_api_key_is_required_everywhere_but_health(server, client):
    wrong = openai.OpenAI(base_url=f"{server}/v1", api_key="not-" + KEY, max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError) as e:
        wrong.completions.create(model=NAME, prompt="the", max_tokens=2)
    assert e.value.status_code == 401
    assert e.value.body == {
        "message": "Incorrect API key provided.",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_api_key",
    }
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    for headers in (
        {},
        {"Authorization": KEY},
        {"Authorization": f"Basic {KEY}"},
        {"Authorization": "Bearer"},
    ):
        for method, path in [("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("GET", "/nope")]:
            r = httpx.request(method, server + path, headers=headers, timeout=60)
            assert r.status_code == 401, (headers, path, r.text)
            assert r.headers["www-authenticate"] == "Bearer"
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(f"{server}/health").status_code == 200  # open: liveness probes carry no key
    r = client.completions.create(model=NAME, prompt="the", max_tokens=3, temperature=0)
    assert r.usage.completion_tokens <= 3


def test_limits_refuse_in_openai_shape_and_the_server_keeps_serving(server, client):
    with pytest.raises(openai.APIStatusError) as e:  # the real client, a 1 MiB + 1 KiB prompt
        client.completions.create(model=NAME, prompt="x" * ((1 << 20) + 1024), max_tokens=1)
    assert e.value.status_code == 413 and e.value.body["code"] == "request_too_large"

    def chunks():  # no Content-Length: the limit holds while the body streams in
        for _ in range(40):
            yield b" " * 65536

    r = httpx.post(f"{server}/v1/completions", content=chunks(), headers=AUTH, timeout=60)
    assert r.status_code == 413 and "1048576 bytes" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt="x", max_tokens=MAX_TOKENS_LIMIT + 1)
    assert e.value.body["param"] == "max_tokens" and f"limit of {MAX_TOKENS_LIMIT}" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": "x"}], max_tokens=MAX_TOKENS_LIMIT + 1
        )
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt="x" * (MAX_PROMPT_TOKENS + 1), max_tokens=1)
    assert (e.value.body["param"], e.value.body["code"]) == ("prompt", "prompt_too_long")
    for body in ("[" * 100_000, b"\xff\xfe{}", '{"model": "tiny-serve", "prompt": "x", "max_tokens": 1'):
        r = _post(server, "/v1/completions", body)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json", r.text
    # chat without max_tokens gets what fits, up to the limit; the server still answers
    r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "a"}], temperature=0)
    assert 0 < r.usage.completion_tokens <= MAX_TOKENS_LIMIT
    r = client.completions.create(model=NAME, prompt="x" * MAX_PROMPT_TOKENS, max_tokens=2, temperature=0)
    assert r.usage.prompt_tokens == MAX_PROMPT_TOKENS


def _raw_request(
    host: str, port: int, body: dict, path: str = "/v1/completions", source: str = "", forwarded: str = ""
) -> socket.socket:
    """A socket that has sent one complete POST (from the loopback address `source`, if given; with
    `X-Forwarded-For: forwarded`, if given)."""
    data = json.dumps(body)
    extra = f"X-Forwarded-For: {forwarded}\r\n" if forwarded else ""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n{extra}"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    )
    sock = socket.create_connection((host, port), timeout=60, source_address=(source, 0) if source else None)
    sock.sendall((head + data).encode())
    return sock


def _read_until(sock: socket.socket, marker: bytes) -> bytes:
    got = b""
    while marker not in got:
        chunk = sock.recv(65536)
        assert chunk, got
        got += chunk
    return got


def _reset(sock: socket.socket) -> None:
    """Close with RST instead of FIN: the abrupt way a client dies."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _wait(predicate, timeout: float = 30) -> bool:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_client_gone_mid_stream_stops_its_generation(server_proc, client):
    """A raw socket that reads the first chunk of a stream and then resets the connection."""
    before = server_proc.health()["generated_tokens"]
    req = {"model": NAME, "prompt": "the", "max_tokens": MAX_TOKENS_LIMIT, "temperature": 0}
    sock = _raw_request(server_proc.host, server_proc.port, {**req, "stream": True})
    _read_until(sock, b"data: ")
    _reset(sock)
    assert _wait(lambda: server_proc.health()["active_jobs"] == 0, 20)
    assert server_proc.health()["generated_tokens"] - before < MAX_TOKENS_LIMIT // 2  # it stopped early
    # one log line, no traceback
    assert _wait(lambda: "went away mid-stream" in server_proc.read_log(), 10)
    assert "Traceback" not in server_proc.read_log()
    # the next request is answered, and shows that the stream would have run to the limit
    r = client.completions.create(**req)
    assert r.usage.completion_tokens == MAX_TOKENS_LIMIT and r.choices[0].finish_reason == "length"


def test_amplification_request_is_refused_before_any_work(server_proc, client):
    """The 100 KB request that used to create 640,000 jobs: refused at once, naming the cap, while
    another client's small request is answered normally."""
    body = {"model": NAME, "prompt": ["a"] * 20000, "n": 32, "max_tokens": 500}
    assert len(json.dumps(body)) > 100_000
    with ThreadPoolExecutor(2) as pool:
        small = pool.submit(
            client.completions.create, model=NAME, prompt="the cat", max_tokens=5, temperature=0
        )
        t0 = time.perf_counter()
        r = _post(server_proc.url, "/v1/completions", body)
        refused_s = time.perf_counter() - t0
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["code"] == "too_many_choices" and "--max-choices" in err["message"]
        assert "640000 completions (20000 prompts x n=32)" in err["message"]
        assert small.result().usage.completion_tokens == 5
    # refused before tokenizing or queueing anything (the sub-second figure is in BENCHMARKS.md; a
    # loose bound here, since the test machine is shared)
    assert refused_s < 10 and server_proc.health()["queued_jobs"] == 0


def test_client_gone_before_a_plain_answer_cancels_it_and_logs_one_line(server_proc):
    """A non-streaming request whose client hangs up: its choices stop within a step, not at max_tokens.
    The line names the address that connected: without --forwarded-allow-ips no peer is a trusted
    proxy, so the request's X-Forwarded-For is not taken as its client (uvicorn's own default would)."""
    before = server_proc.health()["generated_tokens"]
    req = {"model": NAME, "prompt": "the", "max_tokens": MAX_TOKENS_LIMIT, "n": 4, "temperature": 0}
    sock = _raw_request(server_proc.host, server_proc.port, req, forwarded="10.0.0.7")
    assert _wait(lambda: server_proc.health()["active_jobs"] > 0)
    port = sock.getsockname()[1]
    _reset(sock)
    assert _wait(lambda: server_proc.health()["active_jobs"] == 0)
    assert server_proc.health()["generated_tokens"] - before < 4 * MAX_TOKENS_LIMIT // 2
    line = f"client 127.0.0.1:{port} went away; its request (choices: 4) was cancelled"
    assert _wait(lambda: line in server_proc.read_log(), 10), server_proc.read_log()[-2000:]
    log = server_proc.read_log()
    assert "Traceback" not in log and log.count("(choices: 4) was cancelled") == 1


def test_client_gone_while_sending_its_body_logs_one_line(server_proc):
    """A client that hangs up halfway through its body: one log line, not an internal error with a
    traceback."""
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
        "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    )
    sock = socket.create_connection((server_proc.host, server_proc.port), timeout=30)
    sock.sendall(head.encode() + b'{"model"')
    time.sleep(0.5)  # the server is reading the body
    _reset(sock)
    assert _wait(lambda: "went away while sending its request body" in server_proc.read_log(), 10)
    log = server_proc.read_log()
    assert "Traceback" not in log and "internal error" not in log
    assert log.count("went away while sending its request body") == 1


def _trickle(sock: socket.socket, seconds: float) -> float | None:
    """Send a byte every 0.2 s for up to `seconds`; the seconds until the server closed the connection,
    or None if it stayed open."""
    sock.settimeout(0.2)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        try:
            sock.sendall(b" ")
            while sock.recv(65536):  # the answer, then b"" once the server has closed
                pass
            return time.perf_counter() - t0
        except TimeoutError:
            pass
        except OSError:  # reset by the server
            return time.perf_counter() - t0
    return None


def test_a_client_trickling_an_unread_body_after_its_answer_is_closed(tight):
    """A 401, a 404 or a 408 answers without reading the whole body; a client that goes on sending it a
    byte at a time cannot hold the connection (header and body timeouts of 1 s here)."""
    key = f"Authorization: Bearer {KEY}\r\n"
    for path, auth in (("/v1/completions", ""), ("/v1/nothing-here", key), ("/v1/completions", key)):
        with socket.create_connection((tight.host, tight.port), timeout=30) as sock:
            sock.sendall(
                f"POST {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 100000\r\n\r\n{{".encode()
            )
            closed_after = _trickle(sock, 10)
        assert closed_after is not None and closed_after < 6, (path, auth)
    assert "was still sending a request body" in tight.read_log()


def test_slow_clients_time_out_and_a_full_queue_is_429(tight):
    # a request head that never completes: the connection is closed (header timeout 1 s)
    with socket.create_connection((tight.host, tight.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        assert sock.recv(1024) == b""  # closed by the server
    # half a body: 408 in OpenAI's shape (body timeout 1 s)
    with socket.create_connection((tight.host, tight.port), timeout=30) as sock:
        head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Length: 100\r\n\r\n"
        sock.sendall(head.encode() + b'{"model"')
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 408") and b'"code":"request_timeout"' in answer
    # one slot, one waiting choice per client, two in all
    for _ in range(3):
        socks, refused, full, held = _hold_the_slot_and_fill_the_queue(tight)
        if held:
            break
        for sock in socks:  # a slow moment let the holder finish first: hang up (cancels), try again
            sock.close()
        assert _wait(lambda: tight.health()["active_jobs"] == tight.health()["queued_jobs"] == 0)
    else:
        pytest.fail("the slot-holding request finished before the queue filled, three times")
    for answer, says in ((refused, b"this client's limit"), (full, b"completions are waiting")):
        assert answer.startswith(b"HTTP/1.1 429") and says in answer, answer
        assert b'"type":"rate_limit_error"' in answer
        assert int(re.search(rb"\r\nretry-after: (\d+)\r\n", answer, re.I).group(1)) >= 1
    for sock in socks[:3]:  # all three admitted ones answered, B's in its turn
        assert _read_until(sock, b"usage").startswith(b"HTTP/1.1 200")
        sock.close()
    assert _wait(lambda: tight.health()["active_jobs"] == tight.health()["queued_jobs"] == 0)


def _hold_the_slot_and_fill_the_queue(srv: Server) -> tuple[list[socket.socket], bytes, bytes, bool]:
    """Client A's first request holds the only slot for 127 steps (a 100-token prompt prefilled one token
    per step, then 27 tokens); meanwhile A's second waits, A's third is refused (over its share of the
    queue), client B's waits and client C's is refused (the queue is full), each sent as soon as the
    server has placed the one before it. Returns the sockets (holder, A's second, B's, then the refused
    two), the two refusals, and whether the holder was still running when the last one came back."""
    short = {"model": NAME, "prompt": "the", "max_tokens": 3, "temperature": 0}
    send = lambda source="": _raw_request(srv.host, srv.port, short, source=source)  # noqa: E731
    a1 = _raw_request(srv.host, srv.port, _SLOT_HOLDER)
    placed = _wait(lambda: srv.health()["active_jobs"] == 1, 5)
    a2 = send()
    placed = placed and _wait(lambda: srv.health()["queued_jobs"] == 1, 5)
    a3 = send()
    refused = _read_until(a3, b"}}")
    b = send("127.0.0.2")
    placed = placed and _wait(lambda: srv.health()["queued_jobs"] == 2, 5)
    c = send("127.0.0.3")
    full = _read_until(c, b"}}")
    return [a1, a2, b, a3, c], refused, full, placed and not _finished(a1)


# holds `tight`'s one slot for 127 steps: a 100-token prompt prefilled one token per step, then 27 tokens
_SLOT_HOLDER = {"model": NAME, "prompt": "x" * 100, "max_tokens": 27, "temperature": 0, "stream": True}
_SLOT_HOLDER["stream_options"] = {"include_usage": True}


def _finished(stream: socket.socket) -> bool:
    """Whether a streamed answer has ended, by a peek that neither waits nor consumes."""
    stream.settimeout(0)
    try:
        return b"data: [DONE]" in stream.recv(1 << 20, socket.MSG_PEEK)
    except BlockingIOError:  # nothing to read yet: still prefilling
        return False
    finally:
        stream.settimeout(60)


@pytest.mark.parametrize(
    "given, trusted, untrusted",
    [("127.0.0.1", "127.0.0.1", "127.0.0.2"), ("10.0.0.0/8,::1", "10.1.2.3", "11.0.0.1"),
     ("10.0.0.5, *", "192.168.1.1", None), ("fd00::/8", "fd00::7", "fe80::1")],
)  # fmt: skip
def test_forwarded_allow_ips_are_trusted_by_uvicorn_as_given(given, trusted, untrusted):
    """What `--forwarded-allow-ips` accepts is what uvicorn's own proxy middleware then trusts (its
    networks parse strictly, and "*" means any only alone)."""
    from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

    from minimoe.cli.serve import proxy_list
    from minimoe.serve.app import proxy_settings

    settings = proxy_settings(proxy_list(given))
    hosts = ProxyHeadersMiddleware(None, settings["forwarded_allow_ips"]).trusted_hosts
    assert settings["proxy_headers"] and trusted in hosts
    assert untrusted is None or untrusted not in hosts


def test_clients_behind_a_trusted_proxy_count_apart_and_others_cannot_claim_an_address(tight):
    """The server trusts X-Forwarded-For from 127.0.0.1 only (one slot, one waiting choice per client,
    two in all). Through the proxy, a second client's request waits beside the first client's; from
    127.0.0.2 the header is ignored, so a second request is over that address's share however it
    names itself."""
    short = {"model": NAME, "prompt": "the", "max_tokens": 3, "temperature": 0}
    cases = (  # (source, X-Forwarded-For) of two requests sent while the slot is held; the second's fate
        (("", ""), ("", "10.0.0.7"), "waits"),  # the proxy's own request, then a client's through it
        (("127.0.0.2", "10.0.0.7"), ("127.0.0.2", "10.0.0.8"), "refused"),
    )
    for first, second, fate in cases:
        for _ in range(3):
            holder = _raw_request(tight.host, tight.port, _SLOT_HOLDER)
            placed = _wait(lambda: tight.health()["active_jobs"] == 1, 5)
            socks = [holder, _raw_request(tight.host, tight.port, short, source=first[0], forwarded=first[1])]
            placed = placed and _wait(lambda: tight.health()["queued_jobs"] == 1, 5)
            socks.append(_raw_request(tight.host, tight.port, short, source=second[0], forwarded=second[1]))
            if fate == "waits":
                outcome = _wait(lambda: tight.health()["queued_jobs"] == 2, 5)
            else:
                answer = _read_until(socks[-1], b"}}")
                outcome = answer.startswith(b"HTTP/1.1 429") and b"this client's limit" in answer
            held = placed and not _finished(holder)
            for sock in socks:  # hang up: cancels what is still running or waiting
                sock.close()
            assert _wait(lambda: tight.health()["active_jobs"] == tight.health()["queued_jobs"] == 0)
            if held:
                break
        else:
            pytest.fail("the slot-holding request finished before the others were placed, three times")
        assert outcome, (first, second, fate)


def test_a_request_that_could_never_be_admitted_is_a_400_not_a_429(tight):
    """One slot and one waiting choice per client: three choices could never be admitted, even on an
    idle server, so they are refused like too many choices rather than told to retry; two are answered."""
    assert _wait(lambda: tight.health()["active_jobs"] == tight.health()["queued_jobs"] == 0)
    body = {"model": NAME, "prompt": "the", "max_tokens": 2, "temperature": 0}
    r = _post(tight.url, "/v1/completions", {**body, "n": 3})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["param"], err["code"]) == ("n", "too_many_choices") and "limit of 2" in err["message"]
    assert _post(tight.url, "/v1/completions", {**body, "n": 2}).status_code == 200


def test_half_a_body_gets_its_408_within_the_body_timeout(tight):
    """The body timeout (1 s here) bounds the time from the head to the 408, not just the wait."""
    head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Length: 100\r\n\r\n"
    with socket.create_connection((tight.host, tight.port), timeout=30) as sock:
        sock.sendall(head.encode() + b'{"model"')
        t0 = time.perf_counter()
        answer = _read_until(sock, b"request_timeout")
        waited = time.perf_counter() - t0
    assert answer.startswith(b"HTTP/1.1 408") and waited < 6, waited


class _Engine:
    """Just enough of an Engine for `Batch`: `submit` raises `error`, if any."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error

    def submit(self, jobs) -> None:
        if self.error is not None:
            raise self.error


def test_a_refused_batch_is_a_429_rate_limit_or_a_503_server_error_both_with_retry_after():
    import asyncio

    from minimoe.serve.engine import QueueFull
    from minimoe.serve.http import error_response
    from minimoe.serve.service import Batch

    async def refuse(status: int):
        job = Job(0, [1], JobParams(max_tokens=1), lambda e: None)
        with pytest.raises(Exception) as e:
            Batch(_Engine(QueueFull("no room", retry_after=3, status=status)), [job])
        return error_response(e.value)

    full, closing = asyncio.run(refuse(429)), asyncio.run(refuse(503))
    assert full.status_code == 429 and full.headers["retry-after"] == "3"
    assert json.loads(full.body)["error"] == {
        "message": "no room",
        "type": "rate_limit_error",
        "param": None,
        "code": "rate_limit_exceeded",
    }
    assert closing.status_code == 503 and closing.headers["retry-after"] == "3"
    assert json.loads(closing.body)["error"]["type"] == "server_error"


def test_a_failure_mid_stream_is_an_error_event_with_no_done_and_no_went_away_line(monkeypatch):
    """An engine failure ends a stream with the error object and no `data: [DONE]`, and is not logged
    as a client that went away."""
    import asyncio
    from types import SimpleNamespace

    from minimoe.serve import sse as sse_module
    from minimoe.serve.service import Batch
    from minimoe.serve.sse import Meta, completion_chunks

    lines: list[str] = []
    monkeypatch.setattr(sse_module, "log", SimpleNamespace(info=lambda msg, *a: lines.append(msg % a)))

    async def run() -> list[str]:
        job = Job(0, [1], JobParams(max_tokens=4), lambda e: None)
        batch = Batch(_Engine(), [job])
        job.post(Delta(0, "hi"))
        job.post(Failure(0, "the server is shutting down", 503))
        request = SimpleNamespace(client=SimpleNamespace(host="127.0.0.1", port=9))
        chunks = completion_chunks(Meta("cmpl-1", "text_completion", NAME), [""], 1, None, False)
        response = sse_module.sse(batch, chunks, request)
        return [part async for part in response.body_iterator]

    parts = asyncio.run(run())
    assert len(parts) == 2 and json.loads(parts[1][6:])["error"]["message"] == "the server is shutting down"
    assert not any("[DONE]" in p for p in parts) and all(p.endswith("\n\n") for p in parts)
    assert lines == []


def test_sigterm_cancels_everything_and_exits_within_5_seconds(run_dir, tmp_path):
    srv = Server(
        run_dir, tmp_path / "stderr.txt", ["--api-key", KEY, "--max-active", "1", "--prefill-chunk", "1"]
    )
    try:
        # one slot and six requests of 127 steps each (a 100-token prompt prefilled a token per step)
        long = {"model": NAME, "prompt": "x" * 100, "max_tokens": 27, "temperature": 0}
        socks = [_raw_request(srv.host, srv.port, {**long, "stream": True})]
        socks += [_raw_request(srv.host, srv.port, long) for _ in range(5)]
        # every request is in before the signal (one running, five queued): a connection whose
        # request was still unread when the server stopped would get no answer at all
        assert _wait(lambda: srv.health()["queued_jobs"] >= 5)
        t0 = time.perf_counter()
        srv.proc.send_signal(signal.SIGTERM)
        answers = []
        for sock in socks:
            answer = b""
            while chunk := sock.recv(65536):  # the server closes every connection
                answer += chunk
            answers.append(answer)
        srv.proc.wait(timeout=30)
        # uvicorn re-raises the signal once it has shut down, so the exit status says SIGTERM
        assert time.perf_counter() - t0 < 5 and srv.proc.returncode in (0, -signal.SIGTERM)
        # the waiting requests were refused with 503; none was left without an answer
        refused = [a for a in answers[1:] if a.startswith(b"HTTP/1.1 503")]
        assert refused and all(b"shutting down" in a for a in refused)
        assert all(a.startswith((b"HTTP/1.1 503", b"HTTP/1.1 200")) for a in answers)
        assert answers[0].startswith(b"HTTP/1.1 200")  # the stream: complete, or ended by an error event
        with pytest.raises(OSError):  # nothing listens any more
            socket.create_connection((srv.host, srv.port), timeout=5)
        assert "Traceback" not in srv.read_log()
    finally:
        srv.stop()


def test_a_request_read_after_sigterm_is_a_503(run_dir, tmp_path):
    """A request whose body arrives after SIGTERM (the server is closing, no longer busy) is refused
    with 503 as the queued ones are, not with a 429 rate-limit error."""
    srv = Server(run_dir, tmp_path / "stderr.txt", ["--api-key", KEY])
    try:
        data = json.dumps({"model": NAME, "prompt": "the", "max_tokens": 2}).encode()
        head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
        head += f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
        with socket.create_connection((srv.host, srv.port), timeout=30) as sock:
            sock.sendall(head.encode() + data[:5])
            time.sleep(0.5)  # the head has been read; the server waits for the body
            srv.proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            sock.sendall(data[5:])
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 503"), answer
        assert b"shutting down" in answer and b"rate_limit" not in answer
        srv.proc.wait(timeout=30)
    finally:
        srv.stop()


def test_api_key_comes_from_the_flag_or_the_environment():
    from minimoe.cli.serve import resolve_api_key
    from minimoe.errors import MinimoeError

    assert resolve_api_key(None, {}) is None
    assert resolve_api_key(None, {"MINIMOE_API_KEY": " k1 "}) == "k1"
    assert resolve_api_key(None, {"MINIMOE_API_KEY": ""}) is None
    assert resolve_api_key("k2", {"MINIMOE_API_KEY": "k1"}) == "k2"
    with pytest.raises(MinimoeError, match="--api-key must not be empty"):
        resolve_api_key(" ", {})


# ---------------------------------------------------------------------- a tokenizer with its own template


def test_in_process_server_tokenizer_template_and_disconnect(loaded):
    pytest.importorskip("jinja2")
    from minimoe.cli.serve import listen
    from minimoe.serve import build_app

    model, tok = loaded
    tok = type(tok).byte()
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system messages') }}{% endif %}"
        "<{{ m['role'] }}{% if m['name'] is defined %}:{{ m['name'] }}{% endif %}>{{ m['content'] }}{{ eos_token }}"
        "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    sock = listen("127.0.0.1", 0)
    srv = uvicorn.Server(uvicorn.Config(build_app(model, tok, "t"), log_level="warning", lifespan="on"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        while not srv.started:
            time.sleep(0.05)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        r = client.chat.completions.create(
            model="t", messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0
        )
        rendered = "<user>hi<|endoftext|><assistant>"
        assert r.usage.prompt_tokens == len(tok.encode(rendered)) == 2 + 6 + 1 + 11  # EOS is one token
        assert r.choices[0].message.content == generate_text(
            model, tok, rendered, max_new_tokens=5, temperature=0
        )
        named = [{"role": "user", "content": "hi", "name": "al"}]  # a message's name reaches the template
        r = client.chat.completions.create(model="t", messages=named, max_tokens=1, temperature=0)
        assert r.usage.prompt_tokens == len(tok.encode("<user:al>hi<|endoftext|><assistant>"))
        parts = [{"role": "user", "content": [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]}]
        r = client.chat.completions.create(model="t", messages=parts, max_tokens=1, temperature=0)
        assert r.usage.prompt_tokens == len(tok.encode(rendered))  # text parts join with nothing between
        bad = _post(
            url, "/v1/chat/completions", {"model": "t", "messages": [{"role": "system", "content": "x"}]}
        )
        assert bad.status_code == 400 and bad.json()["error"]["message"] == "no system messages"
        # a client that leaves mid-stream: its generation stops instead of running to max_tokens
        before = httpx.get(f"{url}/health").json()["generated_tokens"]
        body = {"model": "t", "prompt": "the", "max_tokens": 120, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as resp:
            next(line for line in resp.iter_lines() if line.startswith("data: "))
        deadline = time.time() + 10
        while (health := httpx.get(f"{url}/health").json())["active_jobs"] and time.time() < deadline:
            time.sleep(0.05)
        assert health["active_jobs"] == 0 and health["generated_tokens"] - before < 60
    finally:
        srv.should_exit = True
        thread.join(timeout=10)
        sock.close()


def test_default_template_jinja_equals_python():
    pytest.importorskip("jinja2")
    messages = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u\nv"},
        {"role": "assistant", "content": "a"},
    ]
    assert make_renderer(PLAIN_CHAT_TEMPLATE)(messages) == render_plain(messages)


def test_developer_role_renders_as_system_where_the_template_does_not_name_it(client, loaded):
    """OpenAI's `developer` message is the system message of a template that knows only system, user
    and assistant (one that refuses other roles included); a template naming `developer` gets it as is."""
    pytest.importorskip("jinja2")
    model, tok = loaded
    dev = [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "the dog"}]
    sys_ = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the dog"}]
    strict = (
        "{% for m in messages %}{% if m.role not in ['system', 'user', 'assistant'] %}"
        "{{ raise_exception('unknown role ' + m.role) }}{% endif %}[{{ m.role }}]{{ m.content }}{% endfor %}"
    )
    knows = "{% for m in messages %}{% if m.role == 'developer' %}D:{% endif %}{{ m.content }};{% endfor %}"
    assert make_renderer(strict)(dev) == make_renderer(strict)(sys_) == "[system]be brief[user]the dog"
    assert make_renderer(knows)(dev) == "D:be brief;the dog;"
    assert render_plain(dev) == render_plain(sys_) == make_renderer(PLAIN_CHAT_TEMPLATE)(dev)
    r = client.chat.completions.create(model=NAME, messages=dev, max_tokens=8, temperature=0)
    assert r.choices[0].message.content == generate_text(
        model, tok, render_plain(sys_), max_new_tokens=8, temperature=0
    )


# ---------------------------------------------------------------------- CLI


def test_serve_cli_errors(run_dir, tmp_path, capsys):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        port = busy.getsockname()[1]
        assert main(["serve", str(run_dir), "--port", str(port)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and f"port {port} on 127.0.0.1 is already in use" in err
    finally:
        busy.close()
    assert main(["serve", str(tmp_path / "missing"), "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "does not exist" in err
    assert main(["serve", str(run_dir), "--port", "70000"]) == 2
    assert "--port must be between 0 and 65535" in capsys.readouterr().err
    for flag in ("--max-body-bytes", "--max-tokens", "--max-prompt-tokens", "--max-active", "--max-choices"):
        assert main(["serve", str(run_dir), "--port", "0", flag, "0"]) == 2
        assert f"{flag} must be >= 1, got 0" in capsys.readouterr().err
    for flag in ("--header-timeout", "--body-timeout", "--write-timeout"):
        assert main(["serve", str(run_dir), "--port", "0", flag, "nan"]) == 2
        assert f"{flag} must be > 0, got nan" in capsys.readouterr().err
    assert main(["serve", str(run_dir), "--port", "0", "--api-key", ""]) == 2
    assert "--api-key must not be empty" in capsys.readouterr().err
    assert main(["serve", str(run_dir), "--port", "0", "--speculative"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--speculative needs a run trained with MTP modules" in err


@pytest.mark.slow
def test_serve_speculative_answers_what_plain_greedy_generation_gives(run_dir, tmp_path):
    """`minimoe serve --speculative` on a run trained with an MTP module: concurrent greedy requests
    (batched, drafted and verified together) get exactly the library's plain greedy text."""
    overrides = TINY + [
        f"data.path={run_dir.parent / 'corpus.txt'}", f"data.cache_dir={tmp_path / 'cache'}",
        f"model.max_position_embeddings={CONTEXT}", "model.mtp_depth=1", "train.max_steps=40", "train.eval_every=1000",
        "train.lr=1e-2",
    ]  # fmt: skip
    train_from_config(overrides=overrides, run_dir=tmp_path / "run", progress=False, sample=False)
    model, tok, _, _ = load_run(tmp_path / "run")
    prompts = ["the cat", "a dog ran to", "red ball while the"]
    srv = Server(tmp_path / "run", tmp_path / "stderr.txt", ["--api-key", KEY, "--speculative"])
    try:
        c = openai.OpenAI(base_url=f"{srv.url}/v1", api_key=KEY, max_retries=0, timeout=60)
        ask = lambda p: c.completions.create(model=NAME, prompt=p, max_tokens=30, temperature=0)  # noqa: E731
        with ThreadPoolExecutor(len(prompts)) as pool:
            got = [r.choices[0].text for r in pool.map(ask, prompts)]
    finally:
        srv.stop()
    assert got == [generate_text(model, tok, p, max_new_tokens=30, temperature=0) for p in prompts]


# ---------------------------------------------------------------------- engine and streamer, no HTTP


def test_text_stream_holds_back_partial_stops_and_utf8():
    data = "ab\u00e9XYcdXYZ tail".encode()
    stream = TextStream(lambda ids: bytes(ids).decode("utf-8", errors="replace"), stop=["XYZ", "Q"])
    deltas = [stream.push(b) for b in data]
    assert "".join(deltas) == "ab\u00e9XYcd" and stream.text == "ab\u00e9XYcd" and stream.stopped
    assert "\ufffd" not in "".join(deltas)  # the two bytes of é come out together
    assert deltas[4] == "" and deltas[5] == "" and deltas[6] == "XYc"  # "XY" waited: it could start "XYZ"
    assert stream.ids == list(data[: data.index(b"XYZ") + 3])
    assert partial_stop_len("abXY", ["XYZ"]) == 2 and partial_stop_len("abX", ["Q", "XYZ"]) == 1
    plain = TextStream(lambda ids: bytes(ids).decode())
    assert "".join(plain.push(b) for b in b"hello") + plain.flush() == "hello"


def test_a_stop_string_with_u_fffd_does_not_match_a_character_split_across_tokens():
    """U+FFFD at the end of the text stands for the first bytes of a character still being generated:
    a stop string matches it only once it stays (an invalid byte, or the end of the sequence)."""
    from types import SimpleNamespace

    decode = lambda ids: bytes(ids).decode("utf-8", errors="replace")  # noqa: E731
    stream = TextStream(decode, stop=["\ufffd"])
    assert "".join(stream.push(b) for b in "café".encode()) + stream.flush() == "café"
    assert not stream.stopped
    stream = TextStream(decode, stop=["\ufffd"])
    assert [stream.push(b) for b in b"ok\xc3"] == ["o", "k", ""] and not stream.stopped
    assert stream.flush() == "" and stream.stopped and stream.text == "ok"  # it ended inside a character

    # in the engine: token i stands for byte i of "ééé", and the choice finishes with "stop" when the
    # end of the sequence leaves a U+FFFD that the stop string matches
    model, tok = _mtp_model()
    data = "ééé".encode()
    split = SimpleNamespace(decode=lambda ids: data[: len(ids)].decode("utf-8", errors="replace"), eos_id=-1)

    def finish(max_tokens: int) -> tuple[str, str]:
        engine = Engine(model, tok)
        engine.tokenizer = split
        params = JobParams(max_tokens=max_tokens, temperature=0, stop=("\ufffd",))
        (f,) = [
            e for e in _engine_run(engine, [Job(0, [1, 2], params, lambda e: None)]) if isinstance(e, Finish)
        ]
        return f.reason, f.text

    assert finish(4) == ("length", "éé") and finish(3) == ("stop", "é")


def _engine_run(engine: Engine, jobs: list[Job], timeout: float = 120) -> list:
    """Submit `jobs` (grouped by client, in order) before starting `engine`; every event, in order, once
    every job has finished or failed."""
    events: list = []
    lock = threading.Lock()
    done = threading.Event()
    posts = {id(j): j.post for j in jobs}

    def record(job):
        def post(e):
            with lock:
                events.append(e)
                if sum(isinstance(x, (Finish, Failure)) for x in events) == len(jobs):
                    done.set()
            posts[id(job)](e)

        return post

    for job in jobs:
        job.post = record(job)
    i = 0
    while i < len(jobs):  # one submit per client run, as one request's choices
        k = i
        while k < len(jobs) and jobs[k].client == jobs[i].client:
            k += 1
        engine.submit(jobs[i:k])
        i = k
    engine.start()
    try:
        assert done.wait(timeout)
    finally:
        engine.close()
    return events


def _texts(events) -> dict[int, str]:
    return {e.index: e.text for e in events if isinstance(e, Finish)}


def _prefilling(engine: Engine) -> list:
    """The engine's sequences being prefilled, over every prefill row."""
    return [seq for group in engine._prefilling.values() for seq in group]


def test_engine_batches_every_sequence_and_each_equals_alone(loaded):
    model, tok = loaded
    specs = [
        ("the cat", JobParams(max_tokens=20, temperature=0)),
        ("a dog ran to the red ball while the bird", JobParams(max_tokens=14, temperature=0)),
        ("red", JobParams(max_tokens=18, temperature=1.0, seed=5)),
        ("on a mat", JobParams(max_tokens=16, temperature=0.8, top_k=5, top_p=0.9, seed=9)),
        ("the dog", JobParams(max_tokens=30, temperature=1.0, seed=2, stop=("ball",))),
    ]

    def jobs():
        # two clients: one alone holds at most 3 of the 4 prefill rows
        return [
            Job(i, tok.encode(p), params, lambda e: None, client=str(i % 2))
            for i, (p, params) in enumerate(specs)
        ]

    # prefill_chunk 4: the longer prompts are prefilled over several steps, between decode steps
    alone = [_texts(_engine_run(Engine(model, tok, prefill_chunk=4), [job]))[job.index] for job in jobs()]
    assert len(set(alone)) == len(alone)  # they differ, so a mix-up would show
    engine = Engine(model, tok, max_active=8, prefill_chunk=4)
    sizes = []
    decode = engine.pool.decode
    engine.pool.decode = lambda tokens: sizes.append(len(tokens)) or decode(tokens)
    events = _engine_run(engine, jobs())
    together = _texts(events)
    assert [together[i] for i in range(len(specs))] == alone
    for i in range(len(specs)):  # the deltas add up to the final text
        assert "".join(e.text for e in events if isinstance(e, Delta) and e.index == i) == alone[i]
    # continuous batching: all five sequences advanced together in one forward, joining as their
    # prefills completed and leaving as they finished
    assert max(sizes) == len(specs) and sizes[0] < len(specs) and sizes[-1] < len(specs)
    assert len(sizes) < sum(p.max_tokens for _, p in specs) // 2
    assert engine.pool.n == 0 and engine.active_jobs == 0
    # prompts are prefilled several to a forward, within the step's budget of positions (padding
    # included), and the texts are still each prompt's own (above)
    shapes = []
    engine = Engine(model, tok, max_active=8, prefill_chunk=12, prefill_rows=3)
    step = engine._prefill.step
    engine._prefill.step = lambda budget: shapes.append((len(engine._prefilling), budget)) or step(budget)
    together = _texts(_engine_run(engine, jobs()))
    assert [together[i] for i in range(len(specs))] == alone
    assert max(rows for rows, _ in shapes) == 3 and all(budget == 12 for _, budget in shapes)
    # a budget past the context stops at the context (the routes refuse such requests before this)
    full = Job(0, tok.encode("x" * (CONTEXT - 2)), JobParams(max_tokens=50, temperature=0), lambda e: None)
    (finish,) = [e for e in _engine_run(Engine(model, tok), [full]) if isinstance(e, Finish)]
    assert (finish.reason, finish.completion_tokens) in {("length", 2), ("stop", 0), ("stop", 1)}


def _mtp_model(seed: int = 0, context: int = 64):
    """A random float64 tiny MLA MoE with one MTP module over the byte vocabulary (float64: greedy
    equality compares argmaxes, and fp64 rules out near-tie flips between the 1- and 2-token steps)."""
    from minimoe.config import ModelConfig
    from minimoe.data import Tokenizer
    from minimoe.model.transformer import Transformer

    cfg = ModelConfig(
        vocab_size=258, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=context, kv_lora_rank=12,
        qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, intermediate_size=48,
        n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, mtp_depth=1,
    )  # fmt: skip
    torch.manual_seed(seed)
    return Transformer(cfg).double().eval(), Tokenizer.byte()


@pytest.mark.parametrize("speculative", [False, True])
def test_engine_text_continues_the_prompt_for_a_sentencepiece_tokenizer(speculative):
    """With a SentencePiece-style (Metaspace) tokenizer, whose decoder drops the space before the first
    token it decodes, each choice's text is what its tokens add to the prompt's text, space included
    (as decode(prompt + tokens) has it), and the deltas add up to it; the logprob entries' offsets
    count in that text (from the prompt's text when the prompt's tokens have entries too); a stop
    string that begins with the space ends the choice at its start. A prompt of EOS only (an empty
    prompt) gives the tokens' own text."""
    from test_infer import context_tokenizers, text_after

    tok = context_tokenizers()["metaspace"]
    base = _mtp_model()[0]
    torch.manual_seed(0)
    model = base.__class__(replace(base.cfg, vocab_size=tok.vocab_size)).double().eval()
    prompts = [tok.encode(p) for p in ("hello", "hi there,", "be brief. don't", "bye and")] + [[tok.eos_id]]
    specs = [(ids, JobParams(max_tokens=10, temperature=0, logprobs=0)) for ids in prompts]
    specs += [(prompts[1], JobParams(max_tokens=10, temperature=1.0, seed=s, logprobs=0)) for s in (1, 2)]
    specs += [(prompts[0], JobParams(max_tokens=10, temperature=0, logprobs=0, prompt_logprobs=True))]

    def run(specs) -> list:
        jobs = [Job(i, list(ids), params, lambda e: None) for i, (ids, params) in enumerate(specs)]
        return _engine_run(Engine(model, tok, max_active=4, prefill_chunk=8, speculative=speculative), jobs)

    events = run(specs)
    finishes = {e.index: e for e in events if isinstance(e, Finish)}
    spaced = []
    for i, (ids, params) in enumerate(specs):
        f = finishes[i]
        head = len(tok.decode(ids)) if params.prompt_logprobs else 0
        entries = f.logprobs[len(ids) :] if params.prompt_logprobs else f.logprobs
        new = [e.token for e in entries]
        assert f.text == text_after(tok.decode, ids, new), i
        if ids == [tok.eos_id]:
            assert f.text == tok.decode(new)
        assert "".join(e.text for e in events if isinstance(e, Delta) and e.index == i) == f.text, i
        assert [e.offset for e in entries] == [
            head + len(text_after(tok.decode, ids, new[:j])) for j in range(len(new))
        ]
        if f.text.startswith(" ") and len(f.text) > 1 and params.temperature == 0:
            spaced.append((ids, params, f.text))
    assert len(spaced) >= 2  # completions that open with a space, to stop at
    cut = [(ids, replace(params, stop=(text[:2],))) for ids, params, text in spaced]
    for f in (e for e in run(cut) if isinstance(e, Finish)):
        assert (f.reason, f.text) == ("stop", ""), f.index


def test_engine_speculative_equals_plain_greedy_and_sampling_is_reproducible(monkeypatch):
    """MTP self-speculation in the batching engine: greedy rows generate exactly what the plain engine
    does (drafts accepted or not, rows of different lengths verified in one forward); seeded sampled
    rows generate the same alone as in a batch. Drafts from an oracle (the true greedy continuation,
    or a wrong token on alternate steps) exercise the two-token path in every row."""
    model, tok = _mtp_model()
    greedy = JobParams(max_tokens=20, temperature=0)
    specs = [("the cat", greedy), ("a dog ran to the red ball", greedy), ("r", greedy),
             ("on a mat", JobParams(max_tokens=16, temperature=0.9, top_k=20, seed=3)),
             ("dog", JobParams(max_tokens=12, temperature=1.0, seed=4))]  # fmt: skip

    def jobs():
        return [Job(i, tok.encode(p), params, lambda e: None) for i, (p, params) in enumerate(specs)]

    plain = _texts(_engine_run(Engine(model, tok, prefill_chunk=3), jobs()))
    spec = Engine(model, tok, prefill_chunk=3, speculative=True)
    got = _texts(_engine_run(spec, jobs()))
    assert [got[i] for i in range(3)] == [plain[i] for i in range(3)]
    assert spec.drafted > 0
    alone = [_texts(_engine_run(Engine(model, tok, speculative=True), [j]))[j.index] for j in jobs()[3:]]
    assert [got[3], got[4]] == alone

    # oracle drafts: every other draft is the main model's own next-but-one greedy token
    oracle = Engine(model, tok, max_active=4, speculative=True)
    from reference import greedy_no_cache

    truth = {
        i: tok.encode(specs[i][0]) + greedy_no_cache(model, tok.encode(specs[i][0]), 20) for i in range(3)
    }
    from minimoe.serve import engine as engine_module

    set_drafts = engine_module.next_drafts
    calls = [0]

    def with_oracle(draft_logits, seqs):
        set_drafts(draft_logits, seqs)
        calls[0] += 1
        for s in seqs:
            ids = truth[s.job.index]
            at = s.prompt_len + s.count  # the token after next_token (the count includes next_token)
            if calls[0] % 2 and at < len(ids):
                s.draft = ids[at]

    from minimoe.serve import speculative_step

    monkeypatch.setattr(engine_module, "next_drafts", with_oracle)  # the first drafts, as rows join
    monkeypatch.setattr(speculative_step, "next_drafts", with_oracle)  # the drafts of every step
    got = _texts(_engine_run(oracle, jobs()[:3]))
    assert [got[i] for i in range(3)] == [plain[i] for i in range(3)]
    assert oracle.drafted // 4 < oracle.accepted < oracle.drafted
    with pytest.raises(MinimoeError, match="MTP"):
        Engine(_mtp_model()[0].__class__(replace(model.cfg, mtp_depth=0)), tok, speculative=True)


@pytest.mark.parametrize("speculative", [False, True])
def test_choices_of_one_prompt_share_one_prefill_and_each_equals_alone(speculative, monkeypatch):
    """Jobs of one prompt queued together (a request's n choices) are prefilled once, in one row, and
    each joins the batch with a copy of it (speculative: each with its own first draft, whose MTP
    entry depends on its first token, written and copied one sequence at a time). Each generates what
    it would alone, greedy or sampled, with as many drafts drafted and accepted; a prompt scored for
    its logprobs takes a row of its own, scored once, and every choice gets its entries. Speculative,
    every draft's MTP logits equal the ones it gets alone (greedy texts do not show a wrong draft)."""
    from minimoe.serve import engine as engine_module

    model, tok = _mtp_model()
    drafts: dict[int, list[torch.Tensor]] = {}  # job -> the MTP logits of each of its drafts, in order
    set_drafts = engine_module.next_drafts

    def recorded(draft_logits, seqs):
        for seq, logits in zip(seqs, draft_logits):
            drafts.setdefault(seq.job.index, []).append(logits.clone())
        set_drafts(draft_logits, seqs)

    from minimoe.serve import speculative_step

    monkeypatch.setattr(engine_module, "next_drafts", recorded)  # the first drafts, as rows join
    monkeypatch.setattr(speculative_step, "next_drafts", recorded)  # the drafts of every step
    ids = tok.encode("a dog ran to the red ball")
    params = [JobParams(max_tokens=14, temperature=0)]
    params += [JobParams(max_tokens=12, temperature=1.0, top_k=20, seed=s) for s in (1, 2, 3)]
    params += [JobParams(max_tokens=4, temperature=0, logprobs=2, prompt_logprobs=True)] * 2
    params += [JobParams(max_tokens=3, temperature=0, logprobs=3, prompt_logprobs=True)]  # other alternatives

    def jobs():
        return [Job(i, ids, p, lambda e: None) for i, p in enumerate(params)]

    engine = Engine(model, tok, prefill_chunk=8, speculative=speculative)
    rows = []
    add = engine._prefill.add
    engine._prefill.add = lambda ids, score=None: rows.append(score) or add(ids, score)
    got = [e for e in _engine_run(engine, jobs()) if isinstance(e, Finish)]
    assert rows == [None, 2, 3]  # the plain prompt's prefill, and one per scoring
    shared, drafts = drafts, {}
    alone = []
    drafted = accepted = 0
    for job in jobs():
        one = Engine(model, tok, prefill_chunk=8, speculative=speculative)
        alone += [e for e in _engine_run(one, [job]) if isinstance(e, Finish)]
        drafted, accepted = drafted + one.drafted, accepted + one.accepted
    assert shared.keys() == drafts.keys() == (set(range(len(params))) if speculative else set())
    for i, want in drafts.items():
        assert len(shared[i]) == len(want)
        for a, b in zip(shared[i], want):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert sorted(got, key=lambda e: e.index) == alone
    assert len({e.text for e in alone[1:4]}) > 1  # the seeds drew different texts
    assert alone[4].logprobs[: len(ids)] == alone[5].logprobs[: len(ids)] and alone[4].logprobs[1].top
    assert (engine.drafted, engine.accepted) == (drafted, accepted) and (accepted > 0) == speculative


def test_a_shared_prefill_keeps_its_row_until_its_last_choice_is_cancelled_and_respects_the_share(loaded):
    """Cancelling some of the choices that share a prefill row keeps the row for the others; cancelling
    the last frees it. A client's share of the slots bounds how many choices take one row: the rest
    wait in the queue (and share a row of their own later)."""
    model, tok = loaded
    ids = tok.encode("a dog ran to the red ball")
    jobs = [Job(i, ids, JobParams(max_tokens=3, temperature=0), lambda e: None) for i in range(3)]
    engine = Engine(model, tok, max_active=4, prefill_chunk=4, prefill_rows=2)
    engine.submit(jobs)
    with torch.no_grad():
        engine._step()  # all three admitted into one row, 4 of the prompt's tokens prefilled
        assert len(engine._prefilling) == 1 and len(_prefilling(engine)) == 3 and engine._prefill.free == 1
        jobs[0].cancelled.set()
        engine._step()
        assert [s.job.index for s in _prefilling(engine)] == [1, 2] and engine._prefill.free == 1
        jobs[1].cancelled.set()
        jobs[2].cancelled.set()
        engine._step()
        assert not engine._prefilling and engine._prefill.free == 2 and engine.active_jobs == 0
    engine.close()

    engine = Engine(model, tok, max_active=8, max_active_per_client=3)
    engine.submit([Job(i, ids, JobParams(max_tokens=3, temperature=0), lambda e: None) for i in range(5)])
    engine._admit()
    assert [s.job.index for s in _prefilling(engine)] == [0, 1, 2] and engine.queued_jobs == 2
    engine.close()


def test_shared_prefills_count_every_choice_against_the_slots_the_share_and_the_queue(loaded):
    """Choices sharing a row each count as a slot taken (room), against their client's share with the
    slots it already holds, and in the queue's count, a cancelled one among them included."""
    model, tok = loaded
    params = JobParams(max_tokens=4, temperature=0)

    def jobs(client: str, k: int, prompt: str = "the cat") -> list[Job]:
        return [Job(i, tok.encode(prompt), params, lambda e: None, client=client) for i in range(k)]

    engine = Engine(model, tok, max_active=4)
    engine.submit(jobs("a", 3))
    engine.submit(jobs("b", 3))
    engine._admit()
    assert [s.job.client for s in _prefilling(engine)] == ["a"] * 3 + ["b"]
    assert len(engine._prefilling) == 2 and engine.queued_jobs == 2
    engine.close()

    engine = Engine(model, tok, max_active=8, max_active_per_client=3)
    engine.submit(jobs("a", 1, "a dog"))
    with torch.no_grad():
        engine._step()  # prefilled and decoding: a holds one slot
    assert len(engine._running) == 1
    engine.submit(jobs("a", 4))
    engine._admit()
    assert len(_prefilling(engine)) == 2 and engine.queued_jobs == 2
    engine.close()

    engine = Engine(model, tok, max_active=8)
    waiting = jobs("a", 3)
    engine.submit(waiting)
    waiting[1].cancelled.set()  # after the step's sweep of cancelled jobs: met by the admission itself
    engine._admit()
    assert [s.job.index for s in _prefilling(engine)] == [0, 2] and engine.queued_jobs == 0
    engine.close()


def test_every_choice_of_a_shared_prefill_hears_of_its_failure(monkeypatch):
    """A failed prefill, a failed first draft and a failure while a group is admitted each reach every
    choice they concern (one Failure each), the other prompts' choices finishing."""
    model, tok = _mtp_model()
    params = JobParams(max_tokens=4, temperature=0)

    def jobs() -> list[Job]:
        two = [tok.encode("the cat"), tok.encode("a dog ran")]
        return [Job(2 * i + j, ids, params, lambda e: None) for i, ids in enumerate(two) for j in range(2)]

    def failures(engine: Engine) -> list[int]:
        return sorted(e.index for e in _engine_run(engine, jobs(), timeout=60) if isinstance(e, Failure))

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    engine = Engine(model, tok)
    monkeypatch.setattr(engine._prefill, "step", boom)
    assert failures(engine) == [0, 1, 2, 3]
    engine = Engine(model, tok, speculative=True)
    monkeypatch.setattr(engine._prefill, "first_draft", boom)
    assert failures(engine) == [0, 1, 2, 3]
    engine = Engine(model, tok, speculative=True)
    first_draft, calls = engine._prefill.first_draft, []

    def once(rows, tokens):  # the first wave (a choice of each prompt) fails, the second joins
        calls.append(len(rows))
        return boom() if len(calls) == 1 else first_draft(rows, tokens)

    monkeypatch.setattr(engine._prefill, "first_draft", once)
    assert failures(engine) == [0, 2] and calls == [2, 2]

    import minimoe.serve.engine as engine_module

    sampled = JobParams(max_tokens=4, temperature=1.0, seed=1)
    monkeypatch.setattr(engine_module, "make_generator", boom)
    engine = Engine(model, tok)
    got = _engine_run(engine, [Job(i, tok.encode("the cat"), sampled, lambda e: None) for i in range(3)] + [
        Job(3, tok.encode("the cat"), params, lambda e: None, client="b")], timeout=60)  # fmt: skip
    assert sorted(e.index for e in got if isinstance(e, Failure)) == [0, 1, 2]
    assert [e.index for e in got if isinstance(e, Finish)] == [3]


def test_a_closed_admission_refuses_with_503_and_hands_back_what_waited():
    from minimoe.serve.admission import Admission
    from minimoe.serve.jobs import QueueFull

    admission = Admission(max_queued=4, max_queued_per_client=2)
    waiting = [Job(i, [1], JobParams(max_tokens=1), lambda e: None) for i in range(2)]
    admission.submit(waiting, free=0, slots=1)
    with pytest.raises(QueueFull, match="this client's limit of 2 waiting completions"):
        admission.submit(waiting[:1], free=0, slots=1)
    with pytest.raises(QueueFull, match="this client's limit of 2 waiting completions"):
        admission.check("", 1, free=0, slots=1)
    admission.check("", 1, free=1, slots=1)  # a free slot: it would not wait
    assert admission.close() == waiting and admission.queued == 0
    with pytest.raises(QueueFull, match="shutting down") as e:
        admission.submit(waiting[:1], free=8, slots=1)
    assert e.value.status == 503


def test_engine_speculative_sampling_draws_what_the_library_draws():
    """A seeded sampled row of the speculative engine verifies its draft, draws its bonus token from the
    logits after the draft and drafts from its last committed position, consuming its generator in the
    library's order (`speculative_tokens`): the same tokens, up to the last one (the library samples
    that one without a draft). The random model accepts some drafts and rejects others."""
    from minimoe.infer.generate import generate_tokens

    model, tok = _mtp_model()
    specs = [("on a mat", JobParams(max_tokens=16, temperature=0.9, top_k=20, seed=3)),
             ("dog", JobParams(max_tokens=12, temperature=1.0, seed=4)),
             ("the cat", JobParams(max_tokens=30, temperature=0.7, top_p=0.9, seed=11))]  # fmt: skip
    accepted = 0
    for prompt, p in specs:
        ids = tok.encode(prompt)
        want = list(generate_tokens(
            model, ids, p.max_tokens, p.temperature, p.top_k, p.top_p, p.seed, (tok.eos_id,), speculative=True
        ))  # fmt: skip
        engine, got = Engine(model, tok, speculative=True), []
        engine._emit = lambda seq, t, *lp, got=got, emit=engine._emit: got.append(t) or emit(seq, t, *lp)
        _engine_run(engine, [Job(0, ids, p, lambda e: None)])
        got = got[:-1] if got[-1] == tok.eos_id else got
        assert len(got) == len(want) and got[:-1] == want[:-1], prompt
        accepted += engine.accepted
    assert accepted >= 5


def test_engine_logprobs_come_from_the_logits_that_chose_each_token():
    """In the batching engine each token's logprob entry is read from the logits it was chosen from: the
    prefill's for the first token, the decode step's after, and in a speculative step the verify
    forward's first position for a draft or corrected token and its second for the bonus token. Checked
    against one plain forward over each finished sequence, for greedy and seeded sampled rows batched
    together, plain and speculative; a job that asks for none gets none, and max_tokens 0 an empty list. A
    streamed job gets the same entries in its deltas and none kept for its Finish."""
    model, tok = _mtp_model()
    specs = [("the cat", JobParams(max_tokens=14, temperature=0, logprobs=3)),
             ("a dog ran", JobParams(max_tokens=10, temperature=0.9, top_k=20, seed=3, logprobs=0)),
             ("r", JobParams(max_tokens=12, temperature=1.0, seed=4, logprobs=5)),
             ("on a mat", JobParams(max_tokens=6, temperature=0)),
             ("x", JobParams(max_tokens=0, logprobs=2)),
             ("the cat", JobParams(max_tokens=14, temperature=0, logprobs=3, streamed=True))]  # fmt: skip
    for speculative in (False, True):
        engine = Engine(model, tok, prefill_chunk=3, speculative=speculative)
        jobs = [Job(i, tok.encode(p), params, lambda e: None) for i, (p, params) in enumerate(specs)]
        events = _engine_run(engine, jobs)
        finishes = {e.index: e for e in events if isinstance(e, Finish)}
        assert finishes[3].logprobs is None and finishes[4].logprobs == ()
        streamed = [lp for e in events if isinstance(e, Delta) and e.index == 0 for lp in e.logprobs]
        assert tuple(streamed) == finishes[0].logprobs
        as_streamed = [lp for e in events if isinstance(e, Delta) and e.index == 5 for lp in e.logprobs]
        assert tuple(as_streamed) == finishes[0].logprobs and finishes[5].logprobs == ()
        for i in range(3):
            f, k = finishes[i], specs[i][1].logprobs
            out = [e.token for e in f.logprobs]
            assert len(out) == f.completion_tokens and tok.decode(out) == f.text
            want = _model_logprobs(model, tok.encode(specs[i][0]) + out, len(out))
            got = torch.tensor([e.logprob for e in f.logprobs], dtype=torch.float64)
            torch.testing.assert_close(got, want.gather(1, torch.tensor(out)[:, None])[:, 0])
            assert [[t for t, _ in e.top] for e in f.logprobs] == want.topk(k).indices.tolist()
            assert [e.offset for e in f.logprobs] == [len(tok.decode(out[:j])) for j in range(len(out))]
        if speculative:
            assert 0 < engine.accepted < engine.drafted  # both kinds of verify step were read


def test_engine_scores_prompts_across_prefill_chunks():
    """A job with `prompt_logprobs` gets its prompt's entries first: the first token without a logprob,
    each other one's read from the prefill chunk whose logits predicted it (prompts of 1 to 17 tokens in
    chunks of 3, prefilled together, a two-byte character split across entries), offsets in the prompt's
    text, then the completion's entries with offsets after it; at max_tokens 0 the prompt's alone. The
    entries go out in a delta before the first token's. Plain and speculative, against one forward."""
    model, tok = _mtp_model()
    prompts = ["the café by the sea", "r", "a dog ran", "ok", "a cat"]
    budgets = [4, 3, 0, 2, 3]
    for speculative in (False, True):
        engine = Engine(model, tok, prefill_chunk=3, speculative=speculative)
        jobs = [Job(i, tok.encode(p), JobParams(max_tokens=m, temperature=0, logprobs=2, prompt_logprobs=i != 3),
                    lambda e: None) for i, (p, m) in enumerate(zip(prompts, budgets))]  # fmt: skip
        # prompt_logprobs alone: no entries
        jobs[4] = replace(jobs[4], params=replace(jobs[4].params, logprobs=None))
        events = _engine_run(engine, jobs)
        finishes = {e.index: e for e in events if isinstance(e, Finish)}
        assert finishes[4].logprobs is None and finishes[4].completion_tokens == 3
        for i, (prompt, m) in enumerate(zip(prompts[:4], budgets)):
            ids, f = tok.encode(prompt), finishes[i]
            n = len(ids) if i != 3 else 0
            out = [e.token for e in f.logprobs[n:]]
            assert f.completion_tokens == len(out) <= m and [e.token for e in f.logprobs[:n]] == ids[:n]
            whole = ids + out
            want = _model_logprobs(model, whole, len(whole) - 1)[-(n - 1 + len(out)) :] if n else None
            if n:
                assert f.logprobs[0].logprob is None and f.logprobs[0].top is None
                got = torch.tensor([e.logprob for e in f.logprobs[1:]], dtype=torch.float64)
                torch.testing.assert_close(got, want.gather(1, torch.tensor(whole[1:])[:, None])[:, 0])
                assert [[t for t, _ in e.top] for e in f.logprobs[1:]] == want.topk(2).indices.tolist()
                offsets = [len(tok.decode(ids[:j])) for j in range(n)]
                offsets += [len(tok.decode(ids)) + len(tok.decode(out[:j])) for j in range(len(out))]
                assert [e.offset for e in f.logprobs] == offsets
                first = next(e for e in events if isinstance(e, Delta) and e.index == i)
                assert first.text == "" and first.logprobs == f.logprobs[:n]
            else:
                assert [e.offset for e in f.logprobs] == [len(tok.decode(out[:j])) for j in range(len(out))]


def test_token_bytes_add_up_to_the_text_for_every_kind_of_tokenizer(tmp_path):
    """`Tokenizer.token_bytes`, what logprobs report per token: the byte kind's id is its byte (half a
    character stays half: its string is written `bytes:\\xNN`), special tokens are their strings, a
    byte-level BPE's tokens map back through GPT-2's alphabet, and another decoder's tokens give its text."""
    from test_infer import context_tokenizers, text_after
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    from minimoe.data.tokenizer import Tokenizer, train_bpe
    from minimoe.serve.jobs import Logprob
    from minimoe.serve.logprobs import chat_logprobs, completion_logprobs, token_string

    byte = Tokenizer.byte()
    text = "café – naïve 日本 <|endoftext|>"  # the BPE below never saw 日本: its bytes stay apart
    assert b"".join(byte.token_bytes(i) for i in byte.encode(text)) == text.encode()
    assert byte.token_bytes(0xE2) == b"\xe2" and token_string(b"\xe2\x80") == "bytes:\\xe2\\x80"
    assert token_string("é".encode()) == "é"
    entries = tuple(Logprob(t, -1.0, ((t, -1.0),), j) for j, t in enumerate(byte.encode("é!")))
    chat = chat_logprobs(entries, byte)["content"]
    assert [c["bytes"] for c in chat] == [[0xC3], [0xA9], [0x21]] and [
        c["top_logprobs"][0]["bytes"] for c in chat
    ] == [[0xC3], [0xA9], [0x21]]
    assert [c["token"] for c in chat] == ["bytes:\\xc3", "bytes:\\xa9", "!"]
    assert completion_logprobs(entries, byte)["tokens"] == ["bytes:\\xc3", "bytes:\\xa9", "!"]
    bpe = train_bpe(iter(["café naïve costs 5€ – the cat sat on a mat"] * 50), vocab_size=300)
    assert b"".join(bpe.token_bytes(i) for i in bpe.encode(text)) == text.encode()
    words = HFTokenizer(models.WordLevel({"hello": 0, "world": 1, "[UNK]": 2}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.add_special_tokens(["<eos>"])
    (tmp_path / "tokenizer.json").write_text(words.to_str())
    wl = Tokenizer.load(tmp_path / "tokenizer.json")
    # a decoder that joins tokens with spaces: each adds its space inside a text
    assert [wl.token_bytes(i) for i in wl.encode("hello world")] == [b" hello", b" world"]
    assert wl.token_bytes(wl.eos_id) == b"<eos>"
    # SentencePiece (Metaspace) and WordPiece: a completion's token strings add up to its text, the
    # space before a word included (alone, "▁there" decodes to "there", and "hi" as WordPiece's too)
    for name, tok in context_tokenizers().items():
        prompt, new = tok.encode("hello"), tok.encode("hi there, bye!")
        got = b"".join(tok.token_bytes(i) for i in new).decode()
        assert got == text_after(tok.decode, prompt, new) == " hi there, bye!", name
    # SentencePiece's byte fallback: a character outside the vocabulary as its UTF-8 bytes, one per token
    fallback = HFTokenizer(
        models.BPE(
            {"<unk>": 0, "▁": 1, **{f"<0x{b:02X}>": 2 + b for b in range(256)}}, [], byte_fallback=True
        )
    )
    fallback.pre_tokenizer = pre_tokenizers.Metaspace()
    fallback.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    fallback.add_special_tokens(["<eos>"])
    (tmp_path / "tokenizer.json").write_text(fallback.to_str())
    fb = Tokenizer.load(tmp_path / "tokenizer.json")
    ids = fb.encode("日")
    assert [fb.token_bytes(i) for i in ids] == [b" ", b"\xe6", b"\x97", b"\xa5"], [
        fb.id_to_token(i) for i in ids
    ]


def test_engine_with_the_static_decode_step_equals_eager():
    """Engine(compile=True) decodes through the fixed-shape step (traced here with torch.compile's
    "eager" backend, which checks it is one graph without compiling C++; the inductor compilation is
    the slow test in test_infer.py): the same texts as the eager engine."""
    from minimoe.infer.static import StaticDecode

    model, tok = _mtp_model()
    specs = [("the cat", 14), ("a dog ran to the red ball", 9), ("r", 12)]
    jobs = lambda: [Job(i, tok.encode(p), JobParams(max_tokens=m, temperature=0), lambda e: None)  # noqa: E731
                    for i, (p, m) in enumerate(specs)]  # fmt: skip
    want = _texts(_engine_run(Engine(model, tok, max_active=2, prefill_chunk=3), jobs()))
    engine = Engine(model, tok, max_active=2, prefill_chunk=3, compile=True)
    torch._dynamo.reset()
    engine.static = StaticDecode(engine.pool, backend="eager")
    assert engine.warm_up() > 0
    rows = []  # the rows each compiled step ran: its row bucket
    forward = engine.static._forward_fn
    engine.static._forward_fn = lambda tokens, pos, L: rows.append(len(tokens)) or forward(tokens, pos, L)
    assert _texts(_engine_run(engine, jobs())) == want
    assert len(rows) > 10 and set(rows) == {1, 2}  # two jobs at a time, then the last one alone


def test_engine_warms_up_on_its_worker_thread_and_reports_failures():
    """`Engine.warm_up` runs the compile on the worker thread (the one that decodes: CUDA graphs are
    recorded per thread), starting it if needed; a failure is raised in the caller, and after
    shutdown warm_up refuses with one sentence."""
    from minimoe.errors import MinimoeError
    from minimoe.infer.static import StaticDecode

    model, tok = _mtp_model()
    engine = Engine(model, tok, max_active=2, compile=True)
    engine.static = StaticDecode(engine.pool, backend="eager")
    threads = []
    real = engine.static.warm_up
    engine.static.warm_up = lambda: threads.append(threading.current_thread().name) or real()
    assert engine.warm_up() > 0 and threads == ["minimoe-engine"]

    def broken():
        raise RuntimeError("no compiler")

    engine.static.warm_up = broken
    with pytest.raises(RuntimeError, match="no compiler"):
        engine.warm_up()
    engine.close()
    with pytest.raises(MinimoeError, match="shut down"):
        engine.warm_up()


def test_engine_speculative_through_the_static_step_equals_the_eager_speculative_engine():
    """Engine(speculative=True, compile=True): the one-call greedy step (`speculate`), and the
    two-token verify forward and the MTP draft of steps with a sampled row, run at fixed shapes (traced
    with the "eager" backend, one graph each); greedy and seeded sampled rows get the same texts, and
    the same drafts are accepted, as in the eager speculative engine."""
    from minimoe.infer.static import StaticDecode

    model, tok = _mtp_model()
    specs = [("the cat", JobParams(max_tokens=20, temperature=0)),
             ("a dog ran to the red ball", JobParams(max_tokens=12, temperature=0)),
             ("on a mat", JobParams(max_tokens=16, temperature=0.9, top_k=20, seed=3))]  # fmt: skip
    jobs = lambda: [Job(i, tok.encode(p), params, lambda e: None) for i, (p, params) in enumerate(specs)]  # noqa: E731
    eager = Engine(model, tok, max_active=3, prefill_chunk=3, speculative=True)
    want = _texts(_engine_run(eager, jobs()))
    engine = Engine(model, tok, max_active=3, prefill_chunk=3, speculative=True, compile=True)
    torch._dynamo.reset()
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    engine.static = StaticDecode(engine.pool, backend=counter)
    assert engine.warm_up() > 0
    calls = {"speculate": 0, "forward": 0}
    for name in calls:
        real = getattr(engine.static, name)

        def counted(*args, name=name, real=real):
            calls[name] += 1
            return real(*args)

        setattr(engine.static, name, counted)
    assert _texts(_engine_run(engine, jobs())) == want
    assert (engine.drafted, engine.accepted) == (eager.drafted, eager.accepted) and engine.accepted > 0
    # steps with the sampled row take forward + draft; once it has finished, the greedy rows' steps
    # are one call each
    assert calls["forward"] > 0 and calls["speculate"] > 0
    # the verify forward, the one-call step and the draft, each compiled once per pair of row and
    # position buckets, all at warm_up (three slots: buckets of 1 and 3 rows, both used as jobs finish)
    assert engine.static.row_buckets == [1, 3]
    assert counter.frame_count == 3 * len(engine.static.buckets) * 2


def test_compiled_engines_build_more_graphs_than_dynamos_default_limit_on_their_workers():
    """Dynamo's config is per thread, and an engine compiles on its worker thread: engines of 1 and 8
    slots over a 256-position context (position buckets 16, 64 and 256; row buckets 1, then 1 and 8:
    nine graphs of the step's forward in the process, past dynamo's default limit of 8, which
    fullgraph=True makes an error) all warm up and decode what the eager engine does. (The speculative
    engine's warm-up on its worker, three graphs per pair of buckets, has a test of its own.)"""
    from minimoe.infer.static import StaticDecode

    model, tok = _mtp_model(context=256)
    jobs = lambda: [Job(0, tok.encode("the cat"), JobParams(max_tokens=12, temperature=0), lambda e: None)]  # noqa: E731
    want = _texts(_engine_run(Engine(model, tok, max_active=1), jobs()))
    torch._dynamo.reset()
    graphs = 0
    for slots in (1, 8):
        engine = Engine(model, tok, max_active=slots, compile=True)
        engine.static = StaticDecode(engine.pool, backend="eager")
        engine.warm_up()
        graphs += len(engine.static.buckets) * len(engine.static.row_buckets)
        assert _texts(_engine_run(engine, jobs())) == want
    assert graphs == 9
    torch._dynamo.reset()


def test_engine_samples_what_the_library_samples_with_the_same_parameters(loaded):
    """Against `generate_tokens`, not against the engine itself: seed, temperature, top_k and top_p
    reach the sampler as given, and a prompt longer than the context is cut as the library cuts it."""
    from minimoe.infer.generate import generate_tokens

    model, tok = loaded
    long_prompt = tok.encode("the cat sat on a mat and the dog ran to the red ball " * 6)
    assert len(long_prompt) > CONTEXT
    specs = [
        (tok.encode("on a mat"), dict(temperature=0.8, top_k=5, top_p=0.9, seed=9), 16),
        (tok.encode("red"), dict(temperature=1.5, top_k=2, top_p=1.0, seed=4), 16),
        (tok.encode("the"), dict(temperature=1.0, top_k=0, top_p=0.5, seed=123), 16),
        (long_prompt, dict(temperature=0, top_k=0, top_p=1.0, seed=None), 8),
    ]
    for i, (ids, kw, n) in enumerate(specs):
        want = tok.decode(list(generate_tokens(model, ids, n, stop_ids=(tok.eos_id,), **kw)))
        job = Job(i, ids, JobParams(max_tokens=n, **kw), lambda e: None)
        assert _texts(_engine_run(Engine(model, tok), [job]))[i] == want, (i, kw)


def test_engine_zero_token_job_holds_no_slot(loaded):
    """A max_tokens=0 job finishes at admission; it does not count against its client's slot cap,
    so the client's next job is admitted in the same pass."""
    model, tok = loaded
    zero, some = JobParams(max_tokens=0, temperature=0), JobParams(max_tokens=4, temperature=0)
    jobs = [Job(0, tok.encode("the"), zero, lambda e: None, client="a")]
    jobs.append(Job(1, tok.encode("the"), some, lambda e: None, client="a"))
    engine = Engine(model, tok, max_active=2, max_active_per_client=1)
    engine.submit(jobs)
    engine._admit()
    assert [s.job.index for s in _prefilling(engine)] == [1]


def test_engine_takes_clients_in_turn_cancels_within_a_step_and_bounds_its_queue(loaded):
    from minimoe.serve.engine import QueueFull

    model, tok = loaded
    params = JobParams(max_tokens=4, temperature=0)
    a = [Job(i, tok.encode("the"), params, lambda e: None, client="a") for i in range(3)]
    b = [Job(3, tok.encode("red"), params, lambda e: None, client="b")]
    # one slot: client b's job goes second, not behind all of a's
    events = _engine_run(Engine(model, tok, max_active=1), a + b)
    assert [e.index for e in events if isinstance(e, Finish)] == [0, 3, 1, 2]
    # one request as large as the pool: by default its client holds all but an eighth of the slots,
    # so another client's request starts at once instead of after the whole generation
    many = JobParams(max_tokens=24, temperature=0)
    a = [Job(i, tok.encode("the"), many, lambda e: None, client="a") for i in range(8)]
    b = [Job(8, tok.encode("red"), JobParams(max_tokens=2, temperature=0), lambda e: None, client="b")]
    for cap, b_first in ((None, True), (8, False)):
        finished: list[int] = []
        running, done = threading.Event(), threading.Event()

        def post(e, finished=finished, running=running, done=done):
            running.set()
            if isinstance(e, Finish):
                finished.append(e.index)
                if len(finished) == 9:
                    done.set()

        for job in a + b:
            job.post = post
        engine = Engine(model, tok, max_active=8, max_active_per_client=cap)
        engine.submit(a)
        engine.start()
        try:
            assert running.wait(60)  # a's sequences are decoding when b arrives
            engine.submit(b)
            assert done.wait(120)
        finally:
            engine.close()
        assert sorted(finished) == list(range(9))
        assert (finished[0] == 8) == b_first and (finished[-1] == 8) != b_first, (cap, finished)

    long = JobParams(max_tokens=60, temperature=0)
    jobs = [Job(i, tok.encode("the cat"), long, lambda e: None) for i in range(2)]

    def cancel_after_three(e):
        if isinstance(e, Delta) and sum(isinstance(x, Delta) and x.index == 0 for x in seen) == 3:
            jobs[0].cancelled.set()  # the client went away after three pieces of text

    seen: list = []
    jobs[0].post = lambda e: (seen.append(e), cancel_after_three(e))
    engine = Engine(model, tok)
    done = threading.Event()
    jobs[1].post = lambda e: done.set() if isinstance(e, Finish) else None
    engine.submit(jobs)
    engine.start()
    try:
        assert done.wait(120)
    finally:
        engine.close()
    # job 0 was dropped at the step after its cancellation: three deltas, no finish
    assert sum(isinstance(e, Delta) for e in seen) == 3 and not any(isinstance(e, Finish) for e in seen)

    # a bounded queue: 2 waiting jobs beyond the free slot, at most 1 per client
    engine = Engine(model, tok, max_active=1, max_queued=2, max_queued_per_client=1)
    job = lambda client: Job(0, [1], params, lambda e: None, client=client)  # noqa: E731
    engine.submit([job("a"), job("a")])  # one takes the free slot, one waits
    with pytest.raises(QueueFull, match="this client's limit of 1 waiting completions") as e:
        engine.submit([job("a")])
    assert e.value.retry_after >= 1
    with pytest.raises(
        QueueFull, match=r"limit of 1 waiting completions \(2 waiting now, 1 more asked for\)"
    ):
        engine.check_room("a", 1)  # the same answer, asked before a request's prompts are tokenized
    engine.check_room("a", 0)
    engine.check_room("b", 1)
    engine.submit([job("b")])
    with pytest.raises(QueueFull, match="completions are waiting"):
        engine.check_room("c", 1)
    with pytest.raises(QueueFull, match="completions are waiting"):
        engine.submit([job("c")])
    engine.shutdown()
    with pytest.raises(QueueFull, match="shutting down"):
        engine.submit([job("d")])
    with pytest.raises(QueueFull, match="shutting down"):
        engine.check_room("d", 0)


def test_engine_end_of_text_finishes_with_stop_and_queue_limits_default_to_half(loaded):
    """A sampled end-of-text token ends the choice with "stop" (not counted as a completion token);
    a client may hold half the queue by default, and a refused submit always asks for a retry after
    at least one second."""
    from types import SimpleNamespace

    from minimoe.serve.engine import QueueFull

    model, tok = loaded
    params = JobParams(max_tokens=8, temperature=1.0, seed=3)
    (finish,) = [
        e
        for e in _engine_run(Engine(model, tok), [Job(0, tok.encode("the"), params, lambda e: None)])
        if isinstance(e, Finish)
    ]
    ids = tok.encode(finish.text)
    k = next(k for k in range(1, len(ids)) if ids[k] not in ids[:k])  # a token not generated before
    engine = Engine(model, tok)  # seeded: the same tokens again, the k-th now as end-of-text
    engine.tokenizer = SimpleNamespace(decode=tok.decode, eos_id=ids[k])
    (eos,) = [
        e
        for e in _engine_run(engine, [Job(0, tok.encode("the"), params, lambda e: None)])
        if isinstance(e, Finish)
    ]
    assert (eos.reason, eos.completion_tokens, eos.text) == ("stop", k, tok.decode(ids[:k]))

    job = lambda client: Job(0, [1], params, lambda e: None, client=client)  # noqa: E731
    engine = Engine(model, tok, max_active=1, max_queued=4)
    engine.submit([job("a"), job("a"), job("a")])  # one for the free slot, two waiting: half of 4
    with pytest.raises(QueueFull, match="this client's limit"):
        engine.submit([job("a")])
    engine.submit([job("b")])
    engine = Engine(model, tok, max_active=1, max_queued=100, max_queued_per_client=1)
    with pytest.raises(QueueFull, match="this client's limit of 1 waiting completions") as e:
        engine.submit([job("a") for _ in range(3)])  # nothing waits yet, and this is still too many
    assert e.value.retry_after >= 1
    engine.close()


def test_engine_admission_caps_a_clients_slots_across_passes_and_bounds_prefill_rows(loaded):
    """A client's share of the slots counts its prompts still being prefilled, so a later admission
    pass gives it no more; by default a client holds all but an eighth of the slots (14 of 16); and
    prefill rows are never more than the positions prefilled per step, nor prompts admitted than the
    decode slots left for them."""
    model, tok = loaded
    params = JobParams(max_tokens=4, temperature=0)

    def jobs(client: str, k: int) -> list[Job]:
        return [Job(i, tok.encode("the"), params, lambda e: None, client=client) for i in range(k)]

    engine = Engine(model, tok, max_active=4, prefill_rows=2, max_active_per_client=1)
    engine.submit(jobs("a", 2))
    engine._admit()
    engine._admit()  # a's first prompt is still prefilling: it holds a's one slot
    assert len(_prefilling(engine)) == 1 and engine.queued_jobs == 1
    engine.submit(jobs("b", 1))
    engine._admit()
    assert sorted(s.job.client for s in _prefilling(engine)) == ["a", "b"]
    engine.close()

    engine = Engine(model, tok, max_active=16, prefill_rows=16)
    assert engine.max_active_per_client == 14
    engine.submit(jobs("a", 16))
    engine._admit()
    assert len(_prefilling(engine)) == 14 and engine.queued_jobs == 2
    assert len(engine._prefilling) == 1  # one prompt: one prefill row for all 14
    engine.close()

    assert Engine(model, tok, max_active=8, prefill_chunk=2, prefill_rows=8)._prefill.rows == 2

    # prompts being prefilled hold decode slots too: with one of two slots decoding, one more is admitted
    engine = Engine(model, tok, max_active=2, prefill_rows=2)
    engine.submit(jobs("a", 1))
    with torch.no_grad():
        engine._step()  # admitted, prefilled and decoding
    assert len(engine._running) == 1 and not engine._prefilling
    engine.submit(jobs("b", 2))
    engine._admit()
    assert len(_prefilling(engine)) == 1 and engine.queued_jobs == 1
    engine.close()


def test_a_job_cancelled_before_its_admission_takes_no_slot(loaded):
    """A waiting job cancelled after the step dropped the cancelled ones is skipped at admission: the
    next live job takes the slot, and the queue's count has both gone."""
    model, tok = loaded
    params = JobParams(max_tokens=4, temperature=0)
    jobs = [Job(i, tok.encode("the"), params, lambda e: None, client="a") for i in range(2)]
    engine = Engine(model, tok, max_active=1)
    engine.submit(jobs)
    jobs[0].cancelled.set()
    engine._admit()
    assert [s.job.index for s in _prefilling(engine)] == [1] and engine.queued_jobs == 0
    engine.close()


def test_engine_queue_cap_counts_only_the_slots_still_free(loaded):
    """A submit may go beyond max_queued by the slots that are free (their jobs will not wait), not
    by the slots already taken: with the only slot held, one job may wait and the next is refused."""
    from minimoe.serve.engine import QueueFull

    model, tok = loaded
    params = JobParams(max_tokens=4, temperature=0)
    job = lambda client: Job(0, [1], params, lambda e: None, client=client)  # noqa: E731
    engine = Engine(model, tok, max_active=1, max_queued=1, max_queued_per_client=1)
    engine.submit([job("a")])
    engine._admit()  # a holds the slot
    assert engine.active_jobs == 1 and engine.queued_jobs == 0
    engine.submit([job("b")])
    with pytest.raises(QueueFull, match="completions are waiting"):
        engine.submit([job("c")])
    engine.close()


def test_engine_shutdown_fails_the_queued_jobs_and_empties_the_count(loaded):
    """A worker stopped before its first step fails every waiting job with one 503 Failure, and the
    queue's count drops to zero with them."""
    model, tok = loaded
    params = JobParams(max_tokens=4, temperature=0)
    failed: list = []
    engine = Engine(model, tok, max_active=1)
    engine.submit([Job(i, [1, 2], params, failed.append, client="a") for i in range(3)])
    assert engine.queued_jobs == 3
    engine.shutdown()
    engine.start()
    engine.close()
    assert engine.queued_jobs == 0
    assert sorted(e.index for e in failed) == [0, 1, 2]
    assert all(isinstance(e, Failure) and e.status == 503 for e in failed)


def test_cancelled_queued_jobs_give_their_places_in_the_queue_back(loaded):
    """Jobs cancelled while waiting leave the queue's count with them: the engine goes idle, and
    the queue takes as many jobs again as before."""
    model, tok = loaded
    params = JobParams(max_tokens=2, temperature=0)
    engine = Engine(model, tok, max_active=1, max_queued=3, max_queued_per_client=3)

    def jobs(client: str, k: int) -> list[Job]:
        return [Job(i, [1, 2], params, lambda e: None, client=client) for i in range(k)]

    for round_ in range(2):
        waiting = jobs("a", 2) + jobs("b", 2)  # one takes the free slot, three wait
        engine.submit(waiting[:2])
        engine.submit(waiting[2:])
        assert engine.queued_jobs == 4
        for job in waiting:
            job.cancelled.set()
        with torch.no_grad():
            engine._step()
        assert engine.queued_jobs == 0 and engine.active_jobs == 0, round_
    engine.close()


def test_engine_start_lets_the_callers_openmp_workers_go(loaded, monkeypatch):
    # the worker thread runs every step from then on; a parked pool of the caller's would make the
    # worker's multi-threaded steps oversubscribed (minimoe.infer.common.release_openmp_threads)
    import threading

    import minimoe.serve.engine as engine_module

    calls = []
    monkeypatch.setattr(engine_module, "release_openmp_threads", lambda: calls.append(threading.get_ident()))
    model, tok = loaded
    engine = Engine(model, tok)
    engine.start()
    engine.start()  # already running: nothing more
    engine.close()
    assert calls == [threading.get_ident()]


def test_engine_frees_prefill_rows_on_cancellation_and_on_a_failed_join(loaded):
    """A prompt cancelled while it is being prefilled gives its row back at the next step; a prompt
    whose join fails after its prefill gets one Failure and its row back, and the others finish.
    Prefill rows are never more than the decode slots."""
    model, tok = loaded
    assert Engine(model, tok, max_active=1)._prefill.rows == 1
    params = JobParams(max_tokens=3, temperature=0)
    engine = Engine(model, tok, max_active=4, prefill_chunk=4, prefill_rows=2)
    prompts = ["a dog ran to the red ball", "a cat sat on the mat by me"]  # two prompts: two rows
    jobs = [Job(i, tok.encode(prompt), params, lambda e: None) for i, prompt in enumerate(prompts)]
    engine.submit(jobs)
    with torch.no_grad():
        engine._step()  # both admitted, 2 of their tokens prefilled each
        assert len(engine._prefilling) == 2 and engine._prefill.free == 0
        jobs[0].cancelled.set()
        engine._step()
        assert len(engine._prefilling) == 1 and engine._prefill.free == 1
    engine.close()

    engine = Engine(model, tok, max_active=4, prefill_chunk=8, prefill_rows=4)
    add = engine.pool.add
    calls = []

    def fail_once(length, src=0):
        calls.append(src)
        if len(calls) == 1:
            raise RuntimeError("no room")
        return add(length, src)

    engine.pool.add = fail_once
    events = []
    done = threading.Event()

    def post(e):
        events.append(e)
        if sum(isinstance(x, (Finish, Failure)) for x in events) == 4:
            done.set()

    engine.submit([Job(i, tok.encode("the cat"), params, post, client=str(i)) for i in range(4)])
    engine.start()
    try:
        assert done.wait(60)
    finally:
        engine.close()
    failures = [e for e in events if isinstance(e, Failure)]
    assert len(failures) == 1 and "no room" in failures[0].message
    assert sum(isinstance(e, Finish) for e in events) == 3
    assert engine._prefill.free == engine._prefill.rows and not engine._prefilling


def test_end_of_turn_is_the_special_token_after_an_assistant_reply():
    """ChatML and Llama 3 close a turn with a token that is not EOS; a template that closes it with
    EOS, or the plain default, adds none."""
    pytest.importorskip("jinja2")
    from minimoe.data.chat_template import SFT_CHAT_TEMPLATE, end_of_turn

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|eot_id|>", "<|start_header_id|>"]
    chatml = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    llama3 = (
        "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}"
        "<|eot_id|>{% endfor %}"
    )
    eos = "<|endoftext|>"
    assert end_of_turn(chatml, specials, eos_token=eos) == "<|im_end|>"
    assert end_of_turn(llama3, specials, eos_token=eos) == "<|eot_id|>"
    assert end_of_turn(SFT_CHAT_TEMPLATE, specials, eos_token=eos) is None  # closes turns with EOS
    assert end_of_turn(None, specials, eos_token=eos) is None
    refusing = "{{ raise_exception('no') }}"
    assert end_of_turn(refusing, specials, eos_token=eos) is None


def test_a_chat_reply_ends_at_the_templates_end_of_turn(loaded, monkeypatch):
    """A template closing turns with a token other than EOS: chat jobs stop at it (finish "stop",
    the token not in the text); plain completions do not get it."""
    pytest.importorskip("jinja2")
    from fastapi.testclient import TestClient

    from minimoe.serve import build_app

    model, tok = loaded
    seeded = JobParams(max_tokens=12, temperature=1.0, seed=3)
    alone = _texts(_engine_run(Engine(model, tok), [Job(0, tok.encode("the cat"), seeded, lambda e: None)]))
    first = tok.encode(alone[0])
    k = next(i for i in range(1, len(first)) if first[i] not in first[:i])  # a token new at position k
    # the engine: a choice whose token at k is a stop id ends after k tokens, the stop token left out
    stop = replace(seeded, stop_ids=(first[k],))
    events = _engine_run(Engine(model, tok), [Job(0, tok.encode("the cat"), stop, lambda e: None)])
    (fin,) = [e for e in events if isinstance(e, Finish)]
    assert (fin.reason, fin.completion_tokens, fin.text) == ("stop", k, tok.decode(first[:k]))
    # the server: chat jobs carry the end of turn (PAD of the byte tokenizer here), completions do not
    tok = type(tok).byte()
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ pad_token }}{% endfor %}"
    )
    submitted: list[Job] = []
    real_submit = Engine.submit
    monkeypatch.setattr(
        Engine, "submit", lambda self, jobs: submitted.extend(jobs) or real_submit(self, jobs)
    )
    with TestClient(build_app(model, tok, "t")) as client:
        chat = {"model": "t", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        assert client.post("/v1/chat/completions", json=chat).status_code == 200
        body = {"model": "t", "prompt": "hi", "max_tokens": 2}
        assert client.post("/v1/completions", json=body).status_code == 200
    assert [j.params.stop_ids for j in submitted] == [(tok.pad_id,), ()]


def test_a_full_queue_is_answered_before_the_prompt_is_tokenized(loaded, monkeypatch):
    """A 429 costs the server no tokenizing or template rendering of the (up to a megabyte) prompt:
    the queue's room is asked first, then the submit decides again."""
    from fastapi.testclient import TestClient

    from minimoe.serve import build_app
    from minimoe.serve.jobs import QueueFull

    model, tok = loaded
    tok = type(tok).byte()
    encoded: list[str] = []
    real_encode = tok.encode
    monkeypatch.setattr(
        tok, "encode", lambda text, *a, **k: encoded.append(text) or real_encode(text, *a, **k)
    )
    asked: list[int] = []

    def full(self, client, count):
        asked.append(count)
        raise QueueFull("The server is busy: 9 completions are waiting, the limit is 9; retry later.", 3)

    monkeypatch.setattr(Engine, "check_room", full)
    with TestClient(build_app(model, tok, "t")) as client:
        for path, body in (
            ("/v1/completions", {"prompt": ["a" * 5000, "b"], "n": 3}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a" * 5000}], "n": 2}),
        ):
            r = client.post(path, json={"model": "t", "max_tokens": 2, **body})
            assert r.status_code == 429 and r.headers["retry-after"] == "3", r.text
            assert r.json()["error"]["type"] == "rate_limit_error"
    assert asked == [6, 2] and encoded == []


def test_one_clients_long_prompts_leave_a_prefill_row_for_others(loaded):
    """Prefill rows are shared like decode slots: one client holds at most all but a quarter of them, so
    a client arriving behind another's long prompts starts its prefill at once, not after them."""
    model, tok = loaded
    engine = Engine(model, tok, max_active=16, prefill_rows=4, prefill_chunk=8)
    assert engine.row_share == 3
    params = JobParams(max_tokens=2)
    long_prompt = tok.encode("x" * 100)
    engine.submit([Job(i, long_prompt + [i], params, lambda e: None, client="a") for i in range(4)])
    engine._admit()
    assert sorted(g[0].job.client for g in engine._prefilling.values()) == ["a", "a", "a"]
    engine.submit([Job(0, tok.encode("hi"), params, lambda e: None, client="b")])
    engine._admit()  # the free row is b's, though a's fourth prompt queued first
    assert sorted(g[0].job.client for g in engine._prefilling.values()) == ["a", "a", "a", "b"]
    assert engine.queued_jobs == 1
    engine.close()


def test_a_streamed_request_keeps_no_logprobs_for_its_finish(loaded, monkeypatch):
    """A streamed choice's logprobs go out with each chunk; its jobs are marked streamed, so the engine
    keeps no list of them for a Finish nobody reads (up to --max-request-tokens entries of 20 alternatives)."""
    from fastapi.testclient import TestClient

    from minimoe.serve import build_app

    model, tok = loaded
    submitted: list[Job] = []
    real_submit = Engine.submit
    monkeypatch.setattr(
        Engine, "submit", lambda self, jobs: submitted.extend(jobs) or real_submit(self, jobs)
    )
    with TestClient(build_app(model, type(tok).byte(), "t")) as client:
        for stream in (True, False):
            body = {"model": "t", "prompt": "hi", "max_tokens": 3, "logprobs": 1, "stream": stream}
            r = client.post("/v1/completions", json=body)
            assert r.status_code == 200 and ("token_logprobs" in r.text), r.text[:300]
    assert [j.params.streamed for j in submitted] == [True, False]


@pytest.mark.parametrize("speculative", [False, True])
def test_an_error_in_one_sequences_text_fails_that_sequence_only(monkeypatch, speculative):
    """A sequence whose text cannot be made (its detokenizer raises, say) gets a Failure; the sequences
    decoded beside it in the same steps finish with what they get alone."""
    from minimoe.infer.text import TextStream

    model, tok = _mtp_model()
    real_push = TextStream.push

    def push(self, token):
        if "BOOM" in self.stop and len(self.ids) >= 2:
            raise ValueError("cannot decode")
        return real_push(self, token)

    specs = [("the cat", JobParams(max_tokens=8, temperature=0)),
             ("a dog", JobParams(max_tokens=8, temperature=0, stop=("BOOM",))),
             ("on a mat", JobParams(max_tokens=8, temperature=1.0, seed=2))]  # fmt: skip
    alone = [_texts(_engine_run(Engine(model, tok, speculative=speculative), [Job(0, tok.encode(p), params, lambda e: None)]))[0]
             for p, params in specs[::2]]  # fmt: skip
    monkeypatch.setattr(TextStream, "push", push)
    engine = Engine(model, tok, speculative=speculative)
    events = _engine_run(
        engine, [Job(i, tok.encode(p), params, lambda e: None) for i, (p, params) in enumerate(specs)]
    )
    failures = [e for e in events if isinstance(e, Failure)]
    assert [f.index for f in failures] == [1] and "cannot decode" in failures[0].message
    texts = _texts(events)
    assert [texts[0], texts[2]] == alone
    assert engine.active_jobs == 0 and engine.pool.n == 0


@pytest.mark.parametrize("speculative", [False, True])
def test_a_sequence_whose_logits_are_not_numbers_fails_alone_and_leaves_a_clean_slot(speculative):
    """A sequence the model breaks on (NaN from its prompt, or from its third token on, here poisoned
    through the embedding, so its cache holds NaN too) gets a Failure naming it; the sequences decoded
    beside it, and the one that takes its cache slot or prefill row afterwards, generate what they
    generate alone (greedy and seeded sampling)."""
    model, tok = _mtp_model()
    poisoned = ord("Z")
    decoding: list[Engine] = []  # the engine in its decode step, while it is in one
    struck: list[bool] = []  # one entry per decode forward that poisoned job 1

    def embed(module, args, out):
        nan = args[0] == poisoned  # a poisoned prompt
        if decoding:  # rows are the running sequences: job 1's from its third token on
            rows = [s.job.index == 1 and s.count >= 2 for s in decoding[0]._running]
            nan = nan | torch.tensor(rows)[:, None]
            struck.extend(filter(None, rows))
        return out.masked_fill(nan[..., None], float("nan"))

    def decode_step(engine: Engine):
        step = engine._decode_speculative if speculative else engine._decode

        def run():
            decoding.append(engine)
            try:
                step()
            finally:
                decoding.clear()

        return run

    def head(module, args, out):
        return out.index_fill(-1, torch.tensor([poisoned]), float("-inf"))  # never generated

    hooks = [model.embed_tokens.register_forward_hook(embed), model.lm_head.register_forward_hook(head)]
    try:
        greedy, sampled = (
            JobParams(max_tokens=10, temperature=0),
            JobParams(max_tokens=10, temperature=1.0, seed=3),
        )
        # the broken two sample: a NaN row left in the batch would fail every row's draw
        specs = [("Z" * 12, sampled), ("a dog", sampled), ("the cat sat", greedy), ("on a mat", sampled)]
        jobs = [
            Job(i, tok.encode(p), params, lambda e: None, client=str(i))
            for i, (p, params) in enumerate(specs)
        ]
        alone = [
            _texts(_engine_run(Engine(model, tok, speculative=speculative), [job]))[job.index]
            for job in jobs[2:]
        ]
        # two slots and one prefill row: the poisoned prompt's row is reused by every later prompt, and
        # job 1's slot by job 2 or 3
        engine = Engine(model, tok, max_active=2, prefill_rows=1, speculative=speculative)
        setattr(engine, "_decode_speculative" if speculative else "_decode", decode_step(engine))
        jobs = [
            Job(i, tok.encode(p), params, lambda e: None, client=str(i))
            for i, (p, params) in enumerate(specs)
        ]
        events = _engine_run(engine, jobs)
    finally:
        for hook in hooks:
            hook.remove()
    failures = sorted((e.index, e.message) for e in events if isinstance(e, Failure))
    assert [i for i, _ in failures] == [0, 1] and all("not a number" in m for _, m in failures), failures
    got = _texts(events)
    assert [got[2], got[3]] == alone and len(set(alone)) == 2
    assert struck  # job 1 failed while decoding, not at its prefill
    assert engine.active_jobs == 0 and engine.pool.n == 0


def test_quarantine_checks_every_tensor_of_a_tuple_in_one_pass():
    """The greedy speculative step checks its verify logits and its next drafts together: a row that is
    not a number in either tensor fails once, and is zeroed in both; the other rows are untouched."""
    from minimoe.serve.rows import quarantine

    class _Seq:
        def __init__(self):
            self.job = self
            self.errors = []

        def fail(self, error):
            self.errors.append(error)

    seqs = [_Seq() for _ in range(3)]
    logits, drafts = torch.randn(3, 2, 5), torch.randn(3, 5)
    drafts[1, 2] = float("nan")
    logits[2, 1, 0] = float("inf")
    keep = logits[0].clone(), drafts[0].clone()
    assert quarantine((logits, drafts), seqs) == {1, 2}
    assert [len(s.errors) for s in seqs] == [0, 1, 1]
    assert not logits[1:].any() and not drafts[1:].any()
    assert torch.equal(logits[0], keep[0]) and torch.equal(drafts[0], keep[1])
    assert quarantine((logits, drafts), seqs, frozenset({1, 2})) == {1, 2}  # clean now: nothing new


def test_a_first_draft_that_is_not_a_number_fails_its_sequence_alone():
    """Speculative: the MTP module's first draft of a sequence (made as it joins the batch) is NaN for
    one sampled sequence; that one fails, the others of its wave finish as they do alone."""
    model, tok = _mtp_model()
    sampled = [JobParams(max_tokens=8, temperature=1.0, seed=s) for s in (1, 2, 3)]
    prompts = ["the cat", "a dog", "on a mat"]

    def jobs():
        return [
            Job(i, tok.encode(p), params, lambda e: None)
            for i, (p, params) in enumerate(zip(prompts, sampled))
        ]

    alone = [_texts(_engine_run(Engine(model, tok, speculative=True), [job]))[job.index] for job in jobs()]
    engine = Engine(model, tok, speculative=True, prefill_rows=3)
    real = engine._prefill.first_draft

    def first_draft(rows, tokens):
        drafts = real(rows, tokens)
        for i, row in enumerate(rows):  # job 1's row
            if any(seq.job.index == 1 for seq in engine._prefilling[row]):
                drafts[i] = float("nan")
        return drafts

    engine._prefill.first_draft = first_draft
    events = _engine_run(engine, jobs())
    failures = [e for e in events if isinstance(e, Failure)]
    assert [f.index for f in failures] == [1] and "not a number" in failures[0].message
    got = _texts(events)
    assert [got[0], got[2]] == [alone[0], alone[2]]
    assert engine.active_jobs == 0 and engine.pool.n == 0


# ---------------------------------------------------------------------- in-process servers


class _InProcess:
    """`build_app(model, tok, "t", **kw)` served by uvicorn on a thread (loopback, a free port)."""

    def __init__(self, model, tok, **kw) -> None:
        from minimoe.cli.serve import listen
        from minimoe.serve import build_app

        self.app = build_app(model, tok, "t", **kw)
        self.sock = listen("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> _InProcess:
        self.thread.start()
        assert _wait(lambda: self.server.started, 60)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=30).json()


def test_a_body_being_parsed_does_not_hold_up_other_clients(loaded, monkeypatch):
    """Parsing and checking a request body (a second for a megabyte of small nodes) happens off the
    event loop: while one body is held mid-parse, /health is answered. On the loop, /health would wait
    for the parse to end (here: for the test to let it go, which it does only afterwards)."""
    import minimoe.serve.app as app_module

    real, entered, release = app_module.parse_json, threading.Event(), threading.Event()

    def slow_parse(raw, cls):
        entered.set()
        release.wait(30)
        return real(raw, cls)

    monkeypatch.setattr(app_module, "parse_json", slow_parse)
    model, tok = loaded
    with _InProcess(model, tok) as srv, ThreadPoolExecutor(1) as pool:
        body = {"model": "t", "prompt": "the", "max_tokens": 2, "temperature": 0}
        posted = pool.submit(httpx.post, f"{srv.url}/v1/completions", json=body, timeout=60)
        assert entered.wait(30)
        try:
            assert httpx.get(f"{srv.url}/health", timeout=20).json()["status"] == "ok"
        finally:
            release.set()
        assert posted.result().status_code == 200


def test_the_unicode_check_walks_a_body_only_when_it_could_hold_a_lone_surrogate(monkeypatch):
    """A lone surrogate is refused whether an escape or its own (surrogatepass-decoded) UTF-8 bytes
    spell it, and in a UTF-16 body too; a body with neither is not walked at all."""
    from minimoe.serve import http
    from minimoe.serve.schemas import APIError, CompletionRequest

    def refused(raw: bytes) -> str | None:
        with pytest.raises(APIError) as e:
            http.parse_json(raw, CompletionRequest)
        return e.value.body()["error"]["param"]

    assert refused(b'{"model": "m", "prompt": ["a", "\\udc00"]}') == "prompt.1"
    assert refused(b'{"model": "m", "prompt": "\xed\xa0\x80"}') == "prompt"
    assert refused('{"model": "m", "prompt": "\\ud800"}'.encode("utf-16-le")) == "prompt"
    assert refused(b'{"model": "m", "prompt": "x", "x": {"\\uDBFF": 1}}') == "x"
    pair = http.parse_json(b'{"model": "m", "prompt": "\\ud83d\\ude00 \\\\ud800"}', CompletionRequest)
    assert pair.prompt == "\U0001f600 \\ud800"  # a pair, and an escaped backslash: both valid

    def walked(value) -> bool:
        raise AssertionError("walked")

    monkeypatch.setattr(http, "_has_bad_text", walked)
    body = {"model": "m", "prompt": [[1, 2]] * 1000, "x": [["\u00e9\\u00e9 \U0001f600"]] * 1000}
    assert http.parse_json(json.dumps(body, ensure_ascii=False).encode(), CompletionRequest).model == "m"


def _recording_log(monkeypatch, module) -> list[tuple[str, bool]]:
    """Replace `module.log` with one that records (line, whether it carried a traceback)."""
    from types import SimpleNamespace

    lines: list[tuple[str, bool]] = []

    def record(traceback: bool):
        return lambda msg, *a, **kw: lines.append((msg % a, traceback and sys.exc_info()[0] is not None))

    fake = SimpleNamespace(info=record(False), error=record(False), exception=record(True))
    monkeypatch.setattr(module, "log", fake, raising=False)
    return lines


def test_a_failing_engine_logs_each_failure_and_health_says_degraded(loaded, monkeypatch):
    """Every failed step is one log line with its traceback; /health counts them and says "degraded"
    after 3 in a row, "ok" again after a step that worked."""
    import minimoe.serve.engine as engine_module

    lines = _recording_log(monkeypatch, engine_module)
    model, tok = loaded
    with _InProcess(model, tok) as srv:
        engine = srv.app.state.service.engine

        def boom(tokens):
            raise RuntimeError("boom")

        engine.pool.decode = boom
        body = {"model": "t", "prompt": "the", "max_tokens": 3, "temperature": 0}
        for i in range(1, 4):
            r = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=60)
            assert r.status_code == 500 and "RuntimeError: boom" in r.json()["error"]["message"]
            health = srv.health()
            assert health["failed_steps"] == i and health["status"] == ("degraded" if i == 3 else "ok")
        assert lines == [("engine: a decode step failed", True)] * 3
        del engine.pool.decode
        r = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        assert srv.health()["status"] == "ok" and srv.health()["failed_steps"] == 3


def test_after_a_failed_step_the_engine_rebuilds_its_state_rather_than_trusting_it(loaded, monkeypatch):
    """A step that fails halfway (in the prefill, or anywhere in the step) may leave the worker's
    bookkeeping inconsistent, here a prefill row held by no prompt: the next request is still served,
    since the state is rebuilt. Without the rebuild the engine's only prefill row stays taken."""
    import minimoe.serve.engine as engine_module

    lines = _recording_log(monkeypatch, engine_module)
    model, tok = loaded
    params = JobParams(max_tokens=3, temperature=0)

    def leak_then_fail(engine: Engine) -> None:
        engine._prefill.ids[1], engine._prefill.done[1] = [1], 0  # a row no prompt holds
        raise RuntimeError("half done")

    def fails_at(call: int, real, engine: Engine):
        calls = []

        def patched(*args):
            calls.append(1)
            return leak_then_fail(engine) if len(calls) == call else real(*args)

        return patched

    for where in ("prefill", "step"):
        engine = Engine(model, tok, max_active=1)
        if where == "prefill":
            engine._prefill.step = fails_at(1, engine._prefill.step, engine)
        else:  # the second step, the first prompt's sequence running
            engine._drop_cancelled = fails_at(2, engine._drop_cancelled, engine)
        jobs = [Job(0, tok.encode("the cat"), params, lambda e: None, client="a")]
        jobs.append(Job(1, tok.encode("a dog"), params, lambda e: None, client="b"))
        events = _engine_run(engine, jobs, timeout=30)
        assert [e.index for e in events if isinstance(e, Failure)] == [0], where
        assert [e.index for e in events if isinstance(e, Finish)] == [1], where
        assert engine.failed_steps == 1 and engine.failing_steps == 0
    assert [line for line, traceback in lines if traceback] == [
        "engine: a prefill step failed",
        "engine: an engine step failed",
    ]


def test_a_stream_whose_client_leaves_during_a_blocked_write_is_closed_and_logged_once(monkeypatch):
    """The whole answer was generated while a write to a client that does not read was blocked; the
    client then goes away. The stream stops, its body generator is closed at once (not at garbage
    collection) and one line says the client went away, though every choice had finished. The ASGI
    server here acts as uvicorn does: a write waits while the client's buffer is full, and once the
    client has gone writes return at once and are dropped."""
    import asyncio
    from types import SimpleNamespace

    from minimoe.serve import sse as sse_module
    from minimoe.serve.service import Batch
    from minimoe.serve.sse import Meta, completion_chunks

    lines = _recording_log(monkeypatch, sse_module)

    async def run():
        writable, disconnected, sent = asyncio.Event(), asyncio.Event(), []

        async def send(message) -> None:
            if sent and not disconnected.is_set():  # the head goes out; the body waits
                await writable.wait()
            if not disconnected.is_set():
                sent.append(message)

        async def receive() -> dict:
            await disconnected.wait()
            return {"type": "http.disconnect"}

        job = Job(0, [1], JobParams(max_tokens=50), lambda e: None)
        batch = Batch(_Engine(), [job])
        for i in range(50):
            job.post(Delta(0, f"t{i} "))
        job.post(Finish(0, "length", 50, "", None))
        request = SimpleNamespace(
            client=SimpleNamespace(host="127.0.0.1", port=9),
            is_disconnected=lambda: asyncio.sleep(0, disconnected.is_set()),
        )
        chunks = completion_chunks(Meta("cmpl-1", "text_completion", NAME), [""], 1, None, False)
        response = sse_module.sse(batch, chunks, request)
        task = asyncio.create_task(response({"type": "http"}, receive, send))
        await asyncio.sleep(0.2)  # every event is queued; the first body write is blocked
        assert len(sent) == 1 and not task.done()
        disconnected.set()  # the client resets the connection: uvicorn wakes the blocked write
        writable.set()
        await asyncio.wait_for(task, 10)
        return response, len(sent)

    response, sent = asyncio.run(run())
    assert sent == 1 and response.body_iterator.ag_frame is None  # closed
    assert lines == [
        ("client 127.0.0.1:9 went away mid-stream; its request (choices: 1) was cancelled", False)
    ]


def test_a_streamed_completion_of_two_choices_counts_both_in_its_usage(server):
    """Streamed with n=2 and include_usage, a completion's usage equals the one of the same request
    answered whole (every choice's tokens, not the last one's)."""
    body = {"model": NAME, "prompt": "the", "max_tokens": 7, "n": 2, "temperature": 1.0, "seed": 5}
    data = _stream_chunks(server, "/v1/completions", {**body, "stream_options": {"include_usage": True}})
    usage = json.loads(data[-2])["usage"]
    whole = _post(server, "/v1/completions", body).json()["usage"]
    assert usage == whole and usage["completion_tokens"] == 14


def test_a_stop_string_completed_by_the_last_allowed_token_is_a_stop(server):
    """A stop string whose last character comes with the max_tokens-th token: finish_reason "stop" and
    the text cut before it, streamed or not (the stop string is checked before the token budget)."""
    body = {"model": NAME, "prompt": "the", "max_tokens": 40, "temperature": 0, "logprobs": 0}
    full = _post(server, "/v1/completions", body).json()["choices"][0]
    text, offsets = full["text"], full["logprobs"]["text_offset"]
    k = 10
    end = offsets[k]  # where token k starts: the first k tokens make text[:end]
    stop = next(text[i:end] for i in range(end - 1, -1, -1) if text.find(text[i:end]) == i)
    assert stop and end <= len(text)
    capped = {**body, "max_tokens": k, "stop": stop}
    del capped["logprobs"]
    r = _post(server, "/v1/completions", capped).json()
    assert r["choices"][0]["finish_reason"] == "stop" and r["choices"][0]["text"] == text[: end - len(stop)]
    assert r["usage"]["completion_tokens"] == k
    chunks = [json.loads(d) for d in _stream_chunks(server, "/v1/completions", capped)[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == text[: end - len(stop)]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_chat_messages_without_content_with_tool_calls_or_with_non_text_parts_are_refused(server):
    def refused(messages: list) -> dict:
        r = _post(server, "/v1/chat/completions", {"model": NAME, "messages": messages, "max_tokens": 1})
        assert r.status_code == 400, r.text
        return r.json()["error"]

    for role in ("user", "system"):
        err = refused([{"role": role}])
        assert err["param"] == "messages.0.content" and err["code"] == "missing_required_parameter"
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    err = refused([{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [call]}])
    assert err["param"] == "messages.1.tool_calls" and "tool calls are not supported" in err["message"]
    image = {"type": "image_url", "image_url": {"url": "http://x/y.png"}}
    err = refused([{"role": "user", "content": [{"type": "text", "text": "a"}, image]}])
    assert err["param"] == "messages.0.content.1" and "only text parts" in err["message"]
    assert "'image_url'" in err["message"] and err["type"] == "invalid_request_error"
    ok = _post(server, "/v1/chat/completions", {"model": NAME, "max_tokens": 1, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "a"}]}, {"role": "assistant", "content": "b"}]})  # fmt: skip
    assert ok.status_code == 200, ok.text


def test_an_idle_keep_alive_connection_is_closed_as_idle_not_as_a_slow_request_head(tight):
    """With --header-timeout below uvicorn's 5 s keep-alive, an idle connection is closed after the
    header timeout, and a log line (if any) says it was idle, not that its request head was late."""
    with socket.create_connection((tight.host, tight.port), timeout=30) as sock:
        port = sock.getsockname()[1]
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        _read_until(sock, b'"failed_steps"')
        t0 = time.perf_counter()
        sock.settimeout(10)
        while sock.recv(65536):  # the rest of the answer, then b"" once the server closes
            pass
        assert time.perf_counter() - t0 < 6
    time.sleep(0.5)
    mine = [line for line in tight.read_log().splitlines() if f"127.0.0.1:{port} " in line]
    assert not any("request head" in line for line in mine), mine
    assert all("idle connection closed" in line for line in mine), mine


def test_clients_are_keyed_by_ipv4_address_and_ipv6_64_network():
    from minimoe.serve.service import client_key

    assert client_key("203.0.113.7") == "203.0.113.7" != client_key("203.0.113.8")
    assert client_key("2001:db8:1:2:aaaa::1") == client_key("2001:db8:1:2:ffff:1:2:3") == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:3::1") != client_key("2001:db8:1:2::1")
    assert client_key("::ffff:203.0.113.7") == "203.0.113.7"  # IPv4 on a dual-stack socket
    assert client_key("::1") == "::/64" and client_key("testclient") == "testclient"


def test_a_client_that_reads_nothing_of_its_answer_loses_its_connection_after_the_write_timeout(caplog):
    """The server's protocol with --write-timeout: a transport whose buffer stays full (writing paused: the
    client reads nothing) for that long is aborted, dropping the unsent answer, and one line says so; a
    client that reads again in time (writing resumed) keeps its connection. The abort reaches the request
    as a disconnect, which cancels it (tested above)."""
    import asyncio

    import uvicorn
    from uvicorn.server import ServerState

    from minimoe.serve.http import timed_h11

    class Transport:
        aborted = closed = False

        def get_extra_info(self, name, default=None):
            return {"peername": ("127.0.0.9", 4242), "sockname": ("127.0.0.1", 8000)}.get(name, default)

        def is_closing(self):
            return self.aborted or self.closed

        def abort(self):
            self.aborted = True

        def close(self):
            self.closed = True

        def write(self, data):
            pass

    async def connection(pause_for: float) -> Transport:
        protocol_class = timed_h11(header_timeout=30.0, write_timeout=0.2)
        config = uvicorn.Config(app=lambda scope, receive, send: None, log_config=None)  # logs propagate
        config.load()
        protocol = protocol_class(config, ServerState(), {}, _loop=asyncio.get_running_loop())
        transport = Transport()
        protocol.connection_made(transport)
        protocol.pause_writing()
        await asyncio.sleep(pause_for)
        if not transport.aborted:
            protocol.resume_writing()
        await asyncio.sleep(0.4)  # past the timeout after the resume too
        protocol.connection_lost(None)
        return transport

    with caplog.at_level("INFO", logger="uvicorn.error"):
        assert asyncio.run(connection(1.0)).aborted
        assert caplog.text.count("127.0.0.9:4242 read nothing of its answer for 0.2s; connection closed") == 1
        caplog.clear()
        assert not asyncio.run(connection(0.05)).aborted
        assert "read nothing" not in caplog.text
