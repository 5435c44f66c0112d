"""Attention and RoPE: fast paths against slow references (float64)."""

import math

import pytest
import torch

from minimoe.config import ModelConfig
from minimoe.model.attention import GQAttention, MLAttention, padding_causal_mask
from minimoe.model.rope import apply_rope, rope_cos_sin, softmax_scale, yarn_get_mscale, yarn_inv_freq
from reference import explicit_attention


@pytest.fixture(autouse=True)
def _float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def _cfg(**kw) -> ModelConfig:
    base = dict(
        vocab_size=64, hidden_size=40, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64, kv_lora_rank=12,
        qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=10, n_routed_experts=0,
    )  # fmt: skip
    base.update(kw)
    return ModelConfig(**base).validate()


# DeepSeek-V3's config.json rope_scaling: mscale_all_dim makes the softmax scale mscale(40)^2 ~ 1.87 / sqrt(d)
V3_YARN = {
    "type": "yarn", "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
    "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
}  # fmt: skip


def _tables(cfg, n):
    cos, sin = rope_cos_sin(cfg.rope_dim, n, cfg.rope_theta, cfg.rope_scaling)
    return cos.double(), sin.double()


@pytest.mark.parametrize(
    "q_lora_rank,rope_scaling",
    [(None, None), (8, None), (8, V3_YARN)],
    ids=["plain", "q-lora", "q-lora-v3-yarn"],
)
def test_mla_naive_matches_explicit_attention(q_lora_rank, rope_scaling):
    torch.manual_seed(0)
    cfg = _cfg(q_lora_rank=q_lora_rank, rope_scaling=rope_scaling)
    attn = MLAttention(cfg)
    x = torch.randn(2, 9, cfg.hidden_size)
    cos, sin = _tables(cfg, 9)
    y = attn(x, cos, sin)
    scale = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
    if rope_scaling:
        scale *= (0.1 * math.log(40) + 1) ** 2  # YaRN mscale(factor, mscale_all_dim)^2
    torch.testing.assert_close(y, _explicit_mla(attn, cfg, x, cos, sin, scale))


def _explicit_mla(attn, cfg, x, cos, sin, scale):
    """MLA the slow way: per-head q, k, v built by hand, attended with an explicit causal mask."""
    B, T, _ = x.shape
    # queries from the weights (HF layout: q_proj, or q_a_proj -> q_a_layernorm -> q_b_proj; per head
    # [q_nope | q_pe]), not through attn._query
    q = attn.q_proj(x) if cfg.q_lora_rank is None else attn.q_b_proj(attn.q_a_layernorm(attn.q_a_proj(x)))
    q_nope, q_pe = q.view(B, T, cfg.num_attention_heads, -1).split(
        [cfg.qk_nope_head_dim, cfg.qk_rope_head_dim], -1
    )
    q_pe = apply_rope(q_pe, cos, sin, interleaved=True)
    c, k_pe = attn.kv_a_proj_with_mqa(x).split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], -1)
    kv = attn.kv_b_proj(attn.kv_a_layernorm(c)).view(B, T, cfg.num_attention_heads, -1)
    k_nope, v = kv.split([cfg.qk_nope_head_dim, cfg.v_head_dim], -1)
    k_pe = apply_rope(k_pe[:, :, None], cos, sin, interleaved=True).expand_as(q_pe)
    q = torch.cat([q_nope, q_pe], -1)
    k = torch.cat([k_nope, k_pe], -1)
    return attn.o_proj(explicit_attention(q, k, v, scale).reshape(B, T, -1))


