"""Generation: cached vs uncached, batched vs single, speculative vs greedy, beam search, sampling
filters, stop strings, and the `minimoe generate` command line."""

from __future__ import annotations

import io
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

from minimoe.cli.main import main
from minimoe.config import ModelConfig
from minimoe.data import Tokenizer
from minimoe.errors import MinimoeError
from minimoe.infer.beam import beam_search
from minimoe.infer.common import decode_threads
from minimoe.infer.generate import (
    GenerationStats,
    complete,
    generate_text,
    generate_tokens,
    stream_batch,
    stream_text,
)
from minimoe.infer.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    filter_logits,
    pick_tokens,
    process_logits,
)
from minimoe.infer.text import CONTEXT_IDS, TextStream, partial_stop_len
from minimoe.model.transformer import Transformer
from reference import greedy_no_cache, mtp_reference, sequence_logprob


def tiny_cfg(attn_type: str = "mla", **kw) -> ModelConfig:
    base = dict(
        vocab_size=97, hidden_size=36, num_hidden_layers=3, num_attention_heads=3, max_position_embeddings=64, kv_lora_rank=12,
        qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=10, intermediate_size=48, first_k_dense_replace=1,
        n_routed_experts=6, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=20,
        mtp_depth=1, attn_type=attn_type, num_key_value_heads=1 if attn_type == "gqa" else None,
    )  # fmt: skip
    base.update(kw)
    return ModelConfig(**base).validate()


def tiny_model(attn_type: str = "mla", seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    # float64: the equality tests compare argmaxes, and fp64 rules out near-tie flips between paths
    model = Transformer(tiny_cfg(attn_type, **kw)).double().eval()
    with torch.no_grad():  # a final norm that is not all ones: the MTP drafts read its output
        model.norm.weight.uniform_(0.5, 1.5)
    return model


PROMPTS = [[5, 17, 3], [60, 2, 2, 9, 41, 8, 77, 30, 12], [11], [90, 4, 4, 4, 4, 23]]
GREEDY = SamplingParams(temperature=0.0)


def prefill_together(pool, prompts, budget: int, tokens=None):
    """Prefill every prompt at once in the pool's prefill rows (`budget` positions per step, so the
    longer prompts take several chunks while the shorter ones finish first), then add them to the pool
    in order. Returns each prompt's (V,) logits after its last token and, with `tokens` (one first
    new token per prompt) and an MTP pool, each one's (V,) first draft logits."""
    from minimoe.infer.slots import Prefill

    pre = Prefill(pool)
    rows = [pre.add(p) for p in prompts]
    first = {}
    while len(first) < len(rows):
        first.update(pre.step(budget))
    drafts = pre.first_draft(rows, tokens) if tokens is not None else None
    for r, p in zip(rows, prompts):
        assert pool.add(len(p), src=r) == pool.n - 1
        pre.release(r)
    return [first[r][0] for r in rows], drafts


def collect(steps, n: int) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in range(n)]
    for step in steps:
        for i, t in enumerate(step):
            if t is not None:
                out[i].append(t)
    return out


# ----------------------------------------------------------------------------- sampling functions


def test_filter_logits_top_k_and_top_p():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0, -1.0]])
    kept = torch.isfinite(filter_logits(logits, top_k=2))
    assert kept.tolist() == [[False, True, True, False, False]]
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    # the smallest set whose mass reaches top_p: 0.5 + 0.3 >= 0.7, so two tokens
    kept = torch.isfinite(filter_logits(probs.log(), top_p=0.7))
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(filter_logits(probs.log(), top_p=0.85))
    assert kept.tolist() == [[True, True, True, False]]
    # the top token always survives, however small top_p is
    assert torch.isfinite(filter_logits(probs.log(), top_p=0.01)).sum() == 1


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1e-300),
        SamplingParams(temperature=2e-38),
        SamplingParams(temperature=1.0, top_p=1e-46),
        SamplingParams(temperature=1e-300, top_k=2, top_p=1e-300),
    ],
)
def test_extreme_temperature_and_top_p_sample_the_argmax(params):
    """Values that pass validation but leave fp32's range (a temperature of 1e-300, a top_p that rounds
    to 0): the distribution is their limit, all mass on the argmax, never NaN."""
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0, -1.0, float("-inf")]])
    probs = process_logits(logits, params.validate()).softmax(-1)
    assert probs.tolist() == [[0.0, 1.0, 0.0, 0.0, 0.0, 0.0]]
    assert int(pick_tokens(logits, params, None, [torch.Generator().manual_seed(0)])) == 1


def test_top_k_keeps_exactly_k_tokens_up_to_the_vocabulary():
    """top_k keeps the k largest logits for every k below the vocabulary size (V - 1 drops only the
    smallest); k >= V keeps everything."""
    logits = torch.tensor([[0.5, -3.0, 2.0, 1.0, -1.0]])
    order = logits[0].argsort(descending=True)
    for k in range(1, 8):
        kept = torch.isfinite(filter_logits(logits, top_k=k))[0]
        want = torch.zeros(5, dtype=torch.bool)
        want[order[:k]] = True
        assert torch.equal(kept, want), k


def test_top_p_stops_at_the_token_whose_mass_reaches_it_exactly():
    """A set whose mass equals top_p exactly is enough: with four equal tokens (0.25 each, exact in
    floating point) top_p 0.5 keeps two and top_p 0.75 keeps three."""
    logits = torch.zeros(2, 4)
    for top_p, n in ((0.25, 1), (0.5, 2), (0.75, 3), (0.8, 4)):
        kept = torch.isfinite(filter_logits(logits, top_p=top_p)).sum(-1)
        assert kept.tolist() == [n, n], top_p


def test_top_p_counts_equal_tokens_whose_mass_is_top_p_as_reaching_it():
    """k of V equal tokens hold k/V of the mass, so top_p k/V keeps exactly k of them, though the
    floating-point sum of k probabilities of 1/V lands a hair below or above k/V (an fp32 sum of six
    tenths falls short of 0.6); after top-k, the mass is that of the kept tokens."""
    for V in range(2, 41):
        logits = torch.zeros(1, V)
        for k in range(1, V):
            assert int(torch.isfinite(filter_logits(logits, top_p=k / V)).sum()) == k, (V, k)
    logits = torch.tensor([[0.0] * 10 + [-1.0] * 5])
    assert int(torch.isfinite(filter_logits(logits, top_k=10, top_p=0.6)).sum()) == 6


def test_top_p_one_keeps_every_token_however_unlikely():
    """top_p 1 switches the filter off: a token whose probability is far below any slack (e^-80) stays."""
    logits = torch.tensor([[40.0, 0.0, -40.0]])
    assert torch.isfinite(process_logits(logits, SamplingParams(temperature=1.0))).all()
    assert torch.isfinite(filter_logits(logits, top_p=1.0)).all()


def _reference_probs(row: list[float], params: SamplingParams) -> list[float]:
    """The sampling distribution by its definition, in Python floats: logits / temperature, keep the
    top_k largest, then the smallest prefix (largest first) of what is left whose renormalised mass
    reaches top_p, and renormalise over the kept tokens."""
    z = [x / params.temperature for x in row]
    order = sorted(range(len(z)), key=lambda i: -z[i])
    if params.top_k:
        order = order[: params.top_k]
    mass = [math.exp(z[i]) for i in order]
    total_mass = sum(mass)
    kept, cum = [], 0.0
    for i, m in zip(order, mass):
        kept.append(i)
        cum += m / total_mass
        if cum >= params.top_p:
            break
    total = sum(math.exp(z[i]) for i in kept)
    return [math.exp(z[i]) / total if i in kept else 0.0 for i in range(len(z))]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_processed_logits_give_the_defined_distribution(seed):
    """Temperature first, then top-k, then top-p over what top-k kept: the kept set of top-p depends on
    the temperature (at temperature 0.5 the mass is more peaked, so fewer tokens reach top_p), and
    top-p's mass is measured after top-k."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, 40, generator=g, dtype=torch.float64) * 2
    for params in [
        SamplingParams(temperature=0.5, top_p=0.8),
        SamplingParams(temperature=2.0, top_p=0.6),
        SamplingParams(temperature=1.3, top_k=6, top_p=0.7),
        SamplingParams(temperature=0.7, top_k=9),
    ]:
        got = process_logits(logits, params).softmax(-1)
        want = torch.tensor([_reference_probs(row, params) for row in logits.tolist()], dtype=torch.float64)
        assert torch.allclose(got.double(), want, atol=1e-6), params


def test_sampling_respects_filters_and_seed():
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(0))
    allowed = set(logits[0].topk(3).indices.tolist())
    params = SamplingParams(temperature=1.5, top_k=3)
    g = torch.Generator().manual_seed(1)
    draws = [int(pick_tokens(logits, params, None, [g])) for _ in range(200)]
    assert set(draws) == allowed
    again = [int(pick_tokens(logits, params, None, [torch.Generator().manual_seed(7)])) for _ in range(3)]
    assert len(set(again)) == 1  # same seed, same draw


def test_pick_tokens_draws_each_row_from_its_own_distribution():
    """Sampled tokens follow softmax(logits / temperature) of their own row, the last token included."""
    want = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.4, 0.0, 0.0, 0.6]], dtype=torch.float64)
    params = SamplingParams(temperature=0.5)
    logits = want.log() * params.temperature
    gens = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)]
    counts = torch.zeros(2, 4)
    for _ in range(2000):
        counts[torch.arange(2), pick_tokens(logits, params, None, gens)] += 1
    assert torch.allclose(counts / 2000, want.float(), atol=0.04), counts


def test_unseeded_sampling_leaves_the_global_generator_alone():
    """seed=None draws a fresh seed for the call's own generator, never by reseeding torch's global
    one: the caller's torch.manual_seed still decides every number it draws afterwards."""
    model = tiny_model()
    torch.manual_seed(0)
    want = torch.rand(4)
    torch.manual_seed(0)
    assert len(list(generate_tokens(model, [1, 2, 3], 5, temperature=1.0))) == 5
    assert torch.equal(torch.rand(4), want)


def test_repetition_penalty():
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -4.0, 2.0, -2.0]]  # positive divided, negative multiplied
    assert torch.equal(apply_repetition_penalty(logits, seen, 1.0), logits)
    # in generation: a strong penalty stops greedy decoding from repeating any token
    model = tiny_model()
    plain = list(generate_tokens(model, [1, 2], 30, temperature=0.0))
    assert len(set(plain)) < len(plain)
    penalised = list(generate_tokens(model, [1, 2], 30, temperature=0.0, repetition_penalty=1e6))
    assert len(set(penalised + [1, 2])) == len(penalised) + 2


