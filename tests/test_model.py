"""The whole transformer: loss parts, MTP, caching, checkpointing, config validation, parameter counts."""

import pytest
import torch
import torch.nn.functional as F

from minimoe.config import ModelConfig, RunConfig
from minimoe.config_yaml import build_run_config, set_dotted
from minimoe.errors import ConfigError
from minimoe.model.router import load_balance_loss, seq_load_balance_loss
from minimoe.model.transformer import Transformer
from minimoe.params import count_params
from minimoe.presets import PRESETS, get_preset
from reference import mtp_reference


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(
        vocab_size=97, hidden_size=36, num_hidden_layers=3, num_attention_heads=3, max_position_embeddings=64, kv_lora_rank=12,
        qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=10, intermediate_size=48, first_k_dense_replace=1,
        n_routed_experts=6, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=20,
        mtp_depth=1, seq_aux_loss_alpha=0.01, aux_loss_alpha=0.01, z_loss_coef=0.001,
    )  # fmt: skip
    base.update(kw)
    return ModelConfig(**base).validate()


@pytest.mark.parametrize("attn_type", ["mla", "gqa"])
def test_forward_returns_loss_parts_and_stats(attn_type):
    torch.manual_seed(0)
    cfg = tiny_cfg(attn_type=attn_type, num_key_value_heads=1 if attn_type == "gqa" else None)
    model = Transformer(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    gate_inputs = {}  # MoE layer -> the (B, S, D) hidden states its router saw
    hooks = [
        moe.gate.register_forward_hook(lambda m, a, o, i=i: gate_inputs.__setitem__(i, a[0]))
        for i, moe in model.moe_layers().items()
    ]
    targets = idx.roll(-1, 1)
    out = model(idx, targets=targets)
    for h in hooks:
        h.remove()
    assert out.logits.shape == (2, 16, cfg.vocab_size)
    assert set(out.losses) == {"ce", "aux", "z", "mtp"}
    # each loss part from its definition: aux and z summed over MoE layers 1, 2 and the MTP block (3),
    # which sees 15 positions; mtp from the hand-written MTP module
    assert sorted(gate_inputs) == sorted(out.moe_stats) == [1, 2, 3] and gate_inputs[3].shape[1] == 15
    aux = z = 0.0
    for i, x in gate_inputs.items():
        logits = x.reshape(-1, cfg.hidden_size) @ model.moe_layers()[i].gate.weight.T  # (T, E)
        scores = logits.sigmoid()
        idx_TK = scores.topk(cfg.num_experts_per_tok, dim=-1).indices  # the bias is zero at init
        aux = aux + load_balance_loss(scores, idx_TK, cfg.aux_loss_alpha)
        S = x.shape[1]
        aux = aux + seq_load_balance_loss(
            scores.view(2, S, -1), idx_TK.view(2, S, -1), cfg.seq_aux_loss_alpha
        )
        z = z + cfg.z_loss_coef * torch.logsumexp(logits, dim=-1).square().mean()
        assert (
            out.moe_stats[i].load.tolist() == torch.bincount(idx_TK.flatten(), minlength=6).float().tolist()
        )
    torch.testing.assert_close(out.losses["aux"], aux)
    torch.testing.assert_close(out.losses["z"], z)
    # the unweighted z (the spike alert's) is measured whatever the coefficient, and trains nothing at 0
    assert cfg.z_loss_coef > 0
    torch.testing.assert_close(out.router_z, z / cfg.z_loss_coef)
    coef, cfg.z_loss_coef = cfg.z_loss_coef, 0.0
    off = model(idx, targets=targets)
    cfg.z_loss_coef = coef
    assert off.losses["z"].item() == 0 and not off.router_z.requires_grad
    torch.testing.assert_close(off.router_z, out.router_z)
    with torch.no_grad():
        assert model(idx, targets=targets).router_z.item() == 0  # evaluation measures no routing loss
    (mtp_logits,) = mtp_reference(model, idx, out.hidden)
    torch.testing.assert_close(
        out.losses["mtp"], F.cross_entropy(mtp_logits.flatten(0, 1), targets[:, 1:].flatten())
    )
    want = out.losses["ce"] + out.losses["aux"] + out.losses["z"] + cfg.mtp_loss_weight * out.losses["mtp"]
    torch.testing.assert_close(out.loss, want)
    assert out.moe_stats[1].load.sum().item() == 2 * 16 * cfg.num_experts_per_tok
    # eh_proj's gradient: the same through the model's MTP path as through the hand-written one
    mtp_ref = F.cross_entropy(mtp_logits.flatten(0, 1), targets[:, 1:].flatten())
    hand = out.losses["ce"] + aux + z + cfg.mtp_loss_weight * mtp_ref
    (g_hand,) = torch.autograd.grad(hand, model.mtp[0].eh_proj.weight, retain_graph=True)
    out.loss.backward()
    torch.testing.assert_close(model.mtp[0].eh_proj.weight.grad, g_hand)
    # an expert's weights get a gradient exactly when tokens were routed to it
    grad_E = model.layers[2].mlp.experts.gate_proj.grad.abs().flatten(1).amax(dim=1)
    assert ((grad_E > 0) == (out.moe_stats[2].load > 0)).all()
    # untrained model predicts near-uniformly
    assert abs(out.losses["ce"].item() - torch.log(torch.tensor(97.0)).item()) < 0.5


# DeepSeek-V3's rope_scaling (its config.json): YaRN factor 40, softmax scale times mscale(40)^2 ~ 1.87
V3_YARN = {
    "type": "yarn", "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
    "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
}  # fmt: skip


@pytest.mark.parametrize(
    "attn_type,rope_scaling",
    [("mla", None), ("gqa", None), ("mla", V3_YARN)],
    ids=["mla", "gqa", "mla-v3-yarn"],
)
def test_cached_decoding_matches_full_forward(attn_type, rope_scaling):
    # MLA decodes through the absorbed path: with YaRN it must use the naive path's softmax scale
    torch.manual_seed(1)
    cfg = tiny_cfg(attn_type=attn_type, mtp_depth=0, rope_scaling=rope_scaling)
    model = Transformer(cfg).double().eval()
    idx = torch.randint(0, cfg.vocab_size, (2, 12))
    full = model(idx).logits
    cache = model.make_cache(2, 12)
    steps = [model(idx[:, :5], cache=cache).logits]
    for t in range(5, 12):
        steps.append(model(idx[:, t : t + 1], cache=cache).logits)
    torch.testing.assert_close(torch.cat(steps, 1), full)
    assert cache.pos == 12


@pytest.mark.parametrize("attn_type", ["mla", "gqa"])
def test_attention_dropout_is_training_only(attn_type):
    """attn_dropout drops attention probabilities in training only: in eval the full forward and the
    cached decode (MLA's absorbed path) equal those of the same weights without dropout."""
    torch.manual_seed(1)
    model = Transformer(tiny_cfg(attn_type=attn_type, mtp_depth=0, attn_dropout=0.5)).double()
    plain = Transformer(tiny_cfg(attn_type=attn_type, mtp_depth=0)).double().eval()
    plain.load_state_dict(model.state_dict())
    idx = torch.randint(0, 97, (2, 8))
    assert not torch.equal(model(idx).logits, model(idx).logits)  # training: dropout is on
    model.eval()
    with torch.no_grad():
        full = plain(idx).logits
        torch.testing.assert_close(model(idx).logits, full, rtol=1e-12, atol=1e-12)
        cache = model.make_cache(2, 8)
        steps = [model(idx[:, :4], cache=cache).logits]
        steps += [model(idx[:, t : t + 1], cache=cache).logits for t in range(4, 8)]
    torch.testing.assert_close(torch.cat(steps, 1), full)


def test_mtp_matches_hand_written_eh_proj():
    # eh_proj(cat[enorm(emb), hnorm(h)]): distinct norm weights, so swapping the halves or the norms fails
    torch.manual_seed(4)
    cfg = tiny_cfg(mtp_depth=2)
    model = Transformer(cfg).double().eval()
    with torch.no_grad():
        # the main model's final norm too: depth 1 reads its output (an RMSNorm with uniform weights
        # would hide whether h was taken before or after it)
        model.norm.weight.uniform_(0.5, 1.5)
        for m in model.mtp:
            m.enorm.weight.uniform_(0.5, 1.5)
            m.hnorm.weight.uniform_(0.5, 1.5)
            m.norm.weight.uniform_(0.5, 1.5)
    idx = torch.randint(0, cfg.vocab_size, (2, 10))
    targets = idx.roll(-1, 1)
    out = model(idx, targets=targets)
    ref = mtp_reference(model, idx, out.hidden)
    want = torch.stack(
        [F.cross_entropy(lg.flatten(0, 1), targets[:, k:].flatten()) for k, lg in enumerate(ref, start=1)]
    ).mean()
    torch.testing.assert_close(out.losses["mtp"], want.float())
    # the module's own outputs, depth 1
    emb = model.embed_tokens(idx[:, 1:])
    _, normed, _ = model.mtp[0](model.norm(out.hidden[:, :9]), emb, model.rope_cos[:9], model.rope_sin[:9])
    torch.testing.assert_close(model.lm_head(normed), ref[0])


def test_mtp_loss_through_a_head_the_fused_path_cannot_take():
    """A head that is no plain nn.Linear (quantized, LoRA-wrapped) takes the logits + cross-entropy path
    for the MTP loss too: each depth scores its own shifted targets, ignored ones left out."""
    torch.manual_seed(6)
    model = Transformer(tiny_cfg(mtp_depth=2)).double().eval()
    model.lm_head = torch.nn.Sequential(model.lm_head)  # same weights, not an nn.Linear
    idx = torch.randint(0, 97, (2, 10))
    targets = idx.roll(-1, 1)
    targets[0, 4] = -100
    out = model(idx, targets=targets, return_logits=False)
    ref = mtp_reference(model, idx, out.hidden)
    want = torch.stack(
        [
            F.cross_entropy(lg.flatten(0, 1), targets[:, k:].flatten(), ignore_index=-100)
            for k, lg in enumerate(ref, start=1)
        ]
    ).mean()
    torch.testing.assert_close(out.losses["mtp"], want.float())


@pytest.mark.parametrize("head", ["fused", "plain"])
def test_an_mtp_depth_without_targets_adds_nothing_rather_than_nan(head):
    """A fine-tuning window whose only scored target is its first: the main loss has it, depth 1 has no
    target (its targets start one position later). Its loss is 0 and every gradient finite, on the fused
    head and on the plain one (a head that is no nn.Linear), where a mean over nothing would be NaN and
    the step skipped."""
    torch.manual_seed(7)
    model = Transformer(tiny_cfg(mtp_depth=1)).double()
    if head == "plain":
        model.lm_head = torch.nn.Sequential(model.lm_head)
    idx = torch.randint(0, 97, (2, 10))
    targets = torch.full_like(idx, -100)
    targets[0, 0] = 5
    out = model(idx, targets=targets, return_logits=False)
    assert out.losses["mtp"].item() == 0.0 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    # with a target at depth 1, its mean is the one F.cross_entropy takes
    targets[1, 6] = 9
    model.zero_grad()
    out = model(idx, targets=targets, return_logits=False)
    (want,) = [
        F.cross_entropy(lg.flatten(0, 1), targets[:, 1:].flatten())
        for lg in mtp_reference(model, idx, out.hidden)
    ]
    torch.testing.assert_close(out.losses["mtp"], want.float())


def test_mla_cache_bytes_per_token():
    cfg = get_preset("deepseek-v3")
    with torch.device("meta"):
        model = Transformer(cfg)
    assert model.cache_bytes_per_token(torch.bfloat16) == (512 + 64) * 2 * 61
    rep = count_params(cfg)
    assert rep.kv_cache_bytes_per_token_per_layer == {"bf16": 1152, "fp32": 2304}  # REFERENCE: (512 + 64) x 2
    assert rep.kv_cache_bytes_per_token["fp32"] == model.cache_bytes_per_token(torch.float32)


def test_activation_checkpointing_gives_same_gradients():
    torch.manual_seed(2)
    cfg = tiny_cfg()
    model = Transformer(cfg).double()
    idx = torch.randint(0, cfg.vocab_size, (2, 10))
    model(idx, targets=idx).loss.backward()
    g1 = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.gradient_checkpointing = True
    model(idx, targets=idx).loss.backward()
    for a, p in zip(g1, model.parameters()):
        torch.testing.assert_close(a, p.grad)


def test_activation_checkpointing_keeps_the_padding_out_of_the_moe_statistics():
    """A padded fine-tuning batch under activation checkpointing: the blocks re-run with the same `valid`
    mask, so the loads, the balance and z losses and the gradients equal the plain forward's."""
    torch.manual_seed(3)
    model = Transformer(tiny_cfg(aux_loss_alpha=0.0)).double()
    idx = torch.randint(0, 97, (2, 10))
    y = idx.roll(-1, 1)
    y[0, 5:] = -100  # the first row's tail reaches no target
    outs, grads = [], []
    for ckpt in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = ckpt
        out = model(idx, targets=y)
        out.loss.backward()
        outs.append(out)
        grads.append([p.grad.clone() for p in model.parameters()])
    plain, ckpt = outs
    for layer, st in plain.moe_stats.items():
        torch.testing.assert_close(ckpt.moe_stats[layer].load, st.load, msg=f"layer {layer}")
    assert plain.moe_stats[1].load.sum() == 2 * (5 + 10)  # top-2 slots of the counted tokens
    for k in ("aux", "z", "mtp", "ce"):
        torch.testing.assert_close(ckpt.losses[k], plain.losses[k], msg=k)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_tied_embeddings_share_storage_and_eval_keeps_bias():
    cfg = tiny_cfg(tie_word_embeddings=True)
    model = Transformer(cfg)
    assert model.lm_head.weight is model.embed_tokens.weight
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model(torch.randint(0, 97, (2, 8)))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_balance_step_moves_selection_bias():
    from minimoe.train.balance import balance_step

    cfg = tiny_cfg(bias_update_speed=0.01)
    model = Transformer(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    out = model(idx, targets=idx)
    balance_step(model, {i: s.load for i, s in out.moe_stats.items()})
    b = model.layers[1].mlp.gate.e_score_correction_bias
    assert b.abs().max().item() == pytest.approx(0.01)


def test_balance_step_moves_every_moe_layer():
    """One balancing step moves the bias of every MoE layer (the MTP block's included) by the sign
    rule, each from its own layer's loads."""
    from minimoe.model.router import bias_update
    from minimoe.train.balance import balance_step

    cfg = tiny_cfg(bias_update_speed=0.01, scoring_func="sigmoid")
    model = Transformer(cfg)
    loads = {i: torch.randperm(cfg.n_routed_experts).float() for i in model.moe_layers()}
    assert len(loads) >= 3
    balance_step(model, loads)
    for i, moe in model.moe_layers().items():
        want = bias_update(loads[i], 0.01, "sigmoid")
        torch.testing.assert_close(moe.gate.e_score_correction_bias, want, msg=f"layer {i}")


# ---------------------------------------------------------------- config validation


YARN_4 = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(num_experts_per_tok=9, n_routed_experts=8), "num_experts_per_tok"),
        (dict(attn_type="gqa", num_attention_heads=5), "num_attention_heads"),
        (dict(attn_type="gqa", num_key_value_heads=3), "num_key_value_heads"),
        (dict(n_group=4, topk_group=5, n_routed_experts=8), "topk_group"),
        (dict(n_group=3, n_routed_experts=8), "n_group"),
        (dict(qk_rope_head_dim=5), "qk_rope_head_dim"),
        (dict(first_k_dense_replace=9), "first_k_dense_replace"),
        (dict(capacity_factor=0.0), "capacity_factor"),
        (dict(scoring_func="relu"), "scoring_func"),
        (dict(routed_scaling_factor=0.0), "routed_scaling_factor"),
        (dict(routed_scaling_factor=-2.5), "routed_scaling_factor"),
        (dict(rope_scaling={**YARN_4, "beta_fast": 0}), "beta_fast"),
        (dict(rope_scaling={**YARN_4, "beta_slow": -1}), "beta_slow"),
    ],
)
def test_invalid_configs_name_the_field(kw, field):
    base = dict(n_routed_experts=8, num_experts_per_tok=2, num_attention_heads=4, hidden_size=64)
    base.update(kw)
    with pytest.raises(ConfigError, match=field):
        ModelConfig(**base).validate()