def test_mla_with_values_wider_than_queries_matches_explicit_attention():
    """v_head_dim above qk_nope + qk_rope (SDPA then pads queries and keys with zero columns): the
    naive path over a whole sequence and over a chunk after a cached prefix, and the absorbed path,
    equal explicit attention."""
    torch.manual_seed(5)
    cfg = _cfg(v_head_dim=16)
    assert cfg.v_head_dim > cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    attn = MLAttention(cfg).eval()
    x = torch.randn(2, 9, cfg.hidden_size)
    cos, sin = _tables(cfg, 9)
    ref = _explicit_mla(attn, cfg, x, cos, sin, (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5)
    torch.testing.assert_close(attn(x, cos, sin), ref)
    for absorb in (False, True):
        cache = attn.make_cache(2, 9, torch.float64, "cpu")
        attn(x[:, :5], cos[:5], sin[:5], cache, 0)
        torch.testing.assert_close(attn(x[:, 5:], cos[5:], sin[5:], cache, 5, absorb=absorb), ref[:, 5:])


@pytest.mark.parametrize(
    "q_lora_rank,rope_scaling",
    [(None, None), (8, None), (None, V3_YARN), (8, V3_YARN)],
    ids=["plain", "q-lora", "v3-yarn", "q-lora-v3-yarn"],
)
def test_mla_absorbed_incremental_decode_matches_naive_full(q_lora_rank, rope_scaling):
    # with YaRN the absorbed path must apply the same mscale^2 softmax factor as the naive one
    torch.manual_seed(1)
    cfg = _cfg(q_lora_rank=q_lora_rank, rope_scaling=rope_scaling)
    attn = MLAttention(cfg).eval()
    x = torch.randn(2, 11, cfg.hidden_size)
    cos, sin = _tables(cfg, 11)
    full = attn(x, cos, sin)
    cache = attn.make_cache(2, 16, torch.float64, "cpu")
    # prefill 3 tokens (naive), then 1 token at a time (absorbed), then a chunk of 3 (absorbed, masked)
    outs, pos = [], 0
    for n in (3, 1, 1, 1, 1, 1, 3):
        outs.append(attn(x[:, pos : pos + n], cos[pos : pos + n], sin[pos : pos + n], cache, pos))
        pos += n
    torch.testing.assert_close(torch.cat(outs, 1), full)
    # forced absorbed mode on a full sequence equals naive as well
    torch.testing.assert_close(attn(x, cos, sin, absorb=True), full)


@pytest.mark.parametrize("seed", [0, 1])
def test_mla_absorbed_equals_naive_on_a_left_padded_batch(seed):
    """With a padding mask (left-padded rows) the absorbed path, which masks and softmaxes by hand, gives
    the naive (SDPA) path's outputs at every position, all finite: a padded query sees only itself
    (`padding_causal_mask`), where a row with no visible key would be a NaN softmax. And every real
    token computes what it would in its row alone, without the padding."""
    torch.manual_seed(seed)
    cfg = _cfg(q_lora_rank=8)
    attn = MLAttention(cfg).eval()
    pads, T = [0, 2, 4], 7
    x = torch.randn(len(pads), T, cfg.hidden_size)
    valid = torch.arange(T)[None, :] >= torch.tensor(pads)[:, None]  # (B, T)
    mask = padding_causal_mask(valid, T, 0)
    assert mask.any(dim=-1).all()  # every query sees some key
    pos = (valid.long().cumsum(-1) - 1).clamp(min=0)  # RoPE positions count real tokens only
    cos, sin = _tables(cfg, T)
    naive = attn(x, cos[pos], sin[pos], attn_mask=mask)
    absorbed = attn(x, cos[pos], sin[pos], absorb=True, attn_mask=mask)
    assert torch.isfinite(absorbed).all()
    torch.testing.assert_close(absorbed, naive)
    for b, p in enumerate(pads):
        alone = attn(x[b : b + 1, p:], cos[: T - p], sin[: T - p])
        torch.testing.assert_close(naive[b : b + 1, p:], alone)


def test_mla_cache_holds_only_latent_and_rope_key():
    cfg = _cfg()
    attn = MLAttention(cfg)
    cache = attn.make_cache(1, 10, torch.bfloat16, "cpu")
    assert cache.nbytes() == 10 * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 2
    assert attn.cache_numbers_per_token() == cfg.kv_lora_rank + cfg.qk_rope_head_dim


@pytest.mark.parametrize("num_key_value_heads", [4, 2, 1])
def test_gqa_cached_decode_matches_full_and_reference(num_key_value_heads):
    torch.manual_seed(2)
    cfg = _cfg(attn_type="gqa", num_key_value_heads=num_key_value_heads)
    attn = GQAttention(cfg).eval()
    x = torch.randn(3, 10, cfg.hidden_size)
    cos, sin = _tables(cfg, 10)
    full = attn(x, cos, sin)
    hd = cfg.gqa_head_dim
    q = apply_rope(attn.q_proj(x).view(3, 10, 4, hd), cos, sin, interleaved=False)
    k = apply_rope(attn.k_proj(x).view(3, 10, num_key_value_heads, hd), cos, sin, interleaved=False)
    v = attn.v_proj(x).view(3, 10, num_key_value_heads, hd)
    rep = 4 // num_key_value_heads
    ref = explicit_attention(q, k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2), attn.scale)
    torch.testing.assert_close(full, attn.o_proj(ref.reshape(3, 10, -1)))
    cache = attn.make_cache(3, 10, torch.float64, "cpu")
    outs, pos = [], 0
    for n in (4, 1, 2, 1, 1, 1):
        outs.append(attn(x[:, pos : pos + n], cos[pos : pos + n], sin[pos : pos + n], cache, pos))
        pos += n
    torch.testing.assert_close(torch.cat(outs, 1), full)
    assert cache.nbytes() == 3 * 10 * 2 * num_key_value_heads * hd * 8