def test_repetition_penalty_acts_on_the_raw_logits_before_temperature_and_filters():
    """Sampling with a penalty draws from the definition: the seen tokens' raw logits divided (positive)
    or multiplied (negative) by the penalty, then temperature, top-k and top-p."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 30, generator=g, dtype=torch.float64) * 2
    seen = torch.rand(3, 30, generator=g) < 0.4
    for params in [
        SamplingParams(temperature=0.5, repetition_penalty=1.8),
        SamplingParams(temperature=1.3, top_k=6, top_p=0.8, repetition_penalty=2.5),
        SamplingParams(temperature=2.0, top_p=0.7, repetition_penalty=0.6),
    ]:
        r = params.repetition_penalty
        penalised = [
            [(x / r if x > 0 else x * r) if s else x for x, s in zip(row, s_row)]
            for row, s_row in zip(logits.tolist(), seen.tolist())
        ]
        want = torch.tensor([_reference_probs(row, params) for row in penalised], dtype=torch.float64)
        got = process_logits(logits, params, seen).softmax(-1)
        assert torch.allclose(got.double(), want, atol=1e-6), params


def test_repetition_penalty_counts_the_prompt_in_every_decoder():
    """The prompt's tokens are seen from the first step: with a huge penalty, plain greedy decoding,
    one-beam search and greedy speculative decoding never repeat a prompt token (plain greedy without
    the penalty does), and they agree token for token."""
    model = tiny_model()
    prompt = PROMPTS[0] + list(generate_tokens(model, PROMPTS[0], 6, temperature=0.0))
    assert set(generate_tokens(model, prompt, 14, temperature=0.0)) & set(prompt)
    kw = dict(temperature=0.0, repetition_penalty=1e6)
    want = list(generate_tokens(model, prompt, 14, **kw))
    assert not set(want) & set(prompt) and len(set(want)) == len(want)
    # beside another prompt in a batch
    assert collect(stream_batch(model, [prompt, PROMPTS[1]], 14, SamplingParams(**kw)), 2)[0] == want
    assert list(generate_tokens(model, prompt, 14, speculative=True, **kw)) == want
    (best,) = beam_search(model, prompt, num_beams=1, max_new_tokens=14, repetition_penalty=1e6)
    assert best.tokens == want


@pytest.mark.parametrize(
    "kw",
    [{"temperature": -1}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -2}, {"repetition_penalty": 0}],
)
def test_bad_sampling_params(kw):
    with pytest.raises(MinimoeError):
        list(generate_tokens(tiny_model(), [1], 3, **kw))


def test_negative_max_new_tokens():
    with pytest.raises(MinimoeError, match="max_new_tokens"):
        list(generate_tokens(tiny_model(), [1], -1))


# --------------------------------------------------------------------- cached, batched, streaming


# YaRN over a 16-position original context, DeepSeek-V3's way (mscale_all_dim: the softmax scale too), so the
# cached, batched (left-padded) and speculative paths read positions past the original context
YARN = {
    "type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 16,
    "mscale": 1.0,
    "mscale_all_dim": 0.707,
}
ROPE = [("mla", None), ("gqa", None), ("mla", YARN), ("gqa", YARN)]


@pytest.mark.parametrize("attn_type, rope_scaling", ROPE)
def test_cached_generation_matches_uncached(attn_type, rope_scaling):
    model = tiny_model(attn_type, rope_scaling=rope_scaling)
    for prompt in PROMPTS[:2]:
        want = greedy_no_cache(model, prompt, 20)
        assert list(generate_tokens(model, prompt, 20, temperature=0.0)) == want
    if rope_scaling:  # past the original 16 positions, with the MTP drafts too
        prompt = list(range(1, 21))
        want = greedy_no_cache(model, prompt, 12)
        assert list(generate_tokens(model, prompt, 12, temperature=0.0, speculative=True)) == want


@pytest.mark.parametrize("attn_type, rope_scaling", ROPE)
def test_batched_equals_single(attn_type, rope_scaling):
    model = tiny_model(attn_type, rope_scaling=rope_scaling)
    single = [list(generate_tokens(model, p, 16, temperature=0.0)) for p in PROMPTS]
    assert collect(stream_batch(model, PROMPTS, 16, GREEDY), len(PROMPTS)) == single
    # a stop token makes rows finish at different steps (dropped from the batch and the cache)
    stop = (single[1][4],)
    single = [list(generate_tokens(model, p, 16, temperature=0.0, stop_ids=stop)) for p in PROMPTS]
    assert len({len(s) for s in single}) > 1
    assert collect(stream_batch(model, PROMPTS, 16, GREEDY, stop_ids=stop), len(PROMPTS)) == single
    # sampling: each row has its own generator, seeded alike, so it draws what it would alone
    params = SamplingParams(temperature=1.0, top_k=20, repetition_penalty=1.2)
    single = [list(generate_tokens(model, p, 12, 1.0, 20, seed=3, repetition_penalty=1.2)) for p in PROMPTS]
    assert collect(stream_batch(model, PROMPTS, 12, params, seed=3), len(PROMPTS)) == single


@pytest.mark.parametrize("seed", [3, 8])
def test_sampled_rows_keep_their_generators_when_rows_leave_the_batch(seed):
    """Rows that stop (a stop token) or are cancelled leave the batch; every remaining row goes on
    drawing from its own generator, so it still samples what it would alone."""
    model = tiny_model()
    params = SamplingParams(temperature=1.0, top_k=20, repetition_penalty=1.2)
    kw = dict(temperature=1.0, top_k=20, seed=seed, repetition_penalty=1.2)
    free = [list(generate_tokens(model, p, 12, **kw)) for p in PROMPTS]
    stop = (free[1][3],)
    single = [list(generate_tokens(model, p, 12, stop_ids=stop, **kw)) for p in PROMPTS]
    assert len({len(s) for s in single}) > 1
    assert collect(stream_batch(model, PROMPTS, 12, params, seed=seed, stop_ids=stop), len(PROMPTS)) == single
    cancelled: set[int] = set()
    out: list[list[int]] = [[] for _ in PROMPTS]
    for k, step in enumerate(stream_batch(model, PROMPTS, 12, params, seed=seed, cancelled=cancelled)):
        for i, t in enumerate(step):
            if t is not None:
                out[i].append(t)
        if k == 2:
            cancelled.add(0)  # the first row leaves after three tokens; the others move up
    assert out == [free[0][:3]] + free[1:]


def test_padded_forward_matches_unpadded_logits():
    model = tiny_model()
    short, long = PROMPTS[0], PROMPTS[1]
    ids = torch.zeros(2, len(long), dtype=torch.long)
    ids[0, -len(short) :] = torch.tensor(short)
    ids[1] = torch.tensor(long)
    mask = ids != 0
    mask[1] = True
    got = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(got[0, -len(short) :], model(torch.tensor([short])).logits[0])
    torch.testing.assert_close(got[1], model(torch.tensor([long])).logits[0])
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=mask[:, 1:])


def test_streaming_iterator_and_stats():
    model = tiny_model()
    stats = GenerationStats()
    it = generate_tokens(model, PROMPTS[1], 10, temperature=0.0, stats=stats)
    first = next(it)  # tokens arrive one at a time, before generation is over
    assert isinstance(first, int) and stats.new_tokens == 1
    rest = list(it)
    assert [first] + rest == greedy_no_cache(model, PROMPTS[1], 10)
    assert stats.new_tokens == 10 and stats.prompt_tokens == len(PROMPTS[1])
    # MLA caches (kv_lora_rank + rope) numbers per token per layer, fp64 here
    per_token = model.cache_bytes_per_token(torch.float64)
    assert per_token == (12 + 4) * 3 * 8
    assert stats.cache_bytes_allocated == per_token * (len(PROMPTS[1]) + 10)
    assert stats.cache_bytes_used == per_token * (len(PROMPTS[1]) + 9)  # the last token is not fed back
    assert stats.prefill_s > 0 and stats.decode_s > 0  # both phases timed
    assert stats.tokens_per_s == pytest.approx(10 / (stats.prefill_s + stats.decode_s))


@pytest.mark.parametrize("attn_type", ["mla", "gqa"])
def test_slot_pool_decode_equals_uncached_forward(attn_type):
    """The pooled decode step (rows of different lengths in one forward, per-row positions and masks,
    rows leaving and joining) against the plain uncached forward over each whole sequence."""
    from minimoe.infer.slots import SlotPool

    model = tiny_model(attn_type)
    pool = SlotPool(model, slots=3, prefill_rows=4)
    assert pool.nbytes() == model.cache_bytes_per_token(torch.float64) * 64 * (3 + 4)
    seqs = [list(p) for p in PROMPTS[:3]]
    # 6 positions for 3 prompts: chunks of 2, padded where a prompt has fewer left; the later chunks
    # attend to the cached ones, and the short prompts finish while the long one goes on
    shapes = []  # every prefill forward's (rows, T): within the budget of 6 positions, padding included
    hook = model.embed_tokens.register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape)))
    try:
        first, _ = prefill_together(pool, seqs, budget=6)
    finally:
        hook.remove()
    assert shapes[0] == (3, 2) and all(rows * T <= 6 for rows, T in shapes)
    for p, logits in zip(seqs, first):
        torch.testing.assert_close(logits, model(torch.tensor([p])).logits[0, -1])
    nxt = [int(logits.argmax()) for logits in first]
    for step in range(6):
        if step == 2:  # row 0 leaves: the last row moves into its place
            pool.remove(0)
            seqs[0], nxt[0] = seqs.pop(), nxt.pop()
        logits = pool.decode(torch.tensor(nxt))
        for r, s in enumerate(seqs):
            s.append(nxt[r])
            want = model(torch.tensor([s])).logits[0, -1]
            torch.testing.assert_close(logits[r], want)
        nxt = logits.argmax(-1).tolist()
    assert pool.lengths == [len(s) for s in seqs]


@pytest.mark.parametrize("attn_type", ["mla", "gqa"])
def test_slot_pool_remove_moves_a_longer_last_row_whole(attn_type):
    """Freeing a short row moves the last row, which holds more positions, into its place: every one
    of its cached positions comes along, so its next steps equal the uncached forward."""
    from minimoe.infer.slots import SlotPool

    model = tiny_model(attn_type)
    pool = SlotPool(model, slots=2, prefill_rows=2)
    seqs = [list(PROMPTS[2]), list(PROMPTS[1])]  # 1 and 9 tokens
    first, _ = prefill_together(pool, seqs, budget=20)
    pool.remove(0)
    seq, nxt = seqs[1], int(first[1].argmax())
    assert pool.lengths == [len(seq)]
    for _ in range(2):
        logits = pool.decode(torch.tensor([nxt]))
        seq.append(nxt)
        torch.testing.assert_close(logits[0], model(torch.tensor([seq])).logits[0, -1])
        nxt = int(logits[0].argmax())


@pytest.mark.parametrize("attn_type", ["mla", "gqa"])
def test_prefill_pads_past_the_last_position_and_a_prompt_joins_midway(attn_type):
    """A prompt of max_len - 1 tokens prefilled beside one that joins later: the second step's chunk
    is as long as the newcomer's, so the long prompt's padding runs past the cache's last position
    (clamped, masked); both prompts' logits equal the uncached forward. Prompts that leave no room for
    a new token, and a full set of rows, are refused."""
    from minimoe.infer.slots import Prefill, SlotPool

    model = tiny_model(attn_type)
    pool = SlotPool(model, slots=2, max_len=16, prefill_rows=2)
    g = torch.Generator().manual_seed(3)
    a, c = (torch.randint(0, model.cfg.vocab_size, (n,), generator=g).tolist() for n in (15, 10))
    pre = Prefill(pool)
    ra = pre.add(a)
    assert pre.step(10) == {}  # a: 10 of 15 tokens
    rc = pre.add(c)
    out = pre.step(20)  # T = 10: a takes its last 5 at positions 10-14, padding reaches 19 (> 15)
    assert set(out) == {ra, rc}
    for ids, row in ((a, ra), (c, rc)):
        torch.testing.assert_close(out[row][0], model(torch.tensor([ids])).logits[0, -1])
    with pytest.raises(RuntimeError, match="every prefill row"):
        pre.add([1])
    pre.release(ra)
    with pytest.raises(ValueError, match="1 to 15 tokens"):
        pre.add(list(range(16)))
    with pytest.raises(ValueError, match="1 to 15 tokens"):
        pre.add([])


@pytest.mark.parametrize("attn_type", ["mla", "gqa"])
def test_prefill_of_a_newcomer_beside_a_prompt_midway_keeps_the_mask(attn_type):
    """A step whose rows all start at position 0 attends causally without a mask; a newcomer in the
    first row beside a prompt midway in the second does not: the step keeps its mask, and every
    prompt's logits equal the uncached forward."""
    from minimoe.infer.slots import Prefill, SlotPool

    model = tiny_model(attn_type)
    pool = SlotPool(model, slots=2, max_len=32, prefill_rows=2)
    g = torch.Generator().manual_seed(5)
    a, b, c = (torch.randint(0, model.cfg.vocab_size, (n,), generator=g).tolist() for n in (3, 12, 6))
    pre = Prefill(pool)
    ra, rb = pre.add(a), pre.add(b)
    first = pre.step(8)  # T = 4: a done, b at 4 of 12
    assert set(first) == {ra}
    pre.release(ra)
    rc = pre.add(c)  # a's row
    assert rc < rb  # the newcomer (position 0) comes first in the step
    out = {}
    while len(out) < 2:
        out.update(pre.step(12))
    for ids, got in ((a, first[ra]), (b, out[rb]), (c, out[rc])):
        torch.testing.assert_close(got[0], model(torch.tensor([ids])).logits[0, -1])


@pytest.mark.parametrize("attn_type", ["mla", "gqa"])
def test_slot_pool_speculative_steps_equal_uncached_forward(attn_type):
    """Pooled verify steps (two tokens per row, rows committing one or two of them) and the pooled MTP
    draft against the uncached main forward and the uncached MTP module over each whole sequence."""
    from minimoe.infer.slots import SlotPool

    model = tiny_model(attn_type)
    pool = SlotPool(model, slots=3, mtp=True, prefill_rows=3)
    assert pool.nbytes() > model.cache_bytes_per_token(torch.float64) * 64 * (3 + 3)  # + the MTP caches

    @torch.no_grad()
    def mtp_reference(committed: list[int], nxt: int) -> torch.Tensor:
        """Draft logits of the MTP module run uncached: position j sees h_j and token j + 1."""
        L = len(committed)
        hidden = model(torch.tensor([committed])).hidden  # (1, L, D)
        emb = model.embed_tokens(torch.tensor([committed[1:] + [nxt]]))
        _, h_normed, _ = model.mtp[0](model.norm(hidden), emb, model.rope_cos[:L], model.rope_sin[:L])
        return model.lm_head(h_normed[0, -1])

    seqs = [list(p) for p in PROMPTS[:3]]  # committed tokens (in the cache)
    # the first tokens come from the uncached model (the prefill logits are tested above)
    nxt = [int(model(torch.tensor([p])).logits[0, -1].argmax()) for p in seqs]
    _, d = prefill_together(pool, seqs, budget=6, tokens=nxt)  # chunks of 2: the MTP prefill spans chunks
    for p, t, row in zip(seqs, nxt, d):
        torch.testing.assert_close(row, mtp_reference(p, t))
    drafts = d.argmax(-1).tolist()
    g = torch.Generator().manual_seed(0)
    for step in range(5):
        if step == 3:  # row 1 leaves: the last row moves into its place
            pool.remove(1)
            seqs[1], nxt[1], drafts[1] = seqs.pop(), nxt.pop(), drafts.pop()
        # some drafts right (the true next-but-one token would be), some random
        drafts = [
            d if torch.rand((), generator=g) < 0.5 else int(torch.randint(97, (), generator=g))
            for d in drafts
        ]
        logits, hidden = pool.forward(torch.tensor([[a, b] for a, b in zip(nxt, drafts)]))
        new = []
        for r, s in enumerate(seqs):
            want = model(torch.tensor([s + [nxt[r], drafts[r]]])).logits[0, -2:]
            torch.testing.assert_close(logits[r], want)
            keep = int(logits[r, 0].argmax()) == drafts[r] or r == 0  # row 0 always commits two
            new.append([drafts[r], int(logits[r, 1].argmax())] if keep else [int(logits[r, 0].argmax())])
        next_ids = torch.tensor([t if len(t) == 2 else t * 2 for t in new])
        take = torch.tensor([len(t) - 1 for t in new])
        draft_logits = pool.draft(hidden, next_ids, take)
        pool.advance([len(t) for t in new])
        for r, s in enumerate(seqs):
            s.append(nxt[r])
            s.extend(new[r][:-1])
            nxt[r] = new[r][-1]
            torch.testing.assert_close(draft_logits[r], mtp_reference(s, nxt[r]))
        drafts = draft_logits.argmax(-1).tolist()
    assert pool.lengths == [len(s) for s in seqs]