def test_overrides_and_unknown_keys():
    cfg = build_run_config(
        "tiny", overrides=["model.num_hidden_layers=2", "train.lr=1e-3", "model.q_lora_rank=16"]
    )
    assert cfg.model.num_hidden_layers == 2 and cfg.train.lr == 1e-3 and cfg.model.q_lora_rank == 16
    with pytest.raises(ConfigError, match="did you mean 'model.num_hidden_layers'"):
        set_dotted(RunConfig(), "model.n_layer", "2")
    with pytest.raises(ConfigError, match="integer"):
        set_dotted(RunConfig(), "model.num_hidden_layers", "two")
    with pytest.raises(ConfigError, match="unknown preset"):
        build_run_config("tinyy")


# ---------------------------------------------------------------- parameter accounting


def test_param_counts_match_hand_formula():
    cfg = tiny_cfg(mtp_depth=0)
    D, V, H, r, rope, nope, v = 36, 97, 3, 12, 4, 8, 10
    E, K, Im, S, I = 6, 2, 20, 1, 48
    attn = D * H * (nope + rope) + D * (r + rope) + r + r * H * (nope + v) + H * v * D
    dense, moe_routed, shared, router = 3 * D * I, 3 * E * Im * D, 3 * D * Im * S, E * D + E
    norms = 2 * D * 3 + D
    total = 2 * V * D + 3 * attn + dense + 2 * (moe_routed + shared + router) + norms
    rep = count_params(cfg)
    assert rep.total == total
    assert rep.activated == total - V * D - 2 * moe_routed * (E - K) // E
    assert rep.activated_with_embedding == rep.activated + V * D
    real = Transformer(cfg)
    assert rep.total == real.num_params() + 2 * E  # + the two bias buffers