def test_rope_is_relative_and_layouts_agree():
    torch.manual_seed(3)
    cos, sin = rope_cos_sin(8, 32, 10000.0)
    q, k = torch.randn(1, 1, 8), torch.randn(1, 1, 8)
    for interleaved in (True, False):

        def dot(m, n, interleaved=interleaved):
            qm = apply_rope(q, cos[m : m + 1].double(), sin[m : m + 1].double(), interleaved)
            kn = apply_rope(k, cos[n : n + 1].double(), sin[n : n + 1].double(), interleaved)
            return (qm * kn).sum()

        torch.testing.assert_close(dot(5, 2), dot(13, 10))
    # interleaved layout == half-split layout after permuting dims (2i, 2i+1) -> (i, i + d/2)
    perm = torch.cat([torch.arange(0, 8, 2), torch.arange(1, 8, 2)])
    a = apply_rope(q, cos[7:8].double(), sin[7:8].double(), interleaved=True)[..., perm]
    b = apply_rope(q[..., perm], cos[7:8].double(), sin[7:8].double(), interleaved=False)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("per_row", [False, True])
def test_rope_under_torch_compile_equals_the_eager_rotation(per_row):
    """Traced by torch.compile, the interleaved rotation takes its real form (inductor has no complex
    kernels); it equals the eager complex multiply, for shared (T, d/2) and per-row (B, T, d/2)
    position tables."""
    torch.manual_seed(4)
    cos, sin = rope_cos_sin(16, 64, 10000.0)
    pos = torch.tensor([[3, 9, 40], [0, 1, 2]]) if per_row else torch.tensor([5, 6, 7])
    x = torch.randn(2, 3, 4, 16)  # (B, T, H, d)
    want = apply_rope(x, cos[pos], sin[pos], interleaved=True)
    torch._dynamo.reset()
    got = torch.compile(apply_rope, backend="eager", fullgraph=True)(x, cos[pos], sin[pos], True)
    torch.testing.assert_close(got, want)


YARN_40 = {
    "type": "yarn",
    "factor": 40,
    "original_max_position_embeddings": 4096,
    "beta_fast": 32,
    "beta_slow": 1,
}