@pytest.mark.parametrize("attn_type", ["mla", "gqa"])
def test_slot_pool_decodes_a_rows_last_position(attn_type):
    """A row of max_len - 1 tokens decodes its last token at position max_len - 1: the step attends
    over every position of the pool, the new one included, and equals the uncached forward."""
    from minimoe.infer.slots import SlotPool

    model = tiny_model(attn_type)
    pool = SlotPool(model, slots=2, max_len=16)
    seq = torch.randint(0, model.cfg.vocab_size, (15,), generator=torch.Generator().manual_seed(6)).tolist()
    prefill_together(pool, [seq], budget=16)
    logits = pool.decode(torch.tensor([4]))
    torch.testing.assert_close(logits[0], model(torch.tensor([seq + [4]])).logits[0, -1])
    assert pool.lengths == [16]


@pytest.mark.parametrize("attn_type", ["mla", "gqa"])
def test_prefill_rows_around_a_finished_one_and_a_later_rows_first_draft(attn_type):
    """Three prompts in an MTP pool's three prefill rows, the middle one finishing first: the next
    steps run rows 0 and 2 (a gap, so they are gathered, not a prefix of the rows), and `first_draft`
    of a row that finished alone (row 1) or of rows with a gap reads and writes those rows' MTP cache.
    Every prompt's logits and first draft equal the uncached forward and MTP module."""
    from minimoe.infer.slots import Prefill, SlotPool

    model = tiny_model(attn_type)
    pool = SlotPool(model, slots=3, max_len=32, mtp=True, prefill_rows=3)
    prompts = [PROMPTS[1], PROMPTS[2], PROMPTS[3]]  # 9, 1 and 6 tokens
    pre = Prefill(pool)
    rows = [pre.add(p) for p in prompts]
    done = []
    while len(done) < 3:
        out = pre.step(6)  # T = 2, then rows 0 and 2 alone
        finished = sorted(out)
        done.extend(finished)
        if not finished:
            continue
        tokens = [int(out[r].argmax()) for r in finished]
        drafts = pre.first_draft(finished, tokens)
        for r, t, d in zip(finished, tokens, drafts):
            ids = torch.tensor([prompts[r] + [t]])
            with torch.no_grad():
                main = model(ids)
                ref = mtp_reference(model, ids, main.hidden)[0][0]  # (len + 1 - 1, V)
            torch.testing.assert_close(out[r][0], main.logits[0, -2])
            torch.testing.assert_close(d, ref[-1])
    assert rows == [0, 1, 2] and done == [1, 2, 0]  # row 2 finishes in a step of rows 0 and 2


def test_slot_pool_checks_the_memory_of_every_cache_it_allocates(monkeypatch):
    """The start-up memory check asks for what the pool allocates: the decode rows, the prefill rows
    and, with `mtp`, both MTP caches."""
    from minimoe import memory
    from minimoe.infer.slots import SlotPool

    asked = []
    monkeypatch.setattr(memory, "check_fits", lambda need, *a, **kw: asked.append(need))
    model = tiny_model()
    for mtp in (False, True):
        pool = SlotPool(model, slots=3, max_len=16, mtp=mtp, prefill_rows=2)
        assert asked.pop() == pool.nbytes()


def _static_run(model, decoder_for, steps: int = 6):
    """Decode three prompts in a 4-slot pool (row 0 leaving at steps 2 and 5: 3, 2, then 1 rows); the
    logits of every step."""
    from minimoe.infer.slots import SlotPool

    pool = SlotPool(model, slots=4, prefill_rows=3)
    decoder = decoder_for(pool)
    out = []
    first, _ = prefill_together(pool, PROMPTS[:3], budget=12)
    nxt = [int(logits.argmax()) for logits in first]
    for step in range(steps):
        if step in (2, 5):
            pool.remove(0)
            nxt[0] = nxt.pop()
        logits = decoder.decode(torch.tensor(nxt))
        out.append(logits)
        nxt = logits.argmax(-1).tolist()
    return out


def _warmed(static):
    static.warm_up()
    return static


def test_static_decode_compiles_and_runs_each_graph_at_one_thread_count(monkeypatch):
    """Under passive OpenMP waiting at two threads, each fixed-shape graph is traced (`warm_up`) and run
    at one thread count, whatever count the caller holds (the engine enters `decode_threads` around
    every step, its eager rule): one thread for a small row bucket, the process's two for a large one
    (the threshold is moved between the two buckets here), every call (the speculative step, the draft,
    the two-token step), and the caller's count back after each call. Dynamo guards a graph on the
    thread count it was traced at: a call at another count would compile it again."""
    from torch._dynamo.testing import CompileCounter

    from minimoe.infer import common
    from minimoe.infer.slots import SlotPool
    from minimoe.infer.static import StaticDecode

    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    model = tiny_model(mtp_depth=1, num_hidden_layers=2)
    # a step of one row (two tokens) is small, one of two rows (four tokens) is not
    monkeypatch.setattr(common, "SINGLE_THREAD_DECODE_FLOPS", common.decode_flops(model, 3))
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    torch._dynamo.reset()
    counter = CompileCounter()
    try:
        pool = SlotPool(model, 2, max_len=32, mtp=True)
        static = StaticDecode(pool, backend=counter)
        seen = []
        for name in ("_forward_fn", "_speculate_fn", "_draft_fn"):
            fn = getattr(static, name)
            setattr(
                static,
                name,
                lambda *a, f=fn, n=name: seen.append((n, a[0].shape[0], torch.get_num_threads())) or f(*a),
            )
        static.warm_up()
        traced = counter.frame_count
        assert traced == len(seen) == 6  # 3 calls x row buckets 1 and 2
        assert {(rows, t) for _, rows, t in seen} == {(1, 1), (2, 2)} and torch.get_num_threads() == 2
        for n in (1, 2):
            pool.add(3)
            for caller in (2, 1):
                seen.clear()
                with common.num_threads(caller):
                    spec = static.speculate(torch.tensor([[4, 5]] * n))
                    static.draft(spec.hidden, spec.best, torch.tensor([1] * n))
                    static.forward(torch.tensor([[7, 8]] * n))  # the two-token step (sampled rows)
                    assert torch.get_num_threads() == caller
                assert [name for name, _, _ in seen] == ["_speculate_fn", "_draft_fn", "_forward_fn"]
                assert {t for _, _, t in seen} == {n}
        assert counter.frame_count == traced  # nothing compiled again
    finally:
        torch.set_num_threads(saved)
        torch._dynamo.reset()


@pytest.mark.parametrize("attn_type", ["mla", "gqa"])
def test_static_decode_step_equals_the_pooled_step_and_traces_once(attn_type):
    """The fixed-shape step (a bucket of rows, a bucket of positions, masked) against the eager pooled
    step, over steps that outgrow the first position bucket (16 -> 64) and drop to the one-row bucket;
    traced by torch.compile after `warm_up`, each pair of buckets is one graph for every step (rows of
    growing lengths, rows leaving), with no graph break and no compilation after `warm_up`."""
    from torch._dynamo.testing import CompileCounter

    from minimoe.infer.static import StaticDecode

    model = tiny_model(attn_type)
    want = _static_run(model, lambda pool: pool, steps=10)
    got = _static_run(model, lambda pool: StaticDecode(pool, compile=False), steps=10)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    torch._dynamo.reset()
    counter = CompileCounter()
    made, rows = [], []

    def static_for(pool):
        made.append(_warmed(StaticDecode(pool, backend=counter)))
        forward = made[0]._forward_fn
        made[0]._forward_fn = lambda tokens, pos, L: (
            rows.append((pool.n, len(tokens))) or forward(tokens, pos, L)
        )
        return made[0]

    got = _static_run(model, static_for, steps=10)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    assert made[0].buckets == [16, 64] and made[0].row_buckets == [1, 4]
    assert sorted(set(rows)) == [(1, 1), (2, 4), (3, 4)]  # each step ran the smallest row bucket
    assert counter.frame_count == 4  # one graph per pair of buckets, all built by warm_up


def test_static_decode_past_the_pool_is_one_clear_error():
    """A row already at max_len gets a sentence, not a bare StopIteration from the bucket search."""
    from minimoe.infer.slots import SlotPool
    from minimoe.infer.static import StaticDecode

    pool = SlotPool(tiny_model(), slots=1, max_len=16)
    prefill_together(pool, [list(range(1, 16))], budget=16)
    static = StaticDecode(pool, compile=False)
    static.decode(torch.tensor([1]))  # the 16th and last position
    with pytest.raises(MinimoeError, match="position 17, past the pool's 16"):
        static.decode(torch.tensor([1]))


def test_static_decode_row_buckets_are_one_eight_and_every_slot():
    """One request alone runs one row and a few run eight, not every slot of a large pool."""
    from minimoe.infer.slots import SlotPool
    from minimoe.infer.static import StaticDecode

    model = tiny_model()
    for slots, want in ((1, [1]), (4, [1, 4]), (12, [1, 8, 12])):
        assert StaticDecode(SlotPool(model, slots, max_len=16), compile=False).row_buckets == want


def test_warmed_static_decodes_of_different_models_each_run_their_own_graphs():
    """Two warmed steps over models of different widths and depths share the compiled functions (so
    graphs of both sit in one cache); called in turns, each runs its own model's graphs: the greedy
    tokens of each equal its model's own."""
    from minimoe.infer.slots import SlotPool
    from minimoe.infer.static import StaticDecode, static_greedy

    torch._dynamo.reset()
    models = [tiny_model(), tiny_model(seed=1, hidden_size=48, num_hidden_layers=3)]
    want = [greedy_no_cache(m, PROMPTS[1], 5) for m in models]
    steps = [_warmed(StaticDecode(SlotPool(m, 2, max_len=40), backend="eager")) for m in models]
    for _ in range(2):
        for static, tokens in zip(steps, want):
            assert static_greedy(static, [PROMPTS[1]], 5).tolist() == [tokens]
    torch._dynamo.reset()


def test_many_static_decodes_in_one_process_stay_under_dynamo_recompile_limit():
    """Every StaticDecode adds graphs of the same functions (one per bucket and shape); a process
    holding several (a bench: one per batch x length) must not hit dynamo's recompile limit, which
    fullgraph=True makes an error."""
    from minimoe.infer.slots import SlotPool
    from minimoe.infer.static import StaticDecode, static_greedy

    torch._dynamo.reset()
    model = tiny_model(num_hidden_layers=2)
    want = greedy_no_cache(model, PROMPTS[0], 6)
    for slots in (1, 3):  # 1 and 2 row buckets
        for max_len in (20, 64):  # 1 and 2 position buckets: 9 graphs of the one-token step, past the 8
            static = StaticDecode(SlotPool(model, slots, max_len=max_len), backend="eager")
            static.warm_up()
            assert static_greedy(static, [PROMPTS[0]] * slots, 6).tolist() == [want] * slots


def _compiled_moe(moe):
    """The MoE layer as the compiled decode step traces it: one graph (fullgraph), no gradients."""
    torch._dynamo.reset()
    step = torch.compile(moe, backend="eager", fullgraph=True)
    return lambda x: step(x)[0]


def _force_expert_kernel(monkeypatch, kernel: str) -> list:
    """Make the traced MoE layer take `kernel` ("gathered": its pairs unsorted through `gathered_pairs`,
    or "selected": sorted through the opaque operator) whatever its rows, and count the calls to the
    gathered kernel (the list grows at every call, tracing included)."""
    import minimoe.model.experts as experts

    calls = []
    gathered = experts.gathered_pairs
    monkeypatch.setattr(experts, "GATHER_ROWS_PER_EXPERT", 10**6 if kernel == "gathered" else 0)
    monkeypatch.setattr(experts, "gathered_pairs", lambda *a: calls.append(1) or gathered(*a))
    return calls


@pytest.mark.parametrize("kernel", ["gathered", "selected"])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("T", [1, 2, 5])
def test_traced_moe_equals_the_eager_layer(seed, T, kernel, monkeypatch):
    """Traced by torch.compile without gradients (as in the compiled decode step), the MoE layer runs
    its experts in one graph, through `gathered_pairs` (few rows, no sort) or the `selected_experts`
    operator; either equals the eager layer, fp64, with a selection bias such as training leaves."""
    calls = _force_expert_kernel(monkeypatch, kernel)
    model = tiny_model(seed=seed)
    moe = next(b.mlp for b in model.layers if b.is_moe)
    moe.gate.e_score_correction_bias.normal_()
    x = torch.randn(
        1, T, model.cfg.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)
    )
    with torch.no_grad():
        want, _ = moe(x)
        torch.testing.assert_close(_compiled_moe(moe)(x), want)
    assert bool(calls) == (kernel == "gathered")


@pytest.mark.parametrize("kernel", ["gathered", "selected"])
def test_traced_experts_read_only_the_selected_experts(kernel, monkeypatch):
    """Both traced decode kernels run the experts that have rows and no others (the saving at batch
    1): with NaN in every expert nobody selected, the traced layer's output stays finite and equals
    the eager one."""
    _force_expert_kernel(monkeypatch, kernel)
    model = tiny_model(seed=3)
    moe = next(b.mlp for b in model.layers if b.is_moe)
    x = torch.randn(
        1, 1, model.cfg.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(3)
    )
    with torch.no_grad():
        want, _ = moe(x)
        chosen = moe.gate(x).topk_idx.reshape(-1).tolist()
        for e in set(range(moe.n_experts)) - set(chosen):
            for w in (moe.experts.gate_proj, moe.experts.up_proj, moe.experts.down_proj):
                w[e] = float("nan")
        torch.testing.assert_close(_compiled_moe(moe)(x), want)