def test_deepseek_moe_16b_published_counts():
    rep = count_params(get_preset("deepseek-moe-16b"))
    assert rep.total == 16_375_728_128
    assert rep.activated_with_embedding == 2_828_650_496  # DeepSeekMoE counts the embedding


def test_deepseek_v3_published_counts():
    rep = count_params(get_preset("deepseek-v3"))
    assert rep.total == 671_026_419_200
    assert rep.activated == 36_625_618_432  # V3 leaves the embedding lookup out: "37B"
    assert rep.activated_with_embedding == 37_552_297_472
    assert rep.mtp_total == 11_610_068_224
    assert rep.hf_checkpoint_total == 684_489_845_504  # "671B + 14B = 685B"


def test_v2_lite_olmoe_and_mixtral_published_counts():
    """REFERENCE.md's other published sizes, each under the convention that reproduces it: V2-Lite (MLA
    without a low-rank q, softmax, greedy) without the embedding lookup; OLMoE (q/k norms over the whole
    projection, 64 experts top-8) and Mixtral (GQA, 8 experts top-2, no shared expert) with it."""
    gqa = dict(attn_type="gqa", n_shared_experts=0, first_k_dense_replace=0, n_group=1, topk_group=1)
    moe = dict(scoring_func="softmax", aux_free_bias=False, mtp_depth=0, tie_word_embeddings=False)
    v2_lite = ModelConfig(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=27, num_attention_heads=16, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6,
        first_k_dense_replace=1, norm_topk_prob=False, routed_scaling_factor=1.0, n_group=1, topk_group=1, **moe,
    )  # fmt: skip
    olmoe = ModelConfig(
        vocab_size=50304, hidden_size=2048, intermediate_size=1024, moe_intermediate_size=1024, num_hidden_layers=16,
        num_attention_heads=16, num_key_value_heads=16, n_routed_experts=64, num_experts_per_tok=8,
        norm_topk_prob=False, qk_norm="full", **gqa, **moe,
    )  # fmt: skip
    mixtral = ModelConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, moe_intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, n_routed_experts=8,
        num_experts_per_tok=2, **gqa, **moe,
    )  # fmt: skip
    rep = count_params(v2_lite)
    assert (rep.total, rep.activated) == (15_706_484_224, 2_451_435_008)
    rep = count_params(olmoe)
    assert (rep.total, rep.activated_with_embedding) == (6_919_161_856, 1_282_017_280)
    rep = count_params(mixtral)
    assert (rep.total, rep.activated_with_embedding) == (46_702_792_704, 12_879_925_248)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_counts_on_meta(name):
    rep = count_params(get_preset(name))
    assert 0 < rep.activated < rep.total