def test_yarn_frequencies_match_the_formula():
    dim, base = 64, 10000.0
    rs = dict(YARN_40)
    got = yarn_inv_freq(dim, base, rs)

    def corr(rot):  # dimension index whose wavelength turns `rot` times over the original context
        return dim * math.log(4096 / (rot * 2 * math.pi)) / (2 * math.log(base))

    low, high = max(math.floor(corr(32)), 0), min(math.ceil(corr(1)), dim - 1)
    for i in range(dim // 2):
        theta = base ** (-2 * i / dim)
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)
        want = theta * (1 - ramp) + (theta / 40) * ramp  # extrapolate fast dims, interpolate slow ones
        assert got[i].item() == pytest.approx(want, rel=1e-12)
    assert got[0].item() == pytest.approx(1.0)  # fastest dim untouched
    assert got[-1].item() == pytest.approx(base ** (-(dim - 2) / dim) / 40)  # slowest fully interpolated
    assert yarn_get_mscale(40, 1.0) == pytest.approx(0.1 * math.log(40) + 1)
    rs_v3 = dict(rs, mscale=1.0, mscale_all_dim=1.0)
    assert softmax_scale(192, rs_v3) == pytest.approx(192**-0.5 * (0.1 * math.log(40) + 1) ** 2)
    cos, _ = rope_cos_sin(dim, 4, base, rs_v3)  # mscale / mscale_all_dim = 1: no cos/sin scaling
    assert cos[0, 0].item() == pytest.approx(1.0)


def _yarn_inv_freq_by_formula(dim, base, factor, orig, beta_fast, beta_slow) -> list[float]:
    """transformers' YaRN frequencies (`_compute_yarn_parameters`, truncate=True) one pair at a time: the
    ramp's ends are floor/ceil of the correction dims, clamped to [0, dim - 1], and a zero-width ramp is
    widened by 0.001."""

    def corr(rot):
        return dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(base))

    low, high = max(math.floor(corr(beta_fast)), 0), min(math.ceil(corr(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    out = []
    for i in range(dim // 2):
        theta = base ** (-2 * i / dim)
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)
        out.append(theta * (1 - ramp) + theta / factor * ramp)
    return out


@pytest.mark.parametrize(
    "dim,orig,betas",
    [
        # beta_slow's correction dim (~34.6) lies past the last pair: clamped at dim - 1
        (64, 1 << 17, (32, 1)),
        (4, 4096, (32, 1)),  # a small rope dim: the same clamp
        (8, 4, (32, 1)),  # a context under one turn: both ends clamp to 0, a zero-width ramp
        (64, 4096, (16, 2)),
    ],
)
def test_yarn_ramp_ends_are_clamped_as_transformers_does(dim, orig, betas):
    rs = dict(YARN_40, original_max_position_embeddings=orig, beta_fast=betas[0], beta_slow=betas[1])
    got = yarn_inv_freq(dim, 10000.0, rs)
    assert torch.isfinite(got).all()
    assert got.tolist() == pytest.approx(_yarn_inv_freq_by_formula(dim, 10000.0, 40, orig, *betas), rel=1e-12)


def test_yarn_attention_factor_scales_the_rope_tables():
    """YaRN's cos/sin factor as HF computes it: mscale(factor, mscale) / mscale(factor, mscale_all_dim)
    when both are given, else mscale(factor); each (cos, sin) pair of the tables has that length. The
    softmax scale changes only with mscale_all_dim."""
    rs = dict(YARN_40)

    def mscale(m):
        return 0.1 * m * math.log(40) + 1

    cases = [
        ({}, mscale(1.0)),
        ({"mscale": 0.707, "mscale_all_dim": 1.0}, mscale(0.707) / mscale(1.0)),
        ({"mscale": 1.0, "mscale_all_dim": 0.8}, mscale(1.0) / mscale(0.8)),
        # keys count when present, falsy ones too (DeepSeek's remote code; HF tests truthiness, so the
        # exporter pins attention_factor for this one)
        ({"mscale": 0.0, "mscale_all_dim": 1.0}, mscale(0.0) / mscale(1.0)),
    ]
    for extra, factor in cases:
        cos, sin = rope_cos_sin(16, 8, 10000.0, {**rs, **extra})
        length = (cos.double().square() + sin.double().square()).sqrt()
        torch.testing.assert_close(length, torch.full((8, 8), factor), rtol=1e-6, atol=0)
    assert softmax_scale(16, rs) == pytest.approx(16**-0.5)