@pytest.mark.parametrize("attn_type, seed", [("mla", 0), ("gqa", 1)])
def test_static_verify_and_draft_equal_the_pooled_ones(attn_type, seed):
    """Self-speculation's two calls at fixed shapes (`StaticDecode.forward` over [token, draft] per
    row, `StaticDecode.draft` through the MTP module) against the pool's own, on the same cache: logits,
    hidden states and draft logits equal, with rows accepting 2 or 1 tokens and a row leaving."""
    from minimoe.infer.slots import SlotPool
    from minimoe.infer.static import StaticDecode

    model = tiny_model(attn_type, seed=seed)
    pool = SlotPool(model, slots=4, mtp=True, prefill_rows=3)
    static = StaticDecode(pool, compile=False)
    prefill_together(pool, PROMPTS[:3], budget=12, tokens=[1, 1, 1])
    g = torch.Generator().manual_seed(seed)
    for step in range(4):
        if step == 2:
            pool.remove(0)
        n = pool.n
        tokens = torch.randint(0, model.cfg.vocab_size, (n, 2), generator=g)
        next_ids = torch.randint(0, model.cfg.vocab_size, (n, 2), generator=g)
        take = torch.randint(0, 2, (n,), generator=g)
        want_logits, want_hidden = pool.forward(tokens)
        want_draft = pool.draft(want_hidden, next_ids, take)
        logits, hidden = static.forward(tokens)
        torch.testing.assert_close(logits, want_logits)
        torch.testing.assert_close(hidden, want_hidden)
        torch.testing.assert_close(static.draft(hidden, next_ids, take), want_draft)
        want = pool.speculate(tokens)  # the verify forward and the draft in one call (one graph)
        got = static.speculate(tokens)
        for name in want._fields:
            torch.testing.assert_close(getattr(got, name), getattr(want, name), msg=name)
        pool.advance((take + 1).tolist())


@pytest.mark.parametrize("attn_type", ["mla", "gqa"])
def test_static_two_token_steps_take_the_bucket_that_holds_both(attn_type):
    """A row one position short of the first position bucket (16): its one-token step fits there, its
    verify and draft steps over two tokens do not and take the next bucket, so the second token
    attends to itself; fixed-shape `speculate`, `draft` and `forward` equal the pooled ones."""
    from minimoe.infer.slots import SlotPool
    from minimoe.infer.static import StaticDecode

    model = tiny_model(attn_type, seed=4)
    pool = SlotPool(model, slots=2, mtp=True)
    static = StaticDecode(pool, compile=False)
    prompt = torch.randint(
        0, model.cfg.vocab_size, (15,), generator=torch.Generator().manual_seed(4)
    ).tolist()
    prefill_together(pool, [prompt], budget=16, tokens=[1])
    assert static.buckets[0] == 16 and pool.lengths == [15]
    tokens = torch.tensor([[7, 9]])
    want = pool.speculate(tokens)
    got = static.speculate(tokens)
    for name in want._fields:
        torch.testing.assert_close(getattr(got, name), getattr(want, name), msg=name)
    next_ids, take = torch.tensor([[3, 5]]), torch.tensor([1])
    want_draft = pool.draft(want.hidden, next_ids, take)
    torch.testing.assert_close(static.draft(want.hidden, next_ids, take), want_draft)
    # the two-token forward of a row that samples (then `draft`, deciding on the host) too
    for got, want in zip(static.forward(tokens), pool.forward(tokens)):
        torch.testing.assert_close(got, want)


def test_greedy_speculation_drafts_from_what_greedy_commits():
    """A row whose draft is the argmax commits [draft, bonus] and drafts at position 1; a rejected
    row commits the corrected token, drafts at position 0, and pads position 1 with that token."""
    from minimoe.infer.slots import greedy_speculation

    V, seen = 6, {}
    best = torch.tensor([[2, 5], [3, 1], [0, 4]])  # the main model's argmax at each row's 2 positions
    logits = torch.nn.functional.one_hot(best, V).float()

    def forward(tokens):
        seen["tokens"] = tokens
        return logits, torch.zeros(3, 2, 4)

    def draft(hidden, next_ids, take):
        seen["next_ids"], seen["take"] = next_ids, take
        return torch.zeros(3, V)

    tokens = torch.tensor([[7, 2], [7, 4], [7, 0]])  # drafts: right, wrong, right
    out = greedy_speculation(forward, draft, tokens)
    assert out.best.tolist() == best.tolist()
    assert seen["take"].tolist() == [1, 0, 1]
    assert seen["next_ids"].tolist() == [[2, 5], [3, 3], [0, 4]]


def test_fused_speculation_drafts_what_the_two_calls_draft():
    """`SlotPool.speculate` against the engine's earlier two calls, with the next tokens chosen on
    the host from the verify logits: the same logits, argmax and draft logits, on a real model."""
    from minimoe.infer.slots import SlotPool

    model = tiny_model("mla", seed=3)
    pools = [SlotPool(model, slots=3, mtp=True, prefill_rows=3) for _ in range(2)]
    for pool in pools:
        prefill_together(pool, PROMPTS[:3], budget=12, tokens=[1, 1, 1])
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        first = torch.randint(0, model.cfg.vocab_size, (3, 1), generator=g)
        logits, hidden = pools[0].forward(torch.cat([first, first], 1))
        right = logits[:, 0].argmax(-1)  # row 0 drafts right, the others the wrong token
        drafts = torch.where(torch.arange(3) == 0, right, (right + 1) % model.cfg.vocab_size)
        tokens = torch.stack([first[:, 0], drafts], 1)
        logits, hidden = pools[0].forward(tokens)
        best = logits.argmax(-1).tolist()
        new = [[b[0], b[1]] if b[0] == d else [b[0]] for b, d in zip(best, drafts.tolist())]
        next_ids = torch.tensor([t if len(t) == 2 else t * 2 for t in new])
        take = torch.tensor([len(t) - 1 for t in new])
        want = pools[0].draft(hidden, next_ids, take)
        spec = pools[1].speculate(tokens)
        assert spec.best.tolist() == best
        torch.testing.assert_close(spec.logits, logits)
        torch.testing.assert_close(spec.draft_logits, want)
        for pool in pools:
            pool.advance([len(t) for t in new])


@pytest.mark.parametrize("attn_type, seed, prefill_rows", [("mla", 0, 1), ("gqa", 1, 3), ("mla", 2, 4)])
def test_static_greedy_equals_full_recompute(attn_type, seed, prefill_rows):
    """`static_greedy` (what `minimoe bench --compiled-decode` times): every prompt's greedy tokens
    equal re-running the whole forward at every step, in a pool sized exactly to the longest prompt
    plus its new tokens, whether the prompts (of different lengths) are prefilled one at a time, in
    groups or all together; the pool is emptied, so a second call on it gives the same tokens."""
    from minimoe.infer.slots import SlotPool
    from minimoe.infer.static import StaticDecode, static_greedy

    model = tiny_model(attn_type, seed=seed)
    new = 7
    want = [greedy_no_cache(model, p, new) for p in PROMPTS]
    pool = SlotPool(model, len(PROMPTS), max_len=max(map(len, PROMPTS)) + new - 1, prefill_rows=prefill_rows)
    static = StaticDecode(pool, compile=False)
    for _ in range(2):
        assert static_greedy(static, PROMPTS, new).tolist() == want
        assert static.pool.n == 0
    with pytest.raises(ValueError, match="hold every prompt"):
        static_greedy(static, PROMPTS, new + 1)


@pytest.mark.slow
def test_compiled_speculative_step_equals_the_eager_one_as_rows_leave():
    """torch.compile (inductor; products of up to eight rows generated as reductions) of the fixed-shape
    greedy speculative step, which holds the verify forward and the MTP draft in one graph, against the
    eager pool: three rows of different lengths in a 4-slot pool, then two as a row leaves, each row
    verifying its next token and a draft (8 token rows, the most generated as reductions, padding rows
    included) with the draft right (the true next token) on alternate rows and steps and wrong on the
    others: logits and hidden states close, tokens identical, draft logits close. Then one row decodes
    two tokens through the one-token step (one-row reductions), against the pool's. Two inductor graphs
    (a cold compile is about 20 s each on 2 cores); the others (other buckets) are the eager-backend
    tests' part."""
    from minimoe.infer.slots import SlotPool
    from minimoe.infer.static import StaticDecode

    torch._dynamo.reset()
    model = tiny_model(mtp_depth=1, num_hidden_layers=2)  # a dense layer and a MoE layer
    pools = [SlotPool(model, 4, max_len=16, prefill_rows=3, mtp=True) for _ in range(2)]
    static = StaticDecode(pools[1])
    for pool in pools:  # the first tokens given: the prefill writes the MTP module's cache for them
        prefill_together(pool, PROMPTS[:3], budget=12, tokens=[7, 30, 2])
    nxt = torch.tensor([7, 30, 2])
    for step in range(3):
        if step == 1:  # row 0 leaves: the last row moves into it
            for pool in pools:
                pool.remove(0)
            nxt = torch.stack([nxt[2], nxt[1]])
        true_next = pools[0].forward(nxt.view(-1, 1))[0][:, 0].argmax(-1)  # written, not committed
        right = (torch.arange(len(nxt)) + step) % 2 == 0
        tokens = torch.stack([nxt, torch.where(right, true_next, (true_next + 1) % 97)], dim=1)
        want, got = pools[0].speculate(tokens), static.speculate(tokens)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)
        assert torch.equal(got.best, want.best)
        accepted = want.best[:, 0] == tokens[:, 1]
        assert accepted.tolist() == right.tolist()
        for pool in pools:
            pool.advance([2 if a else 1 for a in accepted.tolist()])
        nxt = torch.where(accepted, want.best[:, 1], want.best[:, 0])
    assert static._calls == 3 and max(pools[1].lengths) <= 16
    # the one-token step of one row (one-row reductions: the row bucket of 1), as plain decoding runs it
    for pool in pools:
        pool.remove(1)
    nxt = nxt[:1]
    for _ in range(2):
        want, got = pools[0].decode(nxt), static.decode(nxt)
        torch.testing.assert_close(got, want)
        assert pools[0].lengths == pools[1].lengths
        nxt = want.argmax(-1)
    torch._dynamo.reset()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_few_row_products_equal_the_matmul(dtype):
    """`few_row_mm` and its addmm, the compiled CPU step's decomposition of few-row products by a
    weight's transpose (what F.linear makes; up to `FEW_ROWS` in the step, up to `rows` as asked),
    run eagerly: the product of the same (rounded) operands in fp64, returned in their dtype; other
    products (more rows, an operand that is not a transposed weight with contiguous rows) are left to
    inductor's BLAS call."""
    from minimoe.infer.inductor_cpu import FEW_ROWS, _few_row_addmm, few_row_mm

    g = torch.Generator().manual_seed(0)
    w = torch.randn(37, 19, generator=g, dtype=torch.float64).to(dtype)
    bias = torch.randn(37, generator=g, dtype=torch.float64).to(dtype)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    for M in (1, 3, 8):
        a = torch.randn(M, 19, generator=g, dtype=torch.float64).to(dtype)
        want = a.double() @ w.double().t()
        got = few_row_mm(a, w.t(), rows=M)
        assert got.dtype == dtype and got.shape == (M, 37)
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
        got = _few_row_addmm(bias, a, w.t(), beta=2, alpha=0.5, rows=M)
        torch.testing.assert_close(got.double(), 2 * bias.double() + 0.5 * want, rtol=tol, atol=tol)
    a = torch.randn(FEW_ROWS + 1, 19, dtype=torch.float64).to(dtype)
    assert few_row_mm(a, w.t()) is NotImplemented
    assert _few_row_addmm(bias, a, w.t()) is NotImplemented
    assert few_row_mm(a[:1], w.t().contiguous()) is NotImplemented
    assert few_row_mm(a[:0], w.t()) is NotImplemented  # no rows: nothing to stack