def test_activation_checkpointing_with_auto_kernel_probe():
    # the first forward probes the expert kernel; under a checkpointed block that probe must not
    # disturb the recomputation's saved-tensor count
    from minimoe.model.experts import grouped_mm_works

    grouped_mm_works.cache_clear()  # probe afresh, inside the checkpointed block
    cfg = tiny_cfg(moe_impl="auto", hidden_size=32, num_attention_heads=2, moe_intermediate_size=16)
    model = Transformer(cfg)
    model.gradient_checkpointing = True
    idx = torch.randint(0, cfg.vocab_size, (2, 8))
    model(idx, targets=idx).loss.backward()
    got = model.layers[1].mlp.experts.up_proj.grad.clone()
    model.zero_grad()
    model.gradient_checkpointing = False
    model(idx, targets=idx).loss.backward()
    torch.testing.assert_close(got, model.layers[1].mlp.experts.up_proj.grad)


@pytest.mark.parametrize("attn_type", ["mla", "gqa"])
def test_bf16_model_prefills_and_decodes_close_to_fp32(attn_type):
    # a model cast to bf16 casts its RoPE tables too; every kernel must accept that, cached or not
    torch.manual_seed(0)
    ref = Transformer(tiny_cfg(attn_type=attn_type)).eval()
    half = Transformer(tiny_cfg(attn_type=attn_type)).eval()
    half.load_state_dict(ref.state_dict())
    half = half.to(torch.bfloat16)
    ids = torch.randint(0, ref.cfg.vocab_size, (2, 12))
    with torch.no_grad():
        full = ref(ids).logits
        cache = half.make_cache(2, 12)
        pre = half(ids[:, :8], cache=cache).logits
        steps = [half(ids[:, t : t + 1], cache=cache).logits for t in range(8, 12)]
    got = torch.cat([pre, *steps], dim=1).float()
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert (got - full).abs().max() < 0.1 * full.abs().max()


