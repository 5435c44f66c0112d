"""Property tests for ModelConfig.validate(): a config it accepts builds a Transformer whose forward pass
on a (2, 8) batch gives finite losses (and gradients) and logits of the right shape; a config it rejects
raises ConfigError with one line that names a field. Hypothesis draws the fields from small ranges that
include invalid values, so both sides are exercised."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from minimoe.config import ModelConfig
from minimoe.errors import ConfigError
from minimoe.model.transformer import Transformer

B, T = 2, 8
FIELDS = [f.name for f in dataclasses.fields(ModelConfig)]
YARN = {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 16}


# field -> (valid values, invalid values). Valid values can still combine into an invalid config (heads
# that do not divide the width, top-k above the expert count, ...): those combinations are the point.
SPACE: dict[str, tuple[list, list]] = {
    "vocab_size": ([17, 32, 61], [0, -5]),
    "hidden_size": ([8, 12, 16, 24], [0, -4]),
    "num_hidden_layers": ([1, 2, 3], [0]),
    "num_attention_heads": ([1, 2, 3, 4], [0, -1]),
    "max_position_embeddings": ([8, 16, 32], [0]),
    "attn_type": (["gqa", "mla"], ["flash"]),
    "num_key_value_heads": ([None, None, 1], [0, 5]),
    "head_dim": ([None, 4, 6, 8], [3, 0, -2]),
    "qk_norm": (["none", "none", "head", "full"], ["layer"]),
    "q_lora_rank": ([None, 4, 8], [0, -1]),
    "kv_lora_rank": ([4, 8, 12], [0]),
    "qk_nope_head_dim": ([0, 4, 6], [-2]),
    "qk_rope_head_dim": ([2, 4, 8], [3, 0]),
    "v_head_dim": ([4, 6], [0]),
    "rope_theta": ([10000.0, 500.0], [0.0, -10.0]),
    "rope_scaling": ([None, YARN], [{**YARN, "factor": 0.5}, {"type": "linear", "factor": 2.0}, {"type": "yarn"},
                                    {**YARN, "beta_fast": "x"}]),
    "intermediate_size": ([8, 20, 32], [0]),
    "first_k_dense_replace": ([0, 1], [5, -1]),
    "n_routed_experts": ([0, 2, 4, 6, 8], [-1]),
    "n_shared_experts": ([0, 1, 2], [-1]),
    "num_experts_per_tok": ([1, 2, 3], [0, -1]),
    "moe_intermediate_size": ([4, 8, 12], [0]),
    "expert_act": (["swiglu", "gelu"], ["relu"]),
    "scoring_func": (["softmax", "sigmoid"], ["tanh"]),
    "norm_topk_prob": ([True, False], []),
    "routed_scaling_factor": ([1.0, 2.5], []),
    "n_group": ([1, 1, 2], [0, 3]),
    "topk_group": ([1, 1, 2], [0, 5]),
    "topk_method": ([None, None, "greedy", "group_limited_greedy", "noaux_tc"], ["top2"]),
    "router_jitter": ([0.0, 0.1], [-0.1]),
    "aux_free_bias": ([True, False], []),
    "bias_update_speed": ([0.001], [-0.1]),
    "aux_loss_alpha": ([0.0, 0.01], [-0.01]),
    "seq_aux_loss_alpha": ([0.0, 0.001], [-1.0]),
    "z_loss_coef": ([0.0, 0.001], [-1.0]),
    "capacity_factor": ([None, 0.5, 1.25, 8.0], [0.0, -1.0]),
    "moe_impl": (["auto", "loop", "grouped_mm"], ["fast"]),
    "mtp_depth": ([0, 1, 2], [-1]),
    "mtp_loss_weight": ([0.0, 0.3], [-0.3]),
    "tie_word_embeddings": ([True, False], []),
    "dropout": ([0.0, 0.1], [1.0, -0.1]),
    "attn_dropout": ([0.0, 0.1], [1.5]),
    "rms_norm_eps": ([1e-6, 1e-5], [-1.0]),
    "initializer_range": ([0.02], [-0.1]),
}  # fmt: skip
CORRUPTIBLE = [k for k, (_, bad) in SPACE.items() if bad]


@st.composite
def model_configs(draw) -> dict:
    """Keyword arguments for ModelConfig: a valid value for every field, then up to two fields set to an
    invalid one."""
    kw = {k: draw(st.sampled_from(good)) for k, (good, _) in SPACE.items()}
    for k in draw(st.lists(st.sampled_from(CORRUPTIBLE), max_size=2, unique=True)):
        kw[k] = draw(st.sampled_from(SPACE[k][1]))
    return kw


def _check_rejection(e: ConfigError) -> None:
    msg = str(e)
    assert msg and "\n" not in msg, repr(msg)
    assert any(name in msg for name in FIELDS), f"the message names no ModelConfig field: {msg!r}"


def _check_model(cfg: ModelConfig, seed: int) -> None:
    torch.manual_seed(seed)
    model = Transformer(cfg).train()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    targets = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    out = model(ids, targets=targets)
    assert out.logits.shape == (B, T, cfg.vocab_size)
    assert torch.isfinite(out.loss), out.losses
    for name, part in out.losses.items():
        assert torch.isfinite(torch.as_tensor(part)).all(), (name, part)
    out.loss.backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), name
    model.eval()
    with torch.no_grad():  # inference keeps the shape without targets
        assert model(ids).logits.shape == (B, T, cfg.vocab_size)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kw=model_configs(), seed=st.integers(0, 2**16))
def test_validate_accepts_only_buildable_configs(kw, seed):
    cfg = ModelConfig(**kw)
    try:
        cfg.validate()
    except ConfigError as e:
        event("rejected")
        _check_rejection(e)
        with pytest.raises(ConfigError):  # the model refuses it too, with the same error
            Transformer(cfg)
        return
    event("accepted")
    _check_model(cfg, seed)


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(
        ["hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size", "intermediate_size"]
    ),
    value=st.integers(-3, 0),
)
def test_non_positive_sizes_name_the_field(name, value):
    with pytest.raises(ConfigError, match=name):
        ModelConfig(**{name: value}).validate()


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(num_experts_per_tok=9, n_routed_experts=8), "num_experts_per_tok"),
        (dict(attn_type="gqa", hidden_size=30, num_attention_heads=4), "num_attention_heads"),
        (dict(attn_type="mla", kv_lora_rank=0), "kv_lora_rank"),
        (dict(attn_type="gqa", num_attention_heads=4, num_key_value_heads=3), "num_key_value_heads"),
        (dict(n_routed_experts=8, n_group=8, topk_group=4, scoring_func="sigmoid"), "n_group"),
        (dict(n_routed_experts=8, n_group=4, topk_group=2, topk_method="greedy"), "topk_method"),
        (dict(attn_type="mla", qk_norm="head"), "qk_norm"),
        (dict(rope_scaling={"type": "yarn", "factor": 2.0}), "rope_scaling"),
        # each of these used to pass and fail later: a "diverged" run at step 1, or torch's init error
        (dict(rope_theta=0.0), "rope_theta"),
        (dict(rms_norm_eps=-1.0), "rms_norm_eps"),
        (dict(initializer_range=-0.1), "initializer_range"),
        (dict(rope_scaling={"factor": "abc", "original_max_position_embeddings": 4}), "rope_scaling.factor"),
        (dict(rope_scaling={"factor": 2, "original_max_position_embeddings": "x"}), "rope_scaling.original"),
        (dict(rope_scaling={**YARN, "mscale": 1.0, "mscale_all_dim": "x"}), "rope_scaling.mscale_all_dim"),
        # the boundaries of the rules above, each one step past what builds
        (dict(attn_type="gqa", hidden_size=12, num_attention_heads=4), "head_dim"),
        (dict(num_experts_per_tok=9, n_routed_experts=8), "is larger than n_routed_experts"),
        (dict(routed_scaling_factor=0.0), "routed_scaling_factor"),
        (dict(n_routed_experts=8, n_group=4, topk_group=1, num_experts_per_tok=3), "topk_group"),
        (dict(rope_scaling={**YARN, "factor": 0.5}), "rope_scaling.factor"),
        (dict(rope_scaling={**YARN, "beta_fast": 0}), "rope_scaling.beta_fast"),
        (dict(rope_scaling={**YARN, "mscale": True}), "rope_scaling.mscale"),
        # a misspelt key kept its default silently; a crossed ramp inverted it; a second type was ignored
        (dict(rope_scaling={**YARN, "beta_fst": 64}), "no key 'beta_fst'"),
        (dict(rope_scaling={**YARN, "beta_fast": 1, "beta_slow": 32}), "must be larger than beta_slow"),
        (dict(rope_scaling={**YARN, "type": "yarn", "rope_type": "linear"}), "rope_scaling rope_type"),
    ],
)
def test_known_invalid_combinations(kw, field):
    with pytest.raises(ConfigError, match=field) as e:
        ModelConfig(**kw).validate()
    _check_rejection(e.value)


@pytest.mark.parametrize(
    "kw",
    [
        # found by the property test: v_head_dim > qk_nope_head_dim + qk_rope_head_dim truncated V in SDPA
        dict(attn_type="mla", qk_nope_head_dim=0, qk_rope_head_dim=2, v_head_dim=4, kv_lora_rank=4),
        dict(attn_type="mla", qk_nope_head_dim=2, qk_rope_head_dim=2, v_head_dim=12, q_lora_rank=4),
        dict(attn_type="gqa", num_attention_heads=4, num_key_value_heads=1, head_dim=6, hidden_size=12),
        dict(n_routed_experts=4, n_group=2, topk_group=1, num_experts_per_tok=2, capacity_factor=0.5),
        dict(first_k_dense_replace=2),  # every layer dense (num_hidden_layers is 2)
    ],
)
def test_accepted_edge_configs_run(kw):
    small = dict(
        vocab_size=32,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=16,
        intermediate_size=16,
    )
    small.update(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=8, mtp_depth=1)
    _check_model(ModelConfig(**{**small, **kw}).validate(), seed=0)


def test_old_model_keys_are_read_as_their_hugging_face_names(tmp_path, caplog):
    """Configs written before ModelConfig took the HF names (YAML files, run directories, overrides)."""
    import logging

    from minimoe.config_yaml import MODEL_KEY_ALIASES, build_run_config

    old = {
        "n_layers": 3,
        "n_heads": 4,
        "n_kv_heads": 2,
        "first_k_dense": 2,
        "max_seq_len": 512,
        "init_std": 0.01,
    }
    assert set(old) == set(MODEL_KEY_ALIASES)
    path = tmp_path / "old.yaml"
    path.write_text("model:\n" + "".join(f"  {k}: {v}\n" for k, v in old.items()) + "  attn_type: gqa\n")
    with caplog.at_level(logging.WARNING, logger="minimoe.config"):
        from_yaml = build_run_config(None, str(path), [])
        from_overrides = build_run_config(
            None, None, ["model.attn_type=gqa"] + [f"model.{k}={v}" for k, v in old.items()]
        )
    for cfg in (from_yaml, from_overrides):
        m = cfg.model
        got = (m.num_hidden_layers, m.num_attention_heads, m.num_key_value_heads, m.first_k_dense_replace)
        assert got == (3, 4, 2, 2)
        assert (m.max_position_embeddings, m.initializer_range) == (512, 0.01)
    assert "model.n_layers is now called model.num_hidden_layers" in caplog.text


def test_a_yaml_key_given_twice_is_refused_but_a_merge_may_be_overridden(tmp_path):
    """YAML keeps the last of two equal keys, so a config with `lr` twice would train with one of them
    silently. Equal keys in different mappings, a key that overrides what `<<: *anchor` merged in, and
    `1` beside `"1"` (an integer and a string) are not repeats."""
    from minimoe.config_yaml import load_yaml

    path = tmp_path / "c.yaml"
    for text, key, line in (
        ("train:\n  lr: 1e-3\n  lr: 3e-3\n", "lr", 3),
        ("model: {}\ntrain: {}\nmodel: {hidden_size: 8}\n", "model", 3),
        ("a: &x {k: 1}\nb:\n  <<: *x\n  j: 2\n  j: 3\n", "j", 5),
        ("- {n: 1}\n- {n: 1, m: 2, n: 3}\n", "n", 2),
    ):
        path.write_text(text)
        with pytest.raises(ConfigError) as e:
            load_yaml(path)
        assert (
            str(e.value)
            == f"config file {path}: '{key}' is given twice (line {line}); each key must be unique"
        )
    path.write_text(
        "base: &b {lr: 0.001, max_steps: 5}\ntrain:\n  <<: *b\n  lr: 0.002\nmodel: {lr: 1}\nids: {1: a, '1': b}\n"
    )
    d = load_yaml(path)
    assert d["train"] == {"lr": 0.002, "max_steps": 5} and d["model"] == {"lr": 1}
    assert d["ids"] == {1: "a", "1": "b"}
    # two merges into one mapping (PyYAML's reading of `<<: [*a, *b]` written out) are not a repeat
    path.write_text("a: &a {lr: 0.001}\nb: &b {max_steps: 5}\ntrain:\n  <<: *a\n  <<: *b\n")
    assert load_yaml(path)["train"] == {"lr": 0.001, "max_steps": 5}


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.seq_len=17", "exceeds model.max_position_embeddings (16)"),
        ("data.val_fraction=1", "data.val_fraction must be in [0, 1)"),
        ("dist.expert_parallel=2", "dist.expert_parallel (2) does not divide model.n_routed_experts (5)"),
        ("train.beta1=1", "train.beta1 must be between"),
        ("train.keep_last=0", "train.keep_last must be at least 1"),
        ("train.muon_lr=0", "train.muon_lr must be positive"),
        ("train.muon_ns_steps=0", "train.muon_ns_steps must be at least 1"),
        ("train.max_steps=true", "train.max_steps must be an integer"),
        ("train.max_steps=1.5", "train.max_steps must be an integer"),
        (f"train.max_steps={2**63}", "64-bit"),
    ],
)
def test_run_config_boundaries_are_refused(override, message):
    """One step past each RunConfig range (and each value of the wrong type) is a ConfigError naming
    the setting; the same config one step inside builds."""
    from minimoe.config_yaml import build_run_config

    base = ["model.max_position_embeddings=16", "model.n_routed_experts=5", "train.seq_len=16"]
    build_run_config(None, None, base)
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_run_config(None, None, [*base, override])


def test_yaml_values_coerce_to_their_fields(tmp_path):
    """YAML's quoted strings and nulls reach the fields as the types they name: "1"/"0" booleans,
    "none" and an empty or "~" override for an optional field, and the `dist` section; an empty file
    is the defaults, a YAML boolean is no text, and an old model key name is no key elsewhere."""
    from minimoe.config import RunConfig
    from minimoe.config_yaml import build_run_config, dataclass_from_dict, set_dotted

    m = dataclass_from_dict(ModelConfig, {"tie_word_embeddings": "1", "aux_free_bias": "0"})
    assert (m.tie_word_embeddings, m.aux_free_bias) == (True, False)
    m = dataclass_from_dict(ModelConfig, {"tie_word_embeddings": 1, "aux_free_bias": 0})  # unquoted
    assert (m.tie_word_embeddings, m.aux_free_bias) == (True, False)
    assert build_run_config("tiny", None, ["model.tie_word_embeddings=1"]).model.tie_word_embeddings is True
    with pytest.raises(ConfigError, match="must be true or false, got 2"):
        dataclass_from_dict(ModelConfig, {"tie_word_embeddings": 2})
    assert dataclass_from_dict(ModelConfig, {"q_lora_rank": "none"}).q_lora_rank is None
    cfg = RunConfig()
    for value in ("", "~", "none", "null"):
        cfg.data.path = "x.txt"
        set_dotted(cfg, "data.path", value)
        assert cfg.data.path is None, value
    path = tmp_path / "c.yaml"
    path.write_text("dist:\n  expert_parallel: 2\n  pp_schedule: gpipe\n")
    got = build_run_config(None, str(path), [])
    assert (got.dist.expert_parallel, got.dist.pp_schedule) == (2, "gpipe")
    path.write_text("")
    assert build_run_config(None, str(path), []) == RunConfig().validate()
    path.write_text("data:\n  tokenizer: true\n")  # YAML's true, not the text "true"
    with pytest.raises(ConfigError, match="data.tokenizer must be a string"):
        build_run_config(None, str(path), [])
    # the old model key names are model keys only: another section names the key as given
    with pytest.raises(ConfigError, match="unknown config key 'train.n_layers'"):
        set_dotted(RunConfig(), "train.n_layers", "2")


def test_integers_written_with_an_exponent_and_a_second_preset(tmp_path):
    """YAML 1.1 reads 1e5 (no dot) as text: an integer setting takes it as the number it spells (1.5e0
    is refused); a file's `preset:` replaces the command line's whole recipe, not just its model."""
    from minimoe.config_yaml import build_run_config

    path = tmp_path / "c.yaml"
    path.write_text("train:\n  max_steps: 1e5\n  seed: 2E3\nmodel:\n  rope_scaling: null\n")
    got = build_run_config(None, str(path), [])
    assert (got.train.max_steps, got.train.seed) == (100_000, 2000)
    path.write_text("train:\n  max_steps: 1.5e0\n")
    with pytest.raises(ConfigError, match="must be an integer"):
        build_run_config(None, str(path), [])
    path.write_text("preset: small\n")
    assert build_run_config("tiny", str(path), []) == build_run_config("small", None, [])
    assert build_run_config("tiny", None, []).train.optimizer == "muon"  # what must not leak into small


def test_text_settings_keep_what_was_typed():
    """An override of a text setting is the text as typed, not what YAML would read it as (`no` is not
    false, `0.10` is not the number 0.1)."""
    from minimoe.config import RunConfig
    from minimoe.config_yaml import build_run_config, set_dotted

    cfg = RunConfig()
    for key, value in (("train.sample_prompt", "no"), ("data.text_field", "0.10"), ("data.glob", "on")):
        set_dotted(cfg, key, value)
        assert getattr(cfg.train if key.startswith("train") else cfg.data, key.split(".")[1]) == value
    # only the first `=` separates the key: the value may hold more
    assert build_run_config(None, None, ["train.sample_prompt=x = 1"]).train.sample_prompt == "x = 1"


def test_quoted_words_and_digit_groups_coerce_like_yaml_reads_them():
    """A run's config.yaml is read without YAML's own typing of overrides: a quoted "yes"/"no" or
    "10_000" there means what it means unquoted."""
    from minimoe.config import TrainConfig
    from minimoe.config_yaml import dataclass_from_dict

    m = dataclass_from_dict(ModelConfig, {"tie_word_embeddings": "yes", "aux_free_bias": "no"})
    assert (m.tie_word_embeddings, m.aux_free_bias) == (True, False)
    assert dataclass_from_dict(TrainConfig, {"max_steps": "10_000"}).max_steps == 10_000


def test_a_mapping_setting_refuses_a_plain_word():
    from minimoe.config_yaml import build_run_config

    with pytest.raises(ConfigError, match="model.rope_scaling must be a mapping"):
        build_run_config(None, None, ["model.rope_scaling=yarn"])
    yarn = "{type: yarn, factor: 4, original_max_position_embeddings: 512}"
    cfg = build_run_config(None, None, [f"model.rope_scaling={yarn}"])
    assert cfg.model.rope_scaling == {"type": "yarn", "factor": 4, "original_max_position_embeddings": 512}


def test_a_run_config_error_names_the_section(tmp_path):
    """A run directory's config.yaml is read with `dataclass_from_dict(RunConfig, ...)`: a bad key or
    value names its section, as in a user's config file."""
    from minimoe.config import RunConfig
    from minimoe.config_yaml import dataclass_from_dict

    with pytest.raises(ConfigError, match="unknown config key 'train.lrr'; did you mean 'train.lr'"):
        dataclass_from_dict(RunConfig, {"train": {"lrr": 1}})
    with pytest.raises(ConfigError, match="train.max_steps must be an integer"):
        dataclass_from_dict(RunConfig, {"train": {"max_steps": "lots"}})