def test_compiled_few_row_products_with_a_bias_no_rows_or_dynamic_rows():
    """Through `cpu_inductor`: a bf16 linear layer with a bias (the addmm decomposition) gives what eager
    gives; a product of no rows compiles; and a row count marked dynamic is left to the BLAS (a reduction
    per row would pin it), so one graph serves 3 and 6 rows."""
    import functools

    from torch.nn import functional as F

    from minimoe.infer.inductor_cpu import cpu_inductor

    g = torch.Generator().manual_seed(0)
    w, b, x = torch.randn(40, 24, generator=g), torch.randn(40, generator=g), torch.randn(6, 24, generator=g)

    def linear(x, w, b):
        return F.linear(x, w, b)

    backend = functools.partial(cpu_inductor, few_rows=8)
    torch._dynamo.reset()
    wb, bb, xb = w.bfloat16(), b.bfloat16(), x.bfloat16()
    got = torch.compile(linear, backend=backend, dynamic=False)(xb[:3], wb, bb)
    torch.testing.assert_close(got.float(), F.linear(xb[:3], wb, bb).float(), rtol=2e-2, atol=2e-2)
    torch._dynamo.reset()
    got = torch.compile(linear, backend=backend, dynamic=False)(x[:0], w, b)
    assert got.shape == (0, 40)
    torch._dynamo.reset()
    fn = torch.compile(linear, backend=backend)
    for rows in (3, 6):
        xr = x[:rows].clone()
        torch._dynamo.mark_dynamic(xr, 0)
        torch.testing.assert_close(fn(xr, w, b), F.linear(xr, w, b), rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


def test_compiled_cpu_step_generates_its_few_row_products():
    """`cpu_inductor`, the compiled CPU decode step's backend: a linear layer of one or a few rows
    becomes reductions inductor generates (no BLAS call left in the code) with the layer's values; with
    `few_rows=0` it stays a BLAS call. Compiled plainly, then with the decomposition, then plainly again
    in one process: AOTAutograd's cache does not key decompositions, so neither may serve the other."""
    import functools
    import re

    from torch._inductor.utils import run_and_get_code
    from torch.nn import functional as F

    from minimoe.infer.inductor_cpu import cpu_inductor

    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(300, 64, generator=g), torch.randn(5, 64, generator=g)

    def linear(x, w):
        return F.linear(x, w)

    for rows in (1, 5):
        blas = []
        for few_rows in (0, rows, 0):
            torch._dynamo.reset()
            backend = functools.partial(cpu_inductor, few_rows=few_rows)
            fn = torch.compile(linear, backend=backend, dynamic=False)
            y, code = run_and_get_code(fn, x[:rows], w)
            torch.testing.assert_close(y, F.linear(x[:rows], w), rtol=1e-5, atol=1e-5)
            code = "\n".join(code)
            blas.append("aoti_torch_cpu_mm_out" in code)
            if few_rows:
                # one generated loop over the weight's rows with an accumulator per input row (a
                # (N, M, K) product-and-sum instead vectorises over the M rows: one accumulator, slow)
                assert len(set(re.findall(r"void\s+(cpp_fused\w+)\(", code))) == 1
                assert set(re.findall(r"\btmp_acc(\d+)\b", code)) == {str(m) for m in range(rows)}
        assert blas == [True, False, True]
    torch._dynamo.reset()


def test_max_seq_len_bounds_generation():
    model = tiny_model()  # max_position_embeddings 64
    out = list(generate_tokens(model, list(range(1, 61)), 50, temperature=0.0))
    assert len(out) == 4
    assert list(generate_tokens(model, [1], 0)) == []


# ----------------------------------------------------------------------------------- speculative


def expected_drafts(
    ref_logits: torch.Tensor, seq: list[int], n_prompt: int, budget: int
) -> tuple[list, int, int]:
    """Greedy speculative decoding's draft positions and its drafted / accepted counts, replayed from
    the reference MTP logits: the draft made when the last committed token sits at j + 1 is the argmax
    of the MTP logits at j, and it is accepted when it equals token j + 2."""
    j, produced, positions, drafted, accepted = n_prompt - 1, 1, [], 0, 0
    while produced < budget:
        positions.append(j)
        step = 1
        if budget - produced >= 2:
            drafted += 1
            if int(ref_logits[j].argmax()) == seq[j + 2]:
                accepted, step = accepted + 1, 2
        produced, j = produced + step, j + step
    return positions, drafted, accepted


def speculative_against_reference(model, prompt: list[int], n: int, monkeypatch) -> tuple[int, int]:
    """Greedy speculative decoding equals plain greedy, every draft's MTP logits equal the MTP module
    fed as in training (tests/reference.py) on the committed tokens, and the drafted / accepted counts
    equal a replay from those logits. Returns (drafted, accepted)."""
    import minimoe.infer.speculative as spec_mod

    real_step, drafts = spec_mod.mtp_step, []

    def recording_step(model, cache, hidden, next_ids):
        logits = real_step(model, cache, hidden, next_ids)
        drafts.append((cache.pos - 1, logits[0]))  # the MTP logits at the last committed position
        return logits

    monkeypatch.setattr(spec_mod, "mtp_step", recording_step)
    stats = GenerationStats()
    spec = list(generate_tokens(model, prompt, n, temperature=0.0, speculative=True, stats=stats))
    monkeypatch.setattr(spec_mod, "mtp_step", real_step)
    assert spec == greedy_no_cache(model, prompt, n)
    seq = prompt + spec
    with torch.no_grad():
        ids = torch.tensor([seq])
        ref = mtp_reference(model, ids, model(ids).hidden)[0][0]  # (T - 1, V)
    positions, drafted, accepted = expected_drafts(ref, seq, len(prompt), n)
    assert [p for p, _ in drafts] == positions
    for p, logits in drafts:
        torch.testing.assert_close(logits, ref[p])
    assert (stats.drafted, stats.accepted, stats.new_tokens) == (drafted, accepted, n)
    return drafted, accepted


@pytest.mark.parametrize("attn_type,mtp_depth", [("mla", 1), ("gqa", 1), ("mla", 2)])
def test_speculative_equals_greedy_random_weights(attn_type, mtp_depth, monkeypatch):
    model = tiny_model(attn_type, mtp_depth=mtp_depth)
    counts = [speculative_against_reference(model, prompt, 24, monkeypatch) for prompt in PROMPTS]
    # 22 draft chances per prompt (a draft needs 2 tokens of budget left; an accepted one uses up the
    # next chance), nearly all rejected by a random model: the rejecting branch runs here, the accepting
    # one in the next test and the trained one
    drafted, accepted = sum(d for d, _ in counts), sum(a for _, a in counts)
    assert drafted + accepted == 88 and accepted < 8
    # with a stop token and a repetition penalty too
    plain = list(generate_tokens(model, PROMPTS[1], 24, 0.0, repetition_penalty=1.3))
    stop = (plain[7],)
    want = list(generate_tokens(model, PROMPTS[1], 24, 0.0, stop_ids=stop, repetition_penalty=1.3))
    got = list(
        generate_tokens(model, PROMPTS[1], 24, 0.0, stop_ids=stop, repetition_penalty=1.3, speculative=True)
    )
    assert got == want and len(got) < 24


def test_speculative_accepts_when_the_draft_is_right():
    """All-zero weights make every logit 0, so the main model and the MTP head both pick token 0:
    every draft is accepted, which checks the two-tokens-per-forward bookkeeping."""
    model = tiny_model()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # every logit 0: argmax is token 0 everywhere, for the main model and MTP alike
    stats = GenerationStats()
    out = list(generate_tokens(model, [3, 4], 11, temperature=0.0, speculative=True, stats=stats))
    assert out == [0] * 11
    assert stats.acceptance_rate == 1.0
    # 1 prefill + 5 verify steps of 2 tokens each: 11 tokens in 6 forwards
    assert stats.forward_calls == 6 and stats.drafted == 5


def test_speculative_prefill_computes_the_last_positions_logits_only():
    """The prompt's forward feeds every position's hidden state to the MTP prefill but reads only the
    last position's logits: the head runs on that one (a (P, V) tensor would be gigabytes at a large
    vocabulary and a long prompt)."""
    model = tiny_model()
    shapes = []
    hook = model.lm_head.register_forward_hook(lambda m, args, out: shapes.append(tuple(out.shape)))
    try:
        next(iter(generate_tokens(model, list(range(1, 41)), 4, temperature=0.0, speculative=True)))
    finally:
        hook.remove()
    assert shapes[0] == (1, 1, model.cfg.vocab_size), shapes


def test_speculative_runs_to_the_last_position_and_counts_both_caches():
    """Near the end of the context, greedy speculative decoding gives plain greedy decoding's tokens
    up to the last position (60 + 4 = 64), and its stats count the main and MTP caches' bytes, up to
    the last committed position (every token but the last one is in the cache)."""
    model = tiny_model()  # max_position_embeddings 64
    prompt = list(range(1, 61))
    stats = GenerationStats()
    out = list(generate_tokens(model, prompt, 50, temperature=0.0, speculative=True, stats=stats))
    assert out == greedy_no_cache(model, prompt, 4)
    per_token = model.cache_bytes_per_token(torch.float64) * 4 // 3  # 3 layers and the MTP block
    assert stats.cache_bytes_allocated == per_token * 64
    assert stats.cache_bytes_used == per_token * 63


def test_speculative_sampling_keeps_the_distribution():
    """Draft d ~ q, accept with min(1, p/q), else resample from max(p - q, 0): the result is ~ p."""
    from minimoe.infer.speculative import verify_draft

    logits = torch.tensor([[2.0, 0.5, 0.0, -1.0, 1.0]])  # p
    q = torch.tensor([[0.05, 0.6, 0.05, 0.2, 0.1]])  # a poor draft distribution
    params = SamplingParams(temperature=1.0)
    gen = torch.Generator().manual_seed(0)
    n, counts = 6000, torch.zeros(5)
    drafts = torch.multinomial(q[0], n, replacement=True, generator=gen).tolist()
    accepted = 0
    for d in drafts:
        ok, tok = verify_draft(d, q, logits, params, None, gen)
        counts[tok] += 1
        accepted += ok
    p = logits.softmax(-1)[0]
    assert (counts / n - p).abs().max() < 0.03  # ~5 standard errors; wrong rules miss by > 0.1
    assert abs(accepted / n - torch.minimum(p, q[0]).sum()) < 0.03  # P(accept) = sum min(p, q)
    # end to end: seeded speculative sampling is reproducible and stays inside top-k
    model = tiny_model()
    kw = dict(temperature=1.0, top_k=3, seed=5, speculative=True)
    a = list(generate_tokens(model, PROMPTS[1], 16, **kw))
    assert a == list(generate_tokens(model, PROMPTS[1], 16, **kw)) and len(a) == 16


def bigram_model(noise: float) -> Transformer:
    """A model whose blocks add nothing (all their weights 0) and whose head is the embedding: the main
    model's logits depend on the last token only, and the MTP module's draft for the token after next
    sees that token plus `noise` times a random mix of the last one, so its guesses are often, but not
    always, the main model's."""
    torch.manual_seed(0)
    cfg = tiny_cfg(
        num_hidden_layers=1, first_k_dense_replace=1, initializer_range=0.5, tie_word_embeddings=True
    )
    model = Transformer(cfg)
    d = model.cfg.hidden_size
    with torch.no_grad():
        for p in [*model.layers.parameters(), *model.mtp[0].block.parameters()]:
            p.zero_()
        model.mtp[0].eh_proj.weight.copy_(torch.cat([torch.eye(d), noise * torch.randn(d, d)], 1))
    return model.double().eval()


def test_greedy_speculation_with_a_repetition_penalty_equals_greedy():
    """The penalty sees the prompt, the draft before its bonus token and the corrected token after a
    rejection: greedy speculative decoding commits plain greedy decoding's tokens, with drafts both
    accepted and rejected."""
    model = bigram_model(0.1)
    stats = GenerationStats()
    for prompt in PROMPTS:
        kw = dict(temperature=0.0, repetition_penalty=5.0)
        want = list(generate_tokens(model, prompt, 20, **kw))
        assert list(generate_tokens(model, prompt, 20, speculative=True, stats=stats, **kw)) == want
    assert 0 < stats.accepted < stats.drafted


def test_speculative_needs_mtp():
    with pytest.raises(MinimoeError, match="MTP"):
        list(generate_tokens(tiny_model(mtp_depth=0), [1], 4, speculative=True))


# ------------------------------------------------------------------------------------ beam search


@pytest.mark.parametrize("attn_type", ["mla", "gqa"])
def test_one_beam_is_greedy(attn_type):
    model = tiny_model(attn_type)
    for prompt in PROMPTS[:2]:
        greedy = list(generate_tokens(model, prompt, 15, temperature=0.0))
        (best,) = beam_search(model, prompt, num_beams=1, max_new_tokens=15)
        assert best.tokens == greedy and not best.finished
        stop = (greedy[5],)  # generation ends at its first occurrence, which is not included
        (best,) = beam_search(model, prompt, num_beams=1, max_new_tokens=15, stop_ids=stop)
        assert best.tokens == greedy[: greedy.index(stop[0])] and best.finished


def test_beams_find_a_likelier_sequence_than_greedy():
    # tolerance 1e-6, not fp64 round-off: absorbed MLA decoding takes its softmax in fp32
    model = tiny_model()
    for prompt in PROMPTS:
        greedy = list(generate_tokens(model, prompt, 2, temperature=0.0))
        best = beam_search(model, prompt, num_beams=3, max_new_tokens=2, length_penalty=0.0)[0]
        # with 2 tokens the beam holds greedy's first token, so this is guaranteed
        assert best.logprob >= sequence_logprob(model, prompt, greedy) - 1e-6
        greedy = list(generate_tokens(model, prompt, 12, temperature=0.0))
        hyps = beam_search(model, prompt, num_beams=4, max_new_tokens=12, length_penalty=0.0)
        assert len(hyps) == 4 and hyps[0].score >= hyps[-1].score
        assert abs(hyps[0].logprob - sequence_logprob(model, prompt, hyps[0].tokens)) < 1e-6
        assert hyps[0].logprob >= sequence_logprob(model, prompt, greedy) - 1e-6


@pytest.mark.parametrize("attn_type", ["mla", "gqa"])
def test_beam_search_equals_an_exhaustive_reference(attn_type):
    """Without stop tokens, beam search keeps the n likeliest extensions of the n beams at every step;
    the reference scores every (beam, token) pair with an uncached forward. Only the prompt is a
    beam at the start: n copies of it would fill the beams with duplicates."""
    model = tiny_model(attn_type, seed=3)
    n, steps, V = 3, 5, model.cfg.vocab_size
    for prompt in PROMPTS[:3]:
        beams: list[tuple[list[int], float]] = [([], 0.0)]
        with torch.no_grad():
            for _ in range(steps):
                cand = []
                for seq, lp in beams:
                    logp = model(torch.tensor([prompt + seq])).logits[0, -1].double().log_softmax(-1)
                    cand += [(seq + [t], lp + float(logp[t])) for t in range(V)]
                beams = sorted(cand, key=lambda c: -c[1])[:n]
        hyps = beam_search(model, prompt, num_beams=n, max_new_tokens=steps, length_penalty=0.0)
        assert [h.tokens for h in hyps] == [seq for seq, _ in beams]
        assert all(abs(h.logprob - lp) < 1e-6 for h, (_, lp) in zip(hyps, beams))


def test_length_penalty_prefers_longer_hypotheses():
    model = tiny_model()
    stop = (list(generate_tokens(model, PROMPTS[0], 20, temperature=0.0))[2],)
    short = beam_search(model, PROMPTS[0], 4, 20, length_penalty=0.0, stop_ids=stop)[0]
    long = beam_search(model, PROMPTS[0], 4, 20, length_penalty=3.0, stop_ids=stop)[0]
    assert len(long.tokens) >= len(short.tokens)


def reference_beam_search(
    model, prompt, n, steps, length_penalty, stop
) -> list[tuple[list[int], float, float]]:
    """Beam search by its definition (HF's, early_stopping=True), with uncached forwards: each step ranks
    every (beam, token) extension; of the best 2n, a stop token among the first n ends a hypothesis
    (scored over its tokens and the stop token) and the others fill the n beams; the search ends when n
    hypotheses have ended, or at the budget, where the live beams compete too. Returns (tokens,
    logprob, score), best score first."""
    beams: list[tuple[list[int], float]] = [([], 0.0)]
    done = []
    for _ in range(steps):
        cand = []
        with torch.no_grad():
            for seq, lp in beams:
                logp = model(torch.tensor([prompt + seq])).logits[0, -1].double().log_softmax(-1)
                cand += [(seq, t, lp + float(logp[t])) for t in range(model.cfg.vocab_size)]
        cand.sort(key=lambda c: -c[2])
        beams = []
        for rank, (seq, t, lp) in enumerate(cand[: 2 * n]):
            if t in stop:
                if rank < n:
                    done.append((seq, lp, lp / (len(seq) + 1) ** length_penalty))
            elif len(beams) < n:
                beams.append((seq + [t], lp))
        if len(done) >= n:
            break
    else:
        done += [(seq, lp, lp / len(seq) ** length_penalty) for seq, lp in beams]
    return sorted(done, key=lambda h: -h[2])[:n]


@pytest.mark.parametrize("length_penalty", [0.0, 0.5, 1.0])
def test_beam_search_with_stop_tokens_equals_the_reference(length_penalty):
    """Hypotheses that end on a stop token and ones that run out of budget, ranked by
    logprob / length ** length_penalty, where the length counts the stop token."""
    model = tiny_model(seed=3)
    n, steps = 3, 6
    kinds = set()
    for prompt in PROMPTS[:3]:
        greedy = list(generate_tokens(model, prompt, steps, temperature=0.0))
        # a few stop tokens, then a quarter of the vocabulary (stop candidates in the top 2n but not the top n)
        for stop in (tuple(greedy[1:4]), tuple(range(0, model.cfg.vocab_size, 4))):
            want = reference_beam_search(model, prompt, n, steps, length_penalty, stop)
            hyps = beam_search(model, prompt, n, steps, length_penalty=length_penalty, stop_ids=stop)
            assert [h.tokens for h in hyps] == [seq for seq, _, _ in want], stop
            for h, (_, lp, score) in zip(hyps, want):
                assert abs(h.logprob - lp) < 1e-6 and abs(h.score - score) < 1e-6
                kinds.add(h.finished)
    assert kinds == {True, False}


# ----------------------------------------------------------------------------------- stop strings


def test_text_stream_cuts_at_stop_strings_and_holds_back_prefixes():
    tok = Tokenizer.byte()
    ts = TextStream(tok.decode, stop=["END", "\n\n"])
    pieces = [ts.push(t) for t in tok.encode("abc EN")]
    assert "".join(pieces) == "abc "  # "EN" may become "END": held back
    pieces = [ts.push(t) for t in tok.encode("X more END tail")]
    assert "".join(pieces) == "ENX more " and ts.stopped and ts.text == "abc ENX more "
    # multi-byte characters are only released once complete
    ts = TextStream(tok.decode)
    out = [ts.push(t) for t in "é!".encode()]
    assert out == ["", "é", "!"]


CONTEXT_EOS = "<|endoftext|>"
CONTEXT_TEXTS = ["hello hi there, be brief. don't go, bye and ciao!"] * 20


def _metaspace_and_wordpiece_decoders(texts: list[str]):
    """Two HF tokenizers whose decoders need context: SentencePiece-style (Metaspace: a token's leading
    space depends on whether it opens the text) and WordPiece (tokens joined with spaces, "##" pieces
    glued on, spaces before punctuation cleaned up)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    meta = HFTokenizer(models.BPE(unk_token="<unk>"))
    meta.pre_tokenizer, meta.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    specials = ["<unk>", CONTEXT_EOS]
    meta.train_from_iterator(
        texts, trainers.BpeTrainer(vocab_size=120, special_tokens=specials, show_progress=False)
    )
    wp = HFTokenizer(models.WordPiece(unk_token="[UNK]"))
    wp.pre_tokenizer, wp.decoder = pre_tokenizers.BertPreTokenizer(), decoders.WordPiece()
    specials = ["[UNK]", CONTEXT_EOS]
    wp.train_from_iterator(
        texts, trainers.WordPieceTrainer(vocab_size=120, special_tokens=specials, show_progress=False)
    )
    return {"metaspace": (meta, meta.decode), "wordpiece": (wp, wp.decode)}


def context_tokenizers(texts: list[str] = CONTEXT_TEXTS) -> dict[str, Tokenizer]:
    """minimoe Tokenizers over the Metaspace and WordPiece tokenizers above (EOS `<|endoftext|>`)."""
    return {
        name: Tokenizer("pretrained", hf, eos_token=CONTEXT_EOS)
        for name, (hf, _) in _metaspace_and_wordpiece_decoders(texts).items()
    }


def text_after(decode, prompt: list[int], new: list[int]) -> str:
    """What `new` adds to the text of `prompt`: the completion's text as `decode(prompt + new)` has it.
    No prompt, or one whose text ends inside a character, leaves `new` decoded alone."""
    head = decode(prompt)
    if not prompt or head.endswith("\ufffd"):
        return decode(new)
    whole = decode(prompt + new)
    assert whole.startswith(head), (head, whole)
    return whole[len(head) :]


def test_text_stream_decodes_a_window_and_gives_the_text_of_every_token():
    """After every push the stream's text is what its tokens add to the prompt's text (the decode of
    prompt and tokens beyond the prompt's own), for byte tokens (random bytes, invalid UTF-8 included),
    byte-level BPE and decoders that need context; a byte-level decoder's text is its tokens' own, as
    without a prompt. Each decode covers only the newest tokens: a long sequence does not cost more per
    token than a short one."""
    import random

    from minimoe.data.tokenizer import train_bpe

    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "mat", "é", "naïve", "日本", "🙂", "!", ".", ",", "?", "don't"]
    texts = [" ".join(rng.choice(words) for _ in range(40)) for _ in range(30)]
    byte = Tokenizer.byte()
    bpe = train_bpe(texts, vocab_size=300)
    cases = {
        "byte": (byte, byte.decode),
        "bpe": (bpe, bpe.decode),
        **_metaspace_and_wordpiece_decoders(texts),
    }
    for name, (tok, decode) in cases.items():
        for trial in range(6):
            if name == "byte" and trial % 2:
                ids = [rng.randrange(256) for _ in range(300)]  # any bytes, invalid UTF-8 included
            else:
                text = " ".join(rng.choice(words) for _ in range(120))
                ids = tok.encode(text) if name in ("byte", "bpe") else tok.encode(text).ids
            k = 0 if trial == 0 else rng.randrange(1, 40)  # the first trial has no prompt
            prompt, new = ids[:k], ids[k:]
            widths: list[int] = []

            def windowed(part: list[int], decode=decode, widths=widths) -> str:
                widths.append(len(part))
                return decode(part)

            ts = TextStream(windowed, context=prompt)
            pieces = []
            for i, t in enumerate(new):
                pieces.append(ts.push(t))
                assert ts.text == text_after(decode, prompt, new[: i + 1]), (name, trial, i)
                if name in ("byte", "bpe"):
                    assert ts.text == decode(new[: i + 1]), (name, trial, i)
            pieces.append(ts.flush())
            assert "".join(pieces) == text_after(decode, prompt, new), (name, trial)
            if not (name == "byte" and trial % 2):  # valid text settles at every whole character
                assert max(widths) <= 12 + CONTEXT_IDS, (name, trial, max(widths))
                assert max(widths[len(widths) // 2 :]) <= 12, (name, trial)  # the context long gone


def test_text_stream_gives_the_space_between_prompt_and_completion():
    """SentencePiece (Metaspace) and WordPiece decoders drop the space before the first token they
    decode: with the prompt as context the completion's text keeps it, for every split of a text into
    prompt and completion; a stop string that begins with that space matches at the completion's
    start. Without a prompt (or one of special tokens only, which decode to nothing) the text is the
    tokens' own. Special tokens among the new ones, which the decoder skips, change nothing: the token
    after them still gets its space, or glues on as a WordPiece "##" piece."""
    for name, tok in context_tokenizers().items():
        ids = tok.encode("hello hi there, be brief. don't go")
        joiner = [i for i in range(tok.vocab_size) if (tok.id_to_token(i) or "").startswith("##")][:1]
        assert joiner or name == "metaspace"
        for k in range(len(ids) + 1):
            prompt = ids[:k]
            skipped = [t for i in ids[k:] for t in (i, tok.eos_id)]
            for new in (ids[k:], skipped, ids[k:] + [tok.eos_id, *joiner]):
                want = text_after(tok.decode, prompt, new)
                for context in (prompt, [tok.eos_id] * 3 + prompt):
                    ts = TextStream(tok.decode, context=context)
                    pieces = [ts.push(t) for t in new] + [ts.flush()]
                    assert "".join(pieces) == ts.text == want, (name, k, new)
        hello = tok.encode("hello")
        rest = tok.encode("hello hi there")[len(hello) :]
        ts = TextStream(tok.decode, context=hello)
        assert "".join([ts.push(t) for t in rest] + [ts.flush()]) == " hi there", name
        for context in ((), [tok.eos_id]):
            ts = TextStream(tok.decode, context=context)
            assert "".join([ts.push(t) for t in rest] + [ts.flush()]) == "hi there", name
        for stop, text in ((" hi", ""), (" there", " hi"), ("hi", " ")):
            ts = TextStream(tok.decode, stop=[stop], context=hello)
            sent = [ts.push(t) for t in rest] + [ts.flush()]
            assert ts.stopped and "".join(sent) == ts.text == text, (name, stop)


def test_text_stream_decodes_the_whole_list_after_the_prompt_when_a_decoder_rewrites_text():
    """A decoder that rewrites text already decoded (here "a ." becomes "a.") makes the window's text
    differ from its settled chunk's: the stream then decodes all its tokens after the prompt's, so the
    text still continues the prompt (its space kept)."""
    pieces = {0: "\u2581hi", 1: "\u2581a\u2581", 2: "."}

    def decode(ids: list[int]) -> str:  # SentencePiece-style, with a clean-up before "."
        return "".join(pieces[i] for i in ids).replace("\u2581", " ").replace(" .", ".").removeprefix(" ")

    ts = TextStream(decode, context=[0])
    assert ts.push(1) == " a "
    ts.push(2)
    ts.flush()
    assert ts.text == text_after(decode, [0], [1, 2]) == " a."


def test_a_prompt_ending_inside_a_character_leaves_the_tokens_text_their_own():
    """A byte prompt cut inside a character gives no context (its text ends in U+FFFD): the completion's
    bytes decode alone, as without a prompt, so its text is what it was before contexts existed."""
    tok = Tokenizer.byte()
    data = "aé日🙂".encode()
    for k in range(1, len(data)):
        for c in range(k, len(data) + 1):
            prompt, new = list(data[:k]), list(data[k:c]) + list(b"ok")
            ts = TextStream(tok.decode, stop=["\ufffdo"], context=prompt)
            sent = "".join([ts.push(t) for t in new] + [ts.flush()])
            alone = TextStream(tok.decode, stop=["\ufffdo"])
            assert sent == "".join([alone.push(t) for t in new] + [alone.flush()]), (k, c)
            assert (ts.text, ts.stopped) == (alone.text, alone.stopped), (k, c)


class LetterTokenizer:
    """Token i is the letter chr(97 + i % 26); 96 is EOS. Every token decodes to exactly one character."""

    eos_id = 96

    def encode(self, text: str) -> list[int]:
        return [ord(c) - 97 for c in text]

    def decode(self, ids) -> str:
        return "".join(chr(97 + i % 26) for i in ids if i != self.eos_id)


def test_text_stream_finds_a_stop_string_that_starts_in_text_already_sent():
    """A decoder whose text is not prefix-stable (HF's clean_up_tokenization_spaces turns "a ." into
    "a.") can complete a stop string that begins inside text already handed out: the stream still
    stops there, and hands out nothing more."""
    pieces = {0: "x", 1: "a", 2: " ", 3: ".", 4: "b", 5: "y"}

    def decode(ids: list[int]) -> str:
        return "".join(pieces[i] for i in ids).replace(" .", ".")

    ts = TextStream(decode, stop=["a.b"])
    sent = [ts.push(t) for t in [0, 1, 2, 3, 4]]
    assert sent[:3] == ["x", "", "a "] and ts.stopped
    assert ts.push(5) == "" and ts.flush() == "" and "a.b" not in ts.text and "y" not in "".join(sent)


def test_text_stream_cuts_at_the_earliest_of_several_stop_strings_in_one_token():
    """One token can bring several stop strings at once: the text ends before the one that starts
    first, whatever their order in the list; an empty stop string is no stop at all."""
    pieces = {0: "ab", 1: "cBdAe", 2: "f"}

    def decode(ids: list[int]) -> str:
        return "".join(pieces[i] for i in ids)

    for stops in (["A", "B"], ["B", "A"], ["dA", "B"]):
        ts = TextStream(decode, stop=stops)
        sent = [ts.push(t) for t in (0, 1, 2)] + [ts.flush()]
        assert ts.stopped and ts.text == "abc" and "".join(sent) == "abc", stops
    ts = TextStream(decode, stop=["", "Z"])
    sent = [ts.push(t) for t in (0, 1, 2)] + [ts.flush()]
    assert not ts.stopped and "".join(sent) == ts.text == "abcBdAef"


def test_text_stream_holds_back_a_stop_prefix_while_a_character_is_incomplete():
    """A tail that could start a stop string stays held back while the next character is still being
    generated (the text ends in U+FFFD): "X" waits until "é" shows whether "Xé" was a stop."""
    decode = lambda ids: bytes(ids).decode("utf-8", errors="replace")  # noqa: E731
    ts = TextStream(decode, stop=["Xé"])
    sent = [ts.push(b) for b in "abXé!".encode()]
    assert "".join(sent) == "ab" and ts.stopped and ts.text == "ab"


def test_partial_stop_len_keeps_the_longest_prefix_over_all_stop_strings():
    """A later, shorter stop-string prefix does not shorten what an earlier stop string held back."""
    assert partial_stop_len("abXY", ["XYZ", "YQ"]) == 2
    ts = TextStream(lambda ids: "".join(map(chr, ids)), stop=["XYZ", "YQ"])
    sent = [ts.push(ord(c)) for c in "abXYZ"]
    assert "".join(sent) == "ab" and ts.text == "ab" and ts.stopped


def test_text_stream_holds_back_every_u_fffd_of_an_incomplete_character():
    """A decoder may spell each pending byte of an incomplete character as its own U+FFFD: all of
    them are held back, not just the last."""
    data = "日本".encode()

    def decode(ids: list[int]) -> str:
        raw = data[: len(ids)]
        text = raw.decode("utf-8", errors="ignore")
        return text + "\ufffd" * (len(raw) - len(text.encode()))

    ts = TextStream(decode)
    sent = [ts.push(i) for i in range(len(data))] + [ts.flush()]
    assert "\ufffd" not in "".join(sent) and "".join(sent) == "日本"


def test_stop_strings_in_generation():
    tok = LetterTokenizer()
    model = tiny_model()
    full = generate_text(model, tok, "ab", max_new_tokens=30, temperature=0.0, stop_ids=())
    stop = full[5:7]
    cut = generate_text(model, tok, "ab", max_new_tokens=30, temperature=0.0, stop_ids=(), stop=[stop])
    assert cut == full[: full.index(stop)]
    pieces = list(stream_text(model, tok, "ab", max_new_tokens=30, temperature=0.0, stop_ids=(), stop=[stop]))
    assert "".join(pieces) == cut
    (res,) = complete(model, tok, ["ab"], max_new_tokens=30, temperature=0.0, stop_ids=(), stop=[stop])
    assert res.text == cut and res.finish_reason == "stop"
    (res,) = complete(model, tok, ["ab"], max_new_tokens=30, temperature=0.0, stop_ids=())
    assert res.text == full and res.finish_reason == "length" and len(res.token_ids) == 30


def test_generated_text_continues_the_prompt_for_decoders_that_need_context():
    """stream_text, generate_text and complete (batched, beam search, speculative) give the text that the
    new tokens add to the prompt's, with the space SentencePiece and WordPiece decoders put between
    them; a stop string that begins with that space ends the completion at its start."""
    for name, tok in context_tokenizers().items():
        model = tiny_model(vocab_size=tok.vocab_size)
        prompts = ["hello", "hi there,", "be brief. don't", "bye and"]
        kw = dict(max_new_tokens=10, temperature=0.0, stop_ids=())
        batched = complete(model, tok, prompts, batch_size=3, **kw)
        spaced = []
        for prompt, res in zip(prompts, batched, strict=True):
            ids = tok.encode(prompt)
            want = text_after(tok.decode, ids, res.token_ids)
            assert res.text == want and len(res.token_ids) == 10, (name, prompt)
            assert "".join(stream_text(model, tok, prompt, **kw)) == want, (name, prompt)
            assert generate_text(model, tok, prompt, **kw) == want, (name, prompt)
            (spec,) = complete(model, tok, [prompt], speculative=True, **kw)
            assert (spec.text, spec.token_ids) == (want, res.token_ids), (name, prompt)
            (beam,) = complete(model, tok, [prompt], num_beams=2, **kw)
            assert beam.text == text_after(tok.decode, ids, beam.token_ids), (name, prompt)
            if want.startswith(" ") and len(want) > 1:
                spaced.append((prompt, want))
        assert spaced, name  # a completion that opens with a space, to stop at
        for prompt, want in spaced:
            stop = want[:2]
            assert "".join(stream_text(model, tok, prompt, stop=[stop], **kw)) == "", (name, prompt)
            for extra in ({}, {"num_beams": 2}, {"speculative": True}):
                if (
                    extra
                    and text_after(
                        tok.decode,
                        tok.encode(prompt),
                        complete(model, tok, [prompt], **extra, **kw)[0].token_ids,
                    )
                    != want
                ):
                    continue
                (res,) = complete(model, tok, [prompt], stop=[stop], **extra, **kw)
                assert (res.text, res.finish_reason) == ("", "stop"), (name, prompt, extra)


def test_complete_gives_a_short_prompt_its_budget_beside_one_that_fills_the_context():
    """A batch stops when its longest prompt fills the context: a short prompt batched with one a few
    tokens short of the context still gets all its new tokens, as alone."""
    tok = LetterTokenizer()
    model = tiny_model()
    ctx = model.cfg.max_position_embeddings
    prompts = ["ab", "c" * (ctx - 3)]
    kw = dict(max_new_tokens=10, temperature=0.0, stop_ids=())
    alone = [complete(model, tok, [p], **kw)[0] for p in prompts]
    together = complete(model, tok, prompts, batch_size=2, **kw)
    assert [len(r.token_ids) for r in alone] == [len(r.token_ids) for r in together] == [10, 3]
    assert [r.text for r in together] == [r.text for r in alone]
    assert [r.finish_reason for r in together] == ["length", "length"]


def test_complete_keeps_prompt_order_in_batches():
    tok = LetterTokenizer()
    model = tiny_model()
    prompts = ["amuchlongerprompt", "b", "", "mediumone"]
    kw = dict(max_new_tokens=8, temperature=0.0, stop_ids=())
    alone = [complete(model, tok, [p], **kw)[0].text for p in prompts]
    pieces: dict[int, str] = {}
    results = complete(
        model,
        tok,
        prompts,
        batch_size=3,
        on_text=lambda i, s: pieces.__setitem__(i, pieces.get(i, "") + s),
        **kw,
    )
    assert [r.text for r in results] == alone
    assert [pieces.get(i, "") for i in range(4)] == alone
    beams = complete(model, tok, prompts[:2], num_beams=2, **kw)
    assert all(r.score is not None for r in beams)


def test_a_prompt_longer_than_the_context_keeps_its_last_tokens():
    """A prompt past the context is cut to its last max_position_embeddings - 1 tokens, leaving room
    for one new token, in every decoder; max_new_tokens 0 generates nothing and runs no forward pass."""
    model = tiny_model()  # max_position_embeddings 64
    long = [(7 * i + 3) % 97 for i in range(100)]
    (want,) = greedy_no_cache(model, long[-63:], 1)
    assert list(generate_tokens(model, long, 5, temperature=0.0)) == [want]
    assert collect(stream_batch(model, [long, PROMPTS[0]], 5, GREEDY), 2)[0] == [want]
    assert beam_search(model, long, num_beams=2, max_new_tokens=5)[0].tokens == [want]
    tok = LetterTokenizer()
    text = "".join(chr(97 + t % 26) for t in long)
    (res,) = complete(model, tok, [text], max_new_tokens=5, temperature=0.0, stop_ids=())
    (alone,) = complete(model, tok, [text[-63:]], max_new_tokens=5, temperature=0.0, stop_ids=())
    assert res.token_ids == alone.token_ids and len(res.token_ids) == 1 and res.finish_reason == "length"
    # its one token is a stop token: it stopped, short of its budget
    (res,) = complete(model, tok, [text], max_new_tokens=5, temperature=0.0, stop_ids=alone.token_ids)
    assert res.token_ids == [] and res.finish_reason == "stop"
    # the repetition penalty sees the kept tokens only: a token that was cut off may come next
    kept = long[-63:]
    logits = model(torch.tensor([kept])).logits[0, -1].tolist()
    penalised = [(x / 1e6 if x > 0 else x * 1e6) if t in kept else x for t, x in enumerate(logits)]
    nxt = max(range(len(penalised)), key=penalised.__getitem__)
    assert nxt not in kept
    got = list(generate_tokens(model, [nxt] * 20 + kept, 5, temperature=0.0, repetition_penalty=1e6))
    assert got == [nxt]
    stats = GenerationStats()
    assert list(generate_tokens(model, [1, 2], 0, temperature=0.0, stats=stats)) == []
    assert stats.forward_calls == 0 and stats.prompt_tokens == 0


class EosShownTokenizer(LetterTokenizer):
    """A LetterTokenizer whose decode writes the EOS token too (as its letter)."""

    def decode(self, ids) -> str:
        return "".join(chr(97 + i % 26) for i in ids)


def test_eos_ends_the_text_by_default_and_is_not_in_it():
    """The tokenizer's EOS is the default stop token of stream_text, generate_text and complete: the
    text ends before it, without it, even for a decoder that writes it; "" starts from the EOS token."""
    model = tiny_model()
    tok = EosShownTokenizer()
    kw = dict(max_new_tokens=20, temperature=0.0)
    full = list(generate_tokens(model, tok.encode("ab"), 20, temperature=0.0))
    tok.eos_id = full[6]
    cut = full[: full.index(tok.eos_id)]
    assert generate_text(model, tok, "ab", **kw) == tok.decode(cut)
    (res,) = complete(model, tok, ["ab"], **kw)
    assert res.token_ids == cut and res.text == tok.decode(cut) and res.finish_reason == "stop"
    (res,) = complete(model, tok, ["ab", "abcd"], batch_size=2, **kw)[:1]
    assert res.token_ids == cut
    empty = list(generate_tokens(model, [tok.eos_id], 20, temperature=0.0, stop_ids=(tok.eos_id,)))
    assert generate_text(model, tok, "", **kw) == tok.decode(empty)
    assert complete(model, tok, [""], **kw)[0].token_ids == empty


def test_complete_with_beams_passes_the_stop_tokens_and_the_repetition_penalty():
    """complete's beam search ends hypotheses at the EOS token and applies the repetition penalty, as
    beam_search itself does with them."""
    model = tiny_model()
    tok = EosShownTokenizer()
    ids = tok.encode("ab")
    free = beam_search(model, ids, 2, 12, repetition_penalty=1e6)[0].tokens
    assert free != beam_search(model, ids, 2, 12)[0].tokens
    kw = dict(max_new_tokens=12, num_beams=2, repetition_penalty=1e6)
    assert complete(model, tok, ["ab"], stop_ids=(), **kw)[0].token_ids == free
    tok.eos_id = free[4]
    (want,) = beam_search(model, ids, 2, 12, stop_ids=(tok.eos_id,), repetition_penalty=1e6)[:1]
    assert want.finished and len(want.tokens) < 12
    (res,) = complete(model, tok, ["ab"], **kw)
    assert res.token_ids == want.tokens and res.finish_reason == "stop"


def test_complete_stops_each_row_of_a_batch_on_its_own():
    """In a batch, a row that meets a stop string or a stop token ends alone ("stop"), the others go on
    to their budget ("length") as they would alone; a seed samples the same text at any batch size."""
    tok = LetterTokenizer()
    model = tiny_model()
    prompts = ["abcdef", "ab", "abcd", "a", "zzzzzzz"]  # batched shortest first: rows and prompts differ
    for kw in [
        dict(temperature=0.0, stop=["cf"], stop_ids=()),  # prompts 0 and 2 stop
        dict(temperature=0.0, stop_ids=(15,)),  # "p": every prompt but 3 stops
        dict(temperature=1.0, top_k=10, seed=4, stop=["fi"]),  # prompts 0 and 2 stop
    ]:
        alone = [complete(model, tok, [p], max_new_tokens=12, **kw)[0] for p in prompts]
        assert len({r.finish_reason for r in alone}) == 2, kw
        for batch_size in (2, 5):
            together = complete(model, tok, prompts, max_new_tokens=12, batch_size=batch_size, **kw)
            assert [(r.token_ids, r.text, r.finish_reason) for r in together] == [
                (r.token_ids, r.text, r.finish_reason) for r in alone
            ], (kw, batch_size)


# ----------------------------------------------------------------------------------- CLI (trained)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """A tiny MLA model with one MTP module, trained for a few dozen steps on a 16-word corpus.
    test_quantize imports this fixture too; the fixed folder makes the session train only once."""
    from test_train import TINY

    from minimoe.train.run import train_from_config

    root = tmp_path_factory.getbasetemp() / "trained_mtp_run"
    if (root / "run" / "checkpoints" / "latest").exists():
        return root / "run"
    root.mkdir(exist_ok=True)
    mp = pytest.MonkeyPatch()
    mp.setenv("MINIMOE_CACHE", str(root / "cache"))
    words = "the cat sat on a mat and the dog ran to the red ball while a bird sang".split()
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(words[i] for i in torch.randint(0, len(words), (12,), generator=g)) for _ in range(400)]
    (root / "corpus.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    overrides = TINY + [
        f"data.path={root / 'corpus.txt'}", "train.max_steps=60", "train.eval_every=60", "train.lr=1e-2",
        "model.mtp_depth=1",
    ]  # fmt: skip
    train_from_config(overrides=overrides, run_dir=root / "run", progress=False, sample=False)
    mp.undo()
    return root / "run"


def test_speculative_equals_greedy_trained(trained_run, monkeypatch):
    from minimoe.train.checkpoint import load_run

    model, tok, _, _ = load_run(trained_run)
    model = model.double()
    drafted = accepted = 0
    for text in ("the cat ", "a dog ran", "while a bird "):
        ids = tok.encode(text)
        d, a = speculative_against_reference(model, ids, 40, monkeypatch)
        drafted, accepted = drafted + d, accepted + a
        spec = list(generate_tokens(model, ids, 40, 0.0, repetition_penalty=1.5, speculative=True))
        assert spec == list(generate_tokens(model, ids, 40, 0.0, repetition_penalty=1.5))
    # The counts are exact (replayed from the reference MTP logits), so no bound sits near a chance
    # value; this one only says that the trained MTP head drafts far better than chance (1/320).
    assert accepted > 0.5 * drafted


def run_cli(argv, capsys, stdin: str | None = None, monkeypatch=None) -> tuple[int, str, str]:
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_prompts_from_file_jsonl_and_stdin(trained_run, tmp_path, capsys, monkeypatch):
    base = [str(trained_run), "--max-new-tokens", "12", "--temperature", "0"]
    lines = tmp_path / "prompts.txt"
    lines.write_text("the cat\n\na dog\n", encoding="utf-8")
    code, out, _ = run_cli(
        ["generate"] + base + ["--prompt-file", str(lines), "--output", "jsonl", "--batch-size", "2"], capsys
    )
    recs = [json.loads(x) for x in out.splitlines()]
    assert code == 0 and [r["prompt"] for r in recs] == ["the cat", "a dog"]
    for r in recs:  # 12 new tokens unless a stop token came first; byte tokens: one per byte of text
        assert r["finish_reason"] in ("stop", "length") and (r["num_tokens"] == 12) == (
            r["finish_reason"] == "length"
        )
        assert len(r["completion"].encode("utf-8")) == r["num_tokens"]
    # the same prompts one at a time (streamed) give the same completions
    code, out1, _ = run_cli(["generate"] + base + ["--prompt", "the cat", "--output", "jsonl"], capsys)
    assert json.loads(out1)["completion"] == recs[0]["completion"]

    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text('{"prompt": "the cat", "id": 1}\n{"prompt": "a dog"}\n', encoding="utf-8")
    code, out2, _ = run_cli(["generate"] + base + ["--prompt-file", str(jsonl), "--output", "jsonl"], capsys)
    assert [json.loads(x)["completion"] for x in out2.splitlines()] == [r["completion"] for r in recs]

    code, out3, _ = run_cli(["generate"] + base, capsys, stdin="the cat", monkeypatch=monkeypatch)
    assert code == 0 and out3 == "the cat" + recs[0]["completion"] + "\n"
    code, out4, _ = run_cli(
        ["generate"] + base + ["--prompt-file", "-", "--output", "jsonl"],
        capsys,
        "the cat\na dog\n",
        monkeypatch,
    )
    assert out4 == out2


def test_cli_prompts_from_stdin_drop_a_byte_order_mark(trained_run, capsys, monkeypatch):
    """JSONL piped in with a UTF-8 byte-order mark is read as JSONL, as a prompt file with one is: the mark
    hid the '{' and the JSON lines were taken as plain prompts. A piped single prompt drops it too."""
    base = [str(trained_run), "--max-new-tokens", "1", "--temperature", "0", "--output", "jsonl"]
    jsonl = '{"prompt": "the cat"}\n{"prompt": "a dog"}\n'
    code, out, err = run_cli(["generate", *base, "--prompt-file", "-"], capsys, "\ufeff" + jsonl, monkeypatch)
    assert code == 0, err
    assert [json.loads(x)["prompt"] for x in out.splitlines()] == ["the cat", "a dog"]
    code, out, err = run_cli(
        ["generate", *base, "--prompt-file", "-"], capsys, "\ufeffthe cat\n", monkeypatch
    )
    assert code == 0 and [json.loads(x)["prompt"] for x in out.splitlines()] == ["the cat"], err
    code, out, err = run_cli(["generate", *base], capsys, "\ufeffthe cat", monkeypatch)  # one prompt, piped
    assert code == 0 and [json.loads(x)["prompt"] for x in out.splitlines()] == ["the cat"], err


@pytest.fixture()
def cli(capsys, monkeypatch):
    return lambda argv, stdin=None: run_cli(argv, capsys, stdin, monkeypatch)


def test_cli_stop_strings_read_backslash_n_as_the_newline():
    """`--stop "\\n"` arrives from a shell as a backslash and an n: generate, like eval, reads it as the
    newline (and backslash-t as the tab)."""
    import argparse

    from minimoe.cli import generate as generate_cli

    parser = argparse.ArgumentParser()
    generate_cli.add_parser(parser.add_subparsers())
    ns = parser.parse_args(["generate", "RUN", "--stop", "\\n", "--stop", "a\\tb", "--stop", "end"])
    assert ns.stop == ["\n", "a\tb", "end"]


def test_cli_generation_options(trained_run, cli):
    base = [
        "generate",
        str(trained_run),
        "--prompt",
        "the cat",
        "--max-new-tokens",
        "20",
        "--temperature",
        "0",
    ]
    code, plain, _ = cli(base)
    code, spec, err = cli(base + ["--speculative", "--stats"])
    assert code == 0 and spec == plain
    assert "acceptance" in err and "tokens/s" in err and "KV cache (MLA latent, absorbed decode)" in err
    code, beam, _ = cli(base + ["--beams", "3", "--length-penalty", "0.5"])
    assert code == 0 and beam.startswith("the cat")
    stop = plain[len("the cat") :][3:5]
    code, cut, _ = cli(base + ["--stop", stop])
    assert cut == plain[: plain.index(stop, len("the cat"))] + "\n"
    sampling = [
        "--temperature",
        "0.9",
        "--top-k",
        "5",
        "--top-p",
        "0.9",
        "--repetition-penalty",
        "1.2",
        "--seed",
        "1",
    ]
    code, sampled, _ = cli(base[:-2] + sampling)
    code, again, _ = cli(base[:-2] + sampling)  # the same seed samples the same text
    assert code == 0 and sampled == again
    code, q8, err = cli(base + ["--quantize", "8", "--stats"])
    assert code == 0 and "(int8)" in err and q8.startswith("the cat")


@pytest.mark.parametrize("batched", [False, True])
def test_cli_flags_reach_complete(trained_run, cli, monkeypatch, batched):
    """Every generation flag arrives at `complete` under its own name, one prompt at a time or batched."""
    import minimoe.infer.generate as generate_mod

    calls = []
    real = generate_mod.complete

    def spy(model, tok, prompts, **kw):
        calls.append(kw)
        return real(model, tok, prompts, **kw)

    monkeypatch.setattr(generate_mod, "complete", spy)
    prompts = ["--prompt", "the cat", "--prompt", "a dog"] if batched else ["--prompt", "the cat"]
    flags = [
        "--max-new-tokens", "3", "--temperature", "0.7", "--top-k", "5", "--top-p", "0.9",
        "--repetition-penalty", "1.3", "--seed", "11", "--stop", "xyz", "--batch-size", "4",
    ]  # fmt: skip
    code, _, _ = cli(["generate", str(trained_run), *prompts, *flags])
    assert code == 0 and len(calls) == 1
    want = dict(
        max_new_tokens=3, temperature=0.7, top_k=5, top_p=0.9, repetition_penalty=1.3, seed=11,
        stop=["xyz"], num_beams=1, length_penalty=1.0, speculative=False, batch_size=4,
    )  # fmt: skip
    assert {k: calls[0][k] for k in want} == want
    calls.clear()
    code, _, _ = cli(["generate", str(trained_run), *prompts, "--max-new-tokens", "3", "--beams", "2",
                      "--length-penalty", "0.3"])  # fmt: skip
    assert code == 0 and calls[0]["num_beams"] == 2 and calls[0]["length_penalty"] == 0.3


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["--max-new-tokens", "-1"], "--max-new-tokens must be >= 0"),
        (["--beams", "0"], "--beams must be >= 1"),
        (["--top-p", "2"], "top_p"),
        (["--quantize", "3"], "invalid choice"),
        (["--output", "xml"], "invalid choice"),
        (["--speculative", "--beams", "2"], "cannot be combined"),
        (["--prompt-file", "/nonexistent/prompts.txt"], "does not exist"),
    ],
)
def test_cli_bad_input(trained_run, cli, argv, msg):
    code, out, err = cli(["generate", str(trained_run), "--prompt", "x"] + argv)
    assert code == 2 and msg in err and len(err.strip().splitlines()) == 1


def test_cli_missing_run_dir_and_bad_prompt_file(tmp_path, cli):
    code, _, err = cli(["generate", str(tmp_path / "nope"), "--prompt", "x"])
    assert code == 2 and "does not exist" in err
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"text": "no prompt field"}\n', encoding="utf-8")
    code, _, err = cli(["generate", str(tmp_path), "--prompt-file", str(bad)])
    assert code == 2 and "'prompt' field" in err


def test_cli_prompt_bytes_that_are_not_utf8_are_one_sentence(tmp_path, cli):
    """Python reads standard input and arguments that are not UTF-8 with lone surrogates in place of
    the bad bytes (surrogateescape), which the tokenizer cannot encode: like a prompt file, they are
    refused in one sentence, not an internal error."""
    from minimoe.hf.load import write_run

    write_run(tmp_path, Transformer(tiny_cfg(vocab_size=320)), Tokenizer.byte(), {"source": "test"})
    latin1 = b"caf\xe9 au lait".decode("utf-8", "surrogateescape")
    for argv, stdin, where in [
        ([], latin1, "standard input"),
        (["--prompt-file", "-"], latin1, "standard input"),
        (["--prompt", latin1], None, "--prompt"),
    ]:
        code, _, err = cli(["generate", str(tmp_path), "--max-new-tokens", "2", *argv], stdin)
        assert code == 2 and err.strip().endswith(f"{where} is not UTF-8 text"), err


def test_cli_warns_when_a_prompt_is_cut(trained_run, cli):
    code, out, err = cli(["generate", str(trained_run), "--prompt", "the cat " * 20, "--max-new-tokens", "3"])
    assert (
        code == 0 and "has 160 tokens; keeping its last 63" in err
    )  # max_position_embeddings 64, byte tokens


def test_small_cpu_decoding_runs_on_one_thread_and_restores_the_count(monkeypatch):
    # under passive waiting (the policy read from the environment, as OpenMP reads it)
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    model = tiny_model().eval()
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    in_forward = []
    hook = model.register_forward_hook(lambda *_: in_forward.append(torch.get_num_threads()))
    try:
        between = []
        for _ in stream_batch(model, [[1, 2, 3]], 4, SamplingParams(temperature=0.0)):
            between.append(torch.get_num_threads())
        # the decode steps ran on one thread; the caller's code between them never saw that
        assert in_forward[1:] and set(in_forward[1:]) == {1}
        assert between and set(between) == {2} and torch.get_num_threads() == 2
        # MTP self-speculation and beam search: their decode steps too
        from minimoe.infer.speculative import speculative_tokens

        for decode in (
            lambda: speculative_tokens(model, [1, 2, 3], 6, SamplingParams(temperature=0.0)),
            lambda: iter([beam_search(model, [1, 2, 3], num_beams=2, max_new_tokens=4)]),
        ):
            in_forward.clear()
            between = [torch.get_num_threads() for _ in decode()]
            assert len(in_forward) > 2 and set(in_forward[1:]) == {1}  # after the prompt's forward
            assert between and set(between) == {2} and torch.get_num_threads() == 2
        # a big enough step (here: a huge batch) keeps the thread pool
        with decode_threads(model, batch=10**9):
            assert torch.get_num_threads() == 2
        # stopping early (the caller abandons the stream) leaves the count alone too
        stream = stream_batch(model, [[1, 2, 3]], 8, SamplingParams(temperature=0.0))
        next(stream)
        stream.close()
        assert torch.get_num_threads() == 2
        # with spinning workers (ACTIVE, or the runtime's default) a small step keeps the threads
        for policy in ("ACTIVE", None):
            if policy is None:
                monkeypatch.delenv("OMP_WAIT_POLICY")
            else:
                monkeypatch.setenv("OMP_WAIT_POLICY", policy)
            with decode_threads(model, batch=1):
                assert torch.get_num_threads() == 2
    finally:
        hook.remove()
        torch.set_num_threads(saved)


RELEASE_PROBE = """
import os, time, torch
from minimoe.infer.common import _loaded_libgomp, release_openmp_threads
torch.set_num_threads(2)
x = torch.randn(512, 512)
for _ in range(20):
    x = (x @ x).tanh()  # parallel regions: the main thread's pool gets its worker
before = len(os.listdir("/proc/self/task"))
released = release_openmp_threads()
# the released workers leave a barrier and exit on their own: on a busy machine that takes a while
deadline = time.monotonic() + 10
while len(os.listdir("/proc/self/task")) >= before and time.monotonic() < deadline:
    time.sleep(0.01)
after = len(os.listdir("/proc/self/task"))
y = (x @ x).sum()  # OpenMP still works afterwards (a new pool)
print(_loaded_libgomp() is not None, released, before, after, bool(torch.isfinite(y)))
"""


def test_release_openmp_threads_lets_the_callers_idle_workers_go():
    # in a fresh process: this one's pools are shared with other tests
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    env.pop("OMP_WAIT_POLICY", None)
    out = subprocess.run([sys.executable, "-c", RELEASE_PROBE], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    gomp, released, before, after, finite = out.stdout.split()
    if gomp != "True":
        pytest.skip("torch here does not use libgomp")
    assert released == "True" and int(after) == int(before) - 1 and finite == "True"


@pytest.mark.parametrize("kw", [{}, {"tie_word_embeddings": True, "mtp_depth": 1}])
def test_decode_flops_count_the_activated_matrices(kw):
    # the fast count from live parameters must equal the parameter accounting's (tied head counted once
    # as a matmul, MTP modules and the embedding lookup not at all, routed experts at top-k / E)
    from minimoe.infer.common import decode_flops
    from minimoe.lab.flops import matmul_params

    model = tiny_model(**kw)
    assert decode_flops(model, batch=3) == 2 * 3 * matmul_params(model.cfg)
    # int8 and int4 weights are buffers, not parameters: the same matrices, the same count
    import copy

    from minimoe.infer.quantize import quantize_model

    for bits in (8, 4):
        quantized = quantize_model(copy.deepcopy(model), bits, group_size=16)
        assert decode_flops(quantized, batch=3) == 2 * 3 * matmul_params(model.cfg), bits


@pytest.mark.parametrize(
    "attn_type, kv_heads, label", [("mla", None, "MLA latent"), ("gqa", 1, "GQA"), ("gqa", 3, "MHA")]
)
def test_generate_stats_name_the_cache_the_model_keeps(attn_type, kv_heads, label, capsys):
    """`generate --stats` names the attention whose cache it reports: MHA when every head has its keys."""
    from minimoe.cli.generate import _print_stats

    kw = {} if kv_heads is None else {"num_key_value_heads": kv_heads}
    model = tiny_model(attn_type, **kw)
    assert model.cfg.num_attention_heads == 3
    _print_stats(model, GenerationStats(), 1, 0)
    assert f"KV cache ({label}" in capsys.readouterr().err