# ---------------------------------------------------------------- fused head + cross-entropy


@pytest.mark.parametrize("chunk_elements", [64, 1 << 21])  # several chunks (with a ragged last one), one
def test_linear_cross_entropy_matches_plain_fp64(monkeypatch, chunk_elements):
    from minimoe.model import loss as loss_lib

    monkeypatch.setattr(loss_lib, "CHUNK_ELEMENTS", chunk_elements)
    torch.manual_seed(0)
    h = torch.randn(3, 7, 12, dtype=torch.float64, requires_grad=True)
    w = torch.randn(10, 12, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 10, (3, 7))
    t[0, :3] = -100  # ignored positions count for nothing
    fused = loss_lib.linear_cross_entropy(h, w, t)
    gh, gw = torch.autograd.grad(2.5 * fused, (h, w))
    plain = F.cross_entropy(F.linear(h, w).flatten(0, 1), t.flatten(), ignore_index=-100)
    rh, rw = torch.autograd.grad(2.5 * plain, (h, w))
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gh, rh, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gw, rw, rtol=1e-10, atol=1e-12)
    with torch.no_grad():  # evaluation: the loss alone
        torch.testing.assert_close(loss_lib.linear_cross_entropy(h, w, t), plain, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_cross_entropy_of_a_low_precision_model_without_autocast(dtype):
    """bf16/fp16 h and weight, no autocast: the products in that dtype, the softmax in fp32, as the plain
    head and F.cross_entropy on its upcast logits compute it."""
    from minimoe.model import loss as loss_lib

    torch.manual_seed(0)
    h = torch.randn(4, 6, 16).to(dtype).requires_grad_()
    w = (torch.randn(40, 16) * 0.5).to(dtype).requires_grad_()
    t = torch.randint(0, 40, (4, 6))
    fused = loss_lib.linear_cross_entropy(h, w, t)
    gh, gw = torch.autograd.grad(fused, (h, w))
    plain = F.cross_entropy(F.linear(h, w).float().flatten(0, 1), t.flatten())
    rh, rw = torch.autograd.grad(plain, (h, w))
    assert fused.dtype == torch.float32 and gh.dtype == gw.dtype == dtype
    torch.testing.assert_close(fused, plain, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(gh.float(), rh.float(), rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(gw.float(), rw.float(), rtol=2e-2, atol=1e-3)


def test_a_bf16_model_with_mtp_trains_without_autocast():
    """Weights in bf16 (model.to(torch.bfloat16)), no autocast: the loss, with its fused head and the MTP
    head's, backpropagates, and equals the plain head's loss up to bf16 rounding."""
    torch.manual_seed(0)
    model = Transformer(tiny_cfg(mtp_depth=1)).to(torch.bfloat16)
    idx = torch.randint(0, 97, (2, 12))
    fused = model(idx, targets=idx.roll(-1, 1), return_logits=False)
    fused.loss.backward()
    assert all(
        p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad
    )
    plain = model(idx, targets=idx.roll(-1, 1), return_logits=True)
    torch.testing.assert_close(fused.losses["ce"], plain.losses["ce"], rtol=1e-2, atol=1e-2)


def test_padding_after_the_last_target_counts_for_no_moe_statistic():
    """A fine-tuning batch pads a short row after its last scored target: those positions reach no loss,
    so the expert loads (which move the balancing bias), the sequence-wise balance loss and the z-loss
    equal those of the rows run alone without their padding (the MTP block's too)."""
    torch.manual_seed(0)
    cfg = tiny_cfg(aux_loss_alpha=0.0, seq_aux_loss_alpha=0.01, z_loss_coef=0.001, mtp_depth=1)
    model = Transformer(cfg).double()
    short, long = torch.randint(0, 97, (1, 7)), torch.randint(0, 97, (1, 12))
    pad = torch.full((1, 5), 3)
    x = torch.cat([torch.cat([short, pad], 1), long])
    y = x.roll(-1, 1)
    y[0, 6:] = -100  # the short row's padding (and its last real token, whose next token is padding)
    y[:, -1] = -100
    batched = model(x, targets=y)
    alone = [model(short, targets=y[:1, :7]), model(long, targets=y[1:])]
    for layer in batched.moe_stats:
        want = sum(a.moe_stats[layer].load for a in alone)
        torch.testing.assert_close(batched.moe_stats[layer].load, want, msg=f"layer {layer}")
        seq_aux = sum(a.moe_stats[layer].aux_loss for a in alone) / 2  # the mean over the two sequences
        torch.testing.assert_close(batched.moe_stats[layer].aux_loss, seq_aux, msg=f"layer {layer}")
    assert batched.moe_stats[1].load.sum() == 2 * (6 + 11)  # top-2 slots of the tokens that reach a target
    valid = torch.tensor([[True] * 6 + [False] * 6, [True] * 11 + [False]])
    from minimoe.model.router import router_z_loss

    logits = torch.randn(24, 6, dtype=torch.float64)
    torch.testing.assert_close(
        router_z_loss(logits, 0.5, valid.reshape(-1)), router_z_loss(logits[valid.reshape(-1)], 0.5)
    )


@pytest.mark.parametrize("attn_type", ["mla", "gqa"])
def test_left_padded_row_with_targets_has_the_losses_of_the_row_alone(attn_type):
    """With an attention_mask, a left-padded row's loss parts equal those of the row run alone: the padding
    counts for no MoE statistic (it precedes a target but is no token), and the MTP blocks too hide the
    padded keys, count RoPE positions from the row's first real token and predict nothing from padding."""
    torch.manual_seed(0)
    model = Transformer(tiny_cfg(attn_type=attn_type, mtp_depth=2)).double()
    row = torch.randint(0, 97, (1, 11))
    pad = 4
    x = torch.cat([torch.full((1, pad), 3), row[:, :-1]], 1)
    y = torch.cat([torch.full((1, pad), -100), row[:, 1:]], 1)
    mask = (torch.arange(x.shape[1]) >= pad).long()[None]
    padded = model(x, targets=y, attention_mask=mask).losses
    alone = model(row[:, :-1], targets=row[:, 1:]).losses
    for k in ("ce", "aux", "z", "mtp"):
        torch.testing.assert_close(padded[k], alone[k], msg=k)


@pytest.mark.parametrize("attn_type", ["mla", "gqa"])
def test_left_padded_cached_decoding_matches_the_row_alone(attn_type):
    """Prefill and then decode token by token with a cache and a growing attention_mask: each new token's
    RoPE position counts the real tokens before it (cached ones included), so the left-padded row's
    logits equal those of the row run alone without a cache."""
    torch.manual_seed(2)
    model = Transformer(tiny_cfg(attn_type=attn_type, mtp_depth=0)).double().eval()
    pad, n = 3, 9
    row, other = torch.randint(0, 97, (1, n)), torch.randint(0, 97, (1, pad + n))
    x = torch.cat([torch.cat([torch.full((1, pad), 5), row], 1), other])
    mask = torch.ones_like(x)
    mask[0, :pad] = 0
    cache = model.make_cache(2, pad + n)
    prefill = pad + 4
    steps = [model(x[:, :prefill], cache=cache, attention_mask=mask[:, :prefill]).logits]
    for t in range(prefill, pad + n):
        steps.append(model(x[:, t : t + 1], cache=cache, attention_mask=mask[:, : t + 1]).logits)
    got = torch.cat(steps, 1)
    torch.testing.assert_close(got[:1, pad:], model(row).logits, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got[1:], model(other).logits, rtol=1e-9, atol=1e-9)


def test_targets_with_num_logits_to_keep_are_refused():
    model = Transformer(tiny_cfg())
    idx = torch.randint(0, 97, (2, 8))
    with pytest.raises(ValueError, match="num_logits_to_keep is for decoding"):
        model(idx, targets=idx, num_logits_to_keep=1)


def test_capacity_drops_in_training_only():
    """With a capacity factor small enough to drop pairs, eval mode routes every pair: a row's logits do
    not depend on the other rows of its batch, and equal the dropless model's."""
    torch.manual_seed(0)
    model = Transformer(tiny_cfg(capacity_factor=0.5, mtp_depth=0)).double()
    a, b = torch.randint(0, 97, (1, 10)), torch.full((1, 10), 3)
    assert sum(s.dropped for s in model(torch.cat([a, b])).moe_stats.values()) > 0  # training mode drops
    model.eval()
    with torch.no_grad():
        out = model(torch.cat([a, b]))
        alone = model(a).logits
        assert sum(s.dropped for s in out.moe_stats.values()) == 0
        torch.testing.assert_close(out.logits[:1], alone, rtol=1e-12, atol=1e-12)
        for moe in model.moe_layers().values():
            moe.capacity_factor = None
        torch.testing.assert_close(model(torch.cat([a, b])).logits, out.logits, rtol=0, atol=0)


@pytest.mark.parametrize("tie", [True, False])
def test_model_loss_without_logits_matches_plain(tie):
    torch.manual_seed(0)
    model = Transformer(tiny_cfg(tie_word_embeddings=tie, mtp_depth=1))
    idx = torch.randint(0, 97, (2, 12))
    results = []
    for return_logits in (True, False):
        model.zero_grad(set_to_none=True)
        out = model(idx, targets=idx.roll(-1, 1), return_logits=return_logits)
        out.loss.backward()
        results.append((out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (plain, g_plain), (fused, g_fused) = results
    assert fused.logits is None and plain.logits.shape == (2, 12, 97)
    for k in ("ce", "mtp"):
        torch.testing.assert_close(fused.losses[k], plain.losses[k], rtol=1e-5, atol=1e-6)
    assert g_plain.keys() == g_fused.keys()
    for n in g_plain:
        torch.testing.assert_close(g_fused[n], g_plain[n], rtol=1e-4, atol=1e-6, msg=n)


def test_init_scales_every_output_projection_by_depth():
    """GPT-2 init: N(0, initializer_range) for matrices, but every projection back into the residual
    stream (attention o_proj, dense and shared MLP down_proj, the routed experts' stacked down_proj) gets
    initializer_range / sqrt(2 * num_hidden_layers); norms 1; the balancing bias 0 after a reset."""
    torch.manual_seed(0)
    L, std = 4, 0.05
    model = Transformer(tiny_cfg(num_hidden_layers=L, initializer_range=std, moe_intermediate_size=40))
    names = [n for n, p in model.named_parameters() if p.dim() >= 2]
    for suffix in (
        "o_proj.weight",
        "mlp.down_proj.weight",
        "shared_experts.down_proj.weight",
        "experts.down_proj",
    ):
        assert any(n.endswith(suffix) for n in names), suffix  # every kind is checked below
    for name, p in model.named_parameters():
        if p.dim() < 2:
            continue
        out = name.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj"))
        want = std / (2 * L) ** 0.5 if out else std
        rel = max(0.1, 4 / (2 * p.numel()) ** 0.5)  # 4 standard errors of a sample std; below 1.41x
        assert p.float().std().item() == pytest.approx(want, rel=rel), name
    for moe in model.moe_layers().values():
        moe.gate.e_score_correction_bias.fill_(1.0)
    model.reset_parameters()
    assert all((m.gate.e_score_correction_bias == 0).all() for m in model.moe_layers().values())
    assert all((p == 1).all() for n, p in model.named_parameters() if n.endswith("norm.weight"))


@pytest.mark.parametrize("tie", [False, True])
def test_param_counts_with_tied_weights_and_two_mtp_depths_match_the_real_modules(tie):
    """Independent count from a real model: every unique tensor once (a tied embedding/head matrix is
    one matrix, used by every token as the head), MTP depths apart, routed experts scaled by top-k / E;
    the DeepSeek-V3-style checkpoint stores embedding + head (one matrix when tied) again per MTP depth;
    the memory estimate covers main + MTP parameters at 4/2 bytes, 4/2 for gradients, 4 for the fp32
    master copy of a bf16 model, and the optimizer state the real optimizers hold (AdamW, Muon)."""
    from minimoe.params import memory_estimate

    cfg = tiny_cfg(mtp_depth=2, tie_word_embeddings=tie, num_hidden_layers=4, first_k_dense_replace=2)
    model = Transformer(cfg)
    tensors = dict(model.named_parameters()) | {
        n: b for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")
    }  # named_parameters lists a tied matrix once
    K, E, VD = cfg.num_experts_per_tok, cfg.n_routed_experts, cfg.vocab_size * cfg.hidden_size
    total = sum(t.numel() for n, t in tensors.items() if not n.startswith("mtp."))
    mtp_total = sum(t.numel() for n, t in tensors.items() if n.startswith("mtp."))
    routed = sum(t.numel() for n, t in tensors.items() if ".mlp.experts." in n and not n.startswith("mtp."))
    mtp_routed = sum(t.numel() for n, t in tensors.items() if ".mlp.experts." in n and n.startswith("mtp."))
    emb = 0 if tie else VD  # tied: the one matrix is the head, which every token multiplies with
    rep = count_params(cfg)
    assert rep.total == total and rep.mtp_total == mtp_total
    assert rep.activated == total - emb - routed * (E - K) // E
    assert rep.activated_with_embedding == total - routed * (E - K) // E
    assert rep.mtp_activated == mtp_total - mtp_routed * (E - K) // E
    assert rep.hf_checkpoint_total == total + mtp_total + 2 * VD * 2  # each MTP layer: embedding and head
    assert rep.kv_cache_bytes_per_token == {
        k: v * cfg.num_hidden_layers for k, v in rep.kv_cache_bytes_per_token_per_layer.items()
    }
    mem = memory_estimate(cfg, rep, context=10)["by_dtype"]
    n = total + mtp_total
    trained = sum(p.numel() for p in model.parameters())  # AdamW's moments: parameters, not the bias buffers
    assert mem["fp32"] == {
        "weights": 4 * n, "gradients": 4 * n, "optimizer_state": 8 * trained, "training_total": 8 * n + 8 * trained,
        "kv_cache_per_token": rep.kv_cache_bytes_per_token["fp32"],
        "kv_cache_per_sequence": 10 * rep.kv_cache_bytes_per_token["fp32"],
    }  # fmt: skip
    assert mem["bf16"]["weights"] == 2 * n and mem["bf16"]["gradients"] == 2 * n
    assert mem["bf16"]["optimizer_state"] == 8 * trained + 4 * n
    assert mem["bf16"]["training_total"] == 8 * n + 8 * trained
    # the optimizer's state as the real optimizers hold it, built on this model and stepped once
    from types import SimpleNamespace

    from minimoe.train.optim import build_optimizer

    for name, experts in (("muon", True), ("muon", False), ("adamw", True)):
        tc = SimpleNamespace(optimizer=name, muon_experts=experts, lr=1e-3, muon_lr=None, weight_decay=0.1,
                             beta1=0.9, beta2=0.95, muon_ns_steps=1, precision="fp32", fused_optimizer=False)  # fmt: skip
        optimizer = build_optimizer(model, tc, torch.device("cpu"))
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        optimizer.step()
        held = sum(
            t.numel() * t.element_size()
            for st in optimizer.state.values() for t in st.values() if torch.is_tensor(t) and t.dim() > 0
        )  # fmt: skip
        got = memory_estimate(cfg, rep, 10, name, experts)["by_dtype"]["fp32"]["optimizer_state"]
        assert got == held, (name, experts, got, held)
        model.zero_grad(set_to_none=True)


def test_balance_step_skips_layers_the_model_does_not_hold():
    """A pipeline stage holds some MoE layers only: the step's loads of every layer reach each stage,
    which moves the biases it holds and ignores the rest."""
    from minimoe.train.balance import balance_step

    model = Transformer(tiny_cfg(bias_update_speed=0.01))
    held = dict(list(model.moe_layers().items())[:1])
    (i,) = held

    class Stage:
        def moe_layers(self):
            return held

    loads = {j: torch.randperm(6).float() for j in model.moe_layers()}
    assert len(loads) > 1
    balance_step(Stage(), loads)  # no KeyError for the layers of other stages
    assert held[i].gate.e_score_correction_bias.abs().max().item() == pytest.approx(0.01)


def test_bias_ranges_are_min_then_max_per_layer():
    from minimoe.train.balance import bias_ranges

    model = Transformer(tiny_cfg(bias_update_speed=0.01))
    for i, moe in model.moe_layers().items():
        moe.gate.e_score_correction_bias.copy_(torch.tensor([0.5, -0.25, 0.0, 0.125, -1.0, 2.0]) * (i + 1))
    ranges = bias_ranges(model)
    assert ranges == {str(i): [-1.0 * (i + 1), 2.0 * (i + 1)] for i in model.moe_layers()}


def test_a_bf16_model_without_autocast_normalises_and_scores_in_fp32():
    """Weights in bf16 and no autocast (model.to(torch.bfloat16)): RMSNorm normalises in fp32, casts back
    and then scales (HF's order: bit-identical to it, and an fp32 weight gives fp32); the plain head's
    cross-entropy, the main one's and the MTP module's, is taken on fp32 logits."""
    from minimoe.model.norm import RMSNorm

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 40, generator=g) * 3).to(torch.bfloat16)
    norm = RMSNorm(40)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5, generator=g)

    def hf(w):
        return w * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + norm.eps)).to(x.dtype)

    assert norm(x).dtype == torch.float32
    torch.testing.assert_close(norm(x), hf(norm.weight), rtol=1e-6, atol=1e-6)
    norm = norm.to(torch.bfloat16)
    assert torch.equal(norm(x), hf(norm.weight))

    torch.manual_seed(0)
    model = Transformer(tiny_cfg(mtp_depth=1)).to(torch.bfloat16)
    model._fused_head_ok = lambda h: False  # the plain head (a quantized or LoRA-wrapped one takes it)
    logits = []
    model.lm_head.register_forward_hook(lambda m, args, out: logits.append(out))
    idx = torch.randint(0, 97, (2, 12))
    out = model(idx, targets=idx.roll(-1, 1), return_logits=False)
    main, mtp = logits
    assert main.dtype == torch.bfloat16
    want = F.cross_entropy(main.float().flatten(0, 1), idx.roll(-1, 1).flatten())
    torch.testing.assert_close(out.losses["ce"], want, rtol=1e-6, atol=1e-6)
    want = F.cross_entropy(mtp.float().flatten(0, 1), idx.roll(-1, 1)[:, 1:].flatten())
    torch.testing.assert_close(out.losses["mtp"], want, rtol=1e-6, atol=1e-6)


def test_a_bf16_model_decodes_from_the_latent_cache_with_an_fp32_softmax(monkeypatch):
    """MLA's absorbed path (a cached decoding step) of a bf16 model without autocast takes its softmax in
    fp32, as HF does, from the bf16 scores."""
    torch.manual_seed(0)
    model = Transformer(tiny_cfg(attn_type="mla", mtp_depth=0)).to(torch.bfloat16).eval()
    idx = torch.randint(0, 97, (1, 40))
    cache = model.make_cache(1, 64)
    seen = []
    softmax = torch.softmax
    with torch.no_grad():
        model(idx[:, :39], cache=cache)
        monkeypatch.setattr(torch, "softmax", lambda t, *a, **k: seen.append(t.dtype) or softmax(t, *a, **k))
        out = model(idx[:, 39:], cache=cache)
    assert out.logits.dtype == torch.bfloat16
    assert len(seen) >= len(model.layers) and set(seen) == {torch.float32}
