"""`minimoe import` of the checkpoint layouts people have: DeepSeekMoE 16B (remote code, against the
reference forward in tests/reference.py), DeepSeek-V2-Lite, Moonlight-16B-A3B, OLMoE and Qwen3-MoE
(against transformers), each a small random checkpoint written with the published config.json keys and
tensor names; plus the q/k-norm export formats and the explicit topk_method."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import pytest
import torch

pytest.importorskip("transformers")
os.environ["HF_HUB_OFFLINE"] = "1"

from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    DeepseekV2Config,
    DeepseekV2ForCausalLM,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)
from transformers.utils import logging as hf_logging  # noqa: E402

from minimoe.cli.main import main  # noqa: E402
from minimoe.config import ModelConfig  # noqa: E402
from minimoe.data import Tokenizer  # noqa: E402
from minimoe.errors import MinimoeError  # noqa: E402
from minimoe.hf.export import export_model  # noqa: E402
from minimoe.hf.load import import_hf  # noqa: E402
from minimoe.infer.generate import generate_tokens  # noqa: E402
from minimoe.model.transformer import Transformer  # noqa: E402
from minimoe.train.checkpoint import load_run, write_run  # noqa: E402
from reference import deepseek_moe_forward, greedy_no_cache  # noqa: E402

hf_logging.set_verbosity_error()
TOL = 1e-4
IDS = torch.randint(0, 258, (2, 24), generator=torch.Generator().manual_seed(3))
SMALL = dict(vocab_size=300, hidden_size=32, num_attention_heads=4, initializer_range=0.02, bos_token_id=0,
             eos_token_id=1, hidden_act="silu", attention_bias=False, attention_dropout=0.0, use_cache=True,
             tie_word_embeddings=False, torch_dtype="bfloat16")  # fmt: skip
REMOTE = {"AutoConfig": "configuration_deepseek.DeepseekV2Config",
          "AutoModelForCausalLM": "modeling_deepseek.DeepseekV2ForCausalLM"}  # fmt: skip

# The published config.json files, keys and values as released, sizes scaled down
DEEPSEEK_MOE_16B = {
    **SMALL, "architectures": ["DeepseekForCausalLM"], "model_type": "deepseek",
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekConfig",
                 "AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM"},
    "aux_loss_alpha": 0.001, "first_k_dense_replace": 1, "intermediate_size": 88, "max_position_embeddings": 64,
    "moe_intermediate_size": 12, "moe_layer_freq": 1, "n_routed_experts": 8, "n_shared_experts": 2,
    "norm_topk_prob": False, "num_experts_per_tok": 3, "num_hidden_layers": 3, "num_key_value_heads": 4,
    "pretraining_tp": 1, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 10000, "scoring_func": "softmax",
    "seq_aux": True, "transformers_version": "4.36.0",
}  # fmt: skip
DEEPSEEK_V2_LITE = {
    **SMALL, "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "auto_map": REMOTE,
    "aux_loss_alpha": 0.001, "first_k_dense_replace": 1, "intermediate_size": 88, "kv_lora_rank": 16,
    "max_position_embeddings": 640, "moe_intermediate_size": 12, "moe_layer_freq": 1, "n_group": 1,
    "n_routed_experts": 8, "n_shared_experts": 2, "norm_topk_prob": False, "num_experts_per_tok": 3,
    "num_hidden_layers": 3, "num_key_value_heads": 4, "pretraining_tp": 1, "q_lora_rank": None,
    "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 16, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "seq_aux": True, "topk_group": 1,
    "topk_method": "greedy", "v_head_dim": 8,
}  # fmt: skip
# DeepSeek-V2 (236B) routes within the best groups: topk_method group_limited_greedy
DEEPSEEK_V2_GROUPED = {**DEEPSEEK_V2_LITE, "n_group": 4, "topk_group": 2, "topk_method": "group_limited_greedy",
                       "num_experts_per_tok": 2, "routed_scaling_factor": 16.0}  # fmt: skip
MOONLIGHT_16B_A3B = {
    **SMALL, "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                 "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"},
    "aux_loss_alpha": 0.001, "ep_size": 1, "first_k_dense_replace": 1, "intermediate_size": 88, "kv_lora_rank": 16,
    "max_position_embeddings": 64, "moe_intermediate_size": 12, "moe_layer_freq": 1, "n_group": 1,
    "n_routed_experts": 8, "n_shared_experts": 2, "norm_topk_prob": True, "num_experts_per_tok": 3,
    "num_hidden_layers": 3, "num_key_value_heads": 4, "num_nextn_predict_layers": 0, "pretraining_tp": 1,
    "q_lora_rank": None, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "rms_norm_eps": 1e-05, "rope_theta": 50000.0,
    "routed_scaling_factor": 2.446, "scoring_func": "sigmoid", "seq_aux": True, "topk_group": 1,
    "topk_method": "noaux_tc", "v_head_dim": 8,
}  # fmt: skip
OLMOE_1B_7B = {
    **SMALL, "architectures": ["OlmoeForCausalLM"], "model_type": "olmoe", "clip_qkv": None, "intermediate_size": 12,
    "max_position_embeddings": 64, "norm_topk_prob": False, "num_experts": 8, "num_experts_per_tok": 3,
    "num_hidden_layers": 2, "num_key_value_heads": 4, "output_router_logits": False, "pad_token_id": 1,
    "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 10000.0, "router_aux_loss_coef": 0.01,
}  # fmt: skip
QWEN3_30B_A3B = {
    **SMALL, "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "decoder_sparse_step": 1,
    "head_dim": 12, "intermediate_size": 88, "max_position_embeddings": 64, "max_window_layers": 2,
    "mlp_only_layers": [], "moe_intermediate_size": 12, "norm_topk_prob": True, "num_experts": 8,
    "num_experts_per_tok": 3, "num_hidden_layers": 2, "num_key_value_heads": 2, "output_router_logits": False,
    "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001,
    "sliding_window": None, "use_sliding_window": False,
}  # fmt: skip
HF_LAYOUTS = {
    "deepseek_v2_lite": (DEEPSEEK_V2_LITE, DeepseekV2Config, DeepseekV2ForCausalLM),
    "deepseek_v2_grouped": (DEEPSEEK_V2_GROUPED, DeepseekV2Config, DeepseekV2ForCausalLM),
    "moonlight": (MOONLIGHT_16B_A3B, DeepseekV3Config, DeepseekV3ForCausalLM),
    "olmoe": (OLMOE_1B_7B, OlmoeConfig, OlmoeForCausalLM),
    "qwen3_moe": (QWEN3_30B_A3B, Qwen3MoeConfig, Qwen3MoeForCausalLM),
}
# tensor names each published checkpoint has (one layer's worth; experts one file entry each)
PUBLISHED_KEYS = {
    "deepseek_v2_lite": ["model.layers.0.mlp.gate_proj.weight", "model.layers.1.mlp.gate.weight",
                         "model.layers.1.mlp.experts.7.down_proj.weight", "model.layers.1.mlp.shared_experts.up_proj.weight",
                         "model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.kv_a_proj_with_mqa.weight",
                         "model.layers.1.self_attn.kv_a_layernorm.weight", "model.layers.1.self_attn.kv_b_proj.weight"],
    "moonlight": ["model.layers.1.mlp.gate.e_score_correction_bias", "model.layers.2.mlp.experts.0.gate_proj.weight",
                  "model.layers.1.self_attn.q_proj.weight", "model.layers.1.mlp.shared_experts.down_proj.weight"],
    "olmoe": ["model.layers.0.mlp.gate.weight", "model.layers.0.mlp.experts.7.up_proj.weight",
              "model.layers.0.self_attn.q_norm.weight", "model.layers.0.self_attn.k_norm.weight"],
    "qwen3_moe": ["model.layers.0.mlp.gate.weight", "model.layers.1.mlp.experts.7.up_proj.weight",
                  "model.layers.0.self_attn.q_norm.weight", "model.layers.0.self_attn.k_norm.weight"],
}  # fmt: skip


def _randomise(model) -> None:
    """Weights large enough that a misplaced tensor shows, rounded to bf16 (the published dtype).

    The MLA latent projection is small: its RMSNorm's eps then matters (DeepSeek's code uses 1e-6 there
    whatever rms_norm_eps says; Moonlight's is 1e-5, a 14% change in the normalised latent here)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.empty_like(p).uniform_(0.5, 1.5) if "norm" in name else torch.randn_like(p) * 0.2)
            if name.endswith("kv_a_proj_with_mqa.weight"):
                p.mul_(0.005)
            p.copy_(p.bfloat16().float())
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.3)  # selection differs from the unbiased one


def _write(folder, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    """config.json as published, weights in bf16 (the balancing bias in fp32, as DeepSeek ships it)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    bf16 = {k: v if k.endswith("e_score_correction_bias") else v.bfloat16() for k, v in tensors.items()}
    save_file({k: v.contiguous() for k, v in bf16.items()}, str(folder / "model.safetensors"))


def _logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """name -> (transformers model, checkpoint folder in the published layout)."""
    root = tmp_path_factory.mktemp("published")
    out = {}
    for name, (config, config_cls, model_cls) in HF_LAYOUTS.items():
        skip = ("architectures", "auto_map", "model_type", "torch_dtype", "transformers_version")
        hf = model_cls(config_cls(**{k: v for k, v in config.items() if k not in skip})).eval()
        _randomise(hf)
        hf.save_pretrained(root / f"{name}-saved")  # per-expert names, as the hub files
        _write(root / name, config, load_file(str(root / f"{name}-saved" / "model.safetensors")))
        out[name] = hf, root / name
    return out


@pytest.mark.parametrize("name", list(HF_LAYOUTS))
def test_import_published_layout_matches_transformers(published, tmp_path, name):
    hf, folder = published[name]
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert set(PUBLISHED_KEYS.get(name, [])) <= keys and not any("gate_up_proj" in k for k in keys)
    ckpt, fmt, notes = import_hf(folder, tmp_path / "run", tokenizer="byte")
    assert fmt == HF_LAYOUTS[name][0]["model_type"] and notes == []
    ours, cfg = load_run(tmp_path / "run")[0], load_run(tmp_path / "run")[2].model
    theirs = _logits(hf)
    assert theirs.abs().max() > 1.0
    assert (_logits(ours) - theirs).abs().max().item() <= TOL
    expected = {
        "deepseek_v2_lite": dict(attn_type="mla", topk_method="greedy", n_group=1, rope_scaling={"factor": 40.0}),
        "deepseek_v2_grouped": dict(topk_method="group_limited_greedy", n_group=4, topk_group=2),
        "moonlight": dict(topk_method="noaux_tc", q_lora_rank=None, routed_scaling_factor=2.446, n_shared_experts=2),
        "olmoe": dict(attn_type="gqa", qk_norm="full", first_k_dense_replace=0, moe_intermediate_size=12, norm_topk_prob=False),
        "qwen3_moe": dict(attn_type="gqa", qk_norm="head", head_dim=12, num_key_value_heads=2, n_shared_experts=0),
    }[name]  # fmt: skip
    for field, value in expected.items():
        got = getattr(cfg, field)
        assert (got["factor"] if field == "rope_scaling" else got) == (
            value["factor"] if field == "rope_scaling" else value
        )


@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_import_deepseek_moe_16b_matches_reference(tmp_path, norm_topk_prob):
    c = {**DEEPSEEK_MOE_16B, "norm_topk_prob": norm_topk_prob}
    D, E, L = c["hidden_size"], c["n_routed_experts"], c["num_hidden_layers"]
    g = torch.Generator().manual_seed(4)

    def mat(*shape):
        return torch.randn(*shape, generator=g) * 0.2

    t = {"model.embed_tokens.weight": mat(c["vocab_size"], D), "lm_head.weight": mat(c["vocab_size"], D)}
    t["model.norm.weight"] = torch.rand(D, generator=g) + 0.5
    for i in range(L):
        p = f"model.layers.{i}."
        for n in ("input_layernorm", "post_attention_layernorm"):
            t[p + n + ".weight"] = torch.rand(D, generator=g) + 0.5
        for n in "qkvo":
            t[p + f"self_attn.{n}_proj.weight"] = mat(D, D)
        mlps = {"mlp.": c["intermediate_size"]}
        if i >= c["first_k_dense_replace"]:
            t[p + "mlp.gate.weight"] = mat(E, D)
            mlps = {f"mlp.experts.{e}.": c["moe_intermediate_size"] for e in range(E)}
            mlps["mlp.shared_experts."] = c["moe_intermediate_size"] * c["n_shared_experts"]
        for pre, inter in mlps.items():
            t.update({p + pre + "gate_proj.weight": mat(inter, D), p + pre + "up_proj.weight": mat(inter, D)})
            t[p + pre + "down_proj.weight"] = mat(D, inter)
    _write(tmp_path / "deepseek-moe-16b", c, t)
    _, fmt, _ = import_hf(tmp_path / "deepseek-moe-16b", tmp_path / "run", tokenizer="byte")
    ours, _, run_cfg, _ = load_run(tmp_path / "run")
    cfg = run_cfg.model
    assert fmt == "deepseek" and cfg.attn_type == "gqa" and cfg.kv_heads == 4 and cfg.qk_norm == "none"
    assert (cfg.scoring_func, cfg.topk_method, cfg.norm_topk_prob) == ("softmax", "greedy", norm_topk_prob)
    assert not cfg.aux_free_bias and cfg.n_shared_experts == 2 and cfg.first_k_dense_replace == 1
    stored = {
        k: v.float() for k, v in load_file(str(tmp_path / "deepseek-moe-16b" / "model.safetensors")).items()
    }
    theirs = deepseek_moe_forward(stored, c, IDS).float()
    assert theirs.abs().max() > 1.0
    assert (_logits(ours) - theirs).abs().max().item() <= TOL


# transformers' YaRN without the floor/ceil of the ramp's ends (gives other frequencies than minimoe's)
YARN_UNTRUNCATED = {
    "rope_type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 16,
    "truncate": False,
}


@pytest.mark.parametrize(
    "name, change, match",
    [
        ("deepseek", {"moe_layer_freq": 2}, "MoE layers only every moe_layer_freq layers"),
        ("deepseek", {"scoring_func": "sigmoid"}, "scoring_func='sigmoid'"),
        ("deepseek_v2", {"norm_topk_prob": True}, "norm_topk_prob=true in a deepseek_v2 config"),
        ("deepseek_v2", {"topk_method": "noaux_tc"}, "topk_method='noaux_tc'"),
        # transformers renormalises V3's single weight to 1.0, minimoe keeps sigmoid(score) for top-1
        ("deepseek_v3", {"num_experts_per_tok": 1}, "top-1 routing with norm_topk_prob=true"),
        ("olmoe", {"clip_qkv": 8.0}, r"clipped q/k/v \(clip_qkv=8.0\)"),
        ("olmoe", {"mlp_bias": True}, r"MLP biases \(mlp_bias=true\)"),
        ("deepseek_v2", {"attention_bias": True}, r"attention biases \(attention_bias=true\)"),
        ("qwen3_moe", {"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ("qwen3_moe", {"use_sliding_window": True}, "sliding-window attention"),
        ("qwen3_moe", {"decoder_sparse_step": 2}, "MoE layers only every decoder_sparse_step layers"),
        ("qwen3_moe", {"rope_scaling": YARN_UNTRUNCATED}, "YaRN with truncate=false"),
    ],
)
def test_import_refuses_what_minimoe_cannot_express(published, tmp_path, name, change, match):
    source = {
        "deepseek": "deepseek_v2_lite",
        "deepseek_v2": "deepseek_v2_lite",
        "deepseek_v3": "moonlight",
    }.get(name, name)
    config, _, _ = HF_LAYOUTS[source]
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**config, "model_type": name, **change}))
    shutil.copy(published[source][1] / "model.safetensors", folder)
    with pytest.raises(MinimoeError, match=match):
        import_hf(folder, tmp_path / "run", tokenizer="byte")


@pytest.mark.parametrize(
    "name, change, match",
    [
        ("qwen3_moe", {"mlp_only_layers": ["a"]}, "'mlp_only_layers' must be a list of layer numbers, got"),
        ("qwen3_moe", {"mlp_only_layers": 3}, "'mlp_only_layers' must be a list of layer numbers, got 3"),
        ("qwen3_moe", {"partial_rotary_factor": "half"}, "'partial_rotary_factor' must be a number"),
        ("qwen3_moe", {"rope_parameters": {"rope_type": "default", "partial_rotary_factor": "half"}},
         "'partial_rotary_factor' must be a number"),
        ("qwen3_moe", {"decoder_sparse_step": None}, None),  # null: the default, as an absent key
        ("moonlight", {"moe_layer_freq": None}, None),
    ],
)  # fmt: skip
def test_import_malformed_config_fields_are_one_sentence(published, tmp_path, name, change, match):
    """A config.json field of the wrong type is one sentence naming it, not a TypeError / ValueError."""
    hf, source = published[name]
    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**HF_LAYOUTS[name][0], **change}))
    shutil.copy(source / "model.safetensors", folder)
    if match is None:
        import_hf(folder, tmp_path / "run", tokenizer="byte")
        assert (_logits(load_run(tmp_path / "run")[0]) - _logits(hf)).abs().max().item() <= TOL
        return
    with pytest.raises(MinimoeError, match=match):
        import_hf(folder, tmp_path / "run", tokenizer="byte")


def test_import_greedy_config_ignores_its_expert_groups(published, tmp_path):
    """topk_method greedy routes over all experts whatever n_group / topk_group say (transformers and
    DeepSeek's code ignore them there): imported as ungrouped routing, not refused."""
    hf, source = published["deepseek_v2_lite"]
    folder = tmp_path / "grouped_greedy"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**DEEPSEEK_V2_LITE, "n_group": 4, "topk_group": 2}))
    shutil.copy(source / "model.safetensors", folder)
    import_hf(folder, tmp_path / "run", tokenizer="byte")
    ours = load_run(tmp_path / "run")[0]
    assert not ours.cfg.group_limited
    assert (_logits(ours) - _logits(hf)).abs().max().item() <= TOL


def test_import_refuses_a_quantized_checkpoint_before_reading_its_weights(tmp_path):
    """DeepSeek-V3/R1 are published in FP8 with per-block `weight_scale_inv` tensors: the refusal names
    the quantization, not a scale tensor, and comes before any weight is read (here there are none)."""
    fp8 = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
    }
    folder = tmp_path / "fp8"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**MOONLIGHT_16B_A3B, "quantization_config": fp8}))
    with pytest.raises(
        MinimoeError, match=r"the checkpoint is quantized \(quantization_config, quant_method='fp8'\)"
    ):
        import_hf(folder, tmp_path / "run", tokenizer="byte")


# ------------------------------------------------------------------ q/k-norm export

EXPORT_BASE = dict(vocab_size=320, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                   moe_intermediate_size=24, n_routed_experts=8, num_experts_per_tok=2, max_position_embeddings=64,
                   attn_type="gqa", initializer_range=0.2, n_shared_experts=0)  # fmt: skip
EXPORT_CASES = {
    "qwen3_moe": dict(qk_norm="head", head_dim=12, scoring_func="softmax", aux_free_bias=False,
                      first_k_dense_replace=1, routed_scaling_factor=2.0, norm_topk_prob=True),
    "olmoe": dict(qk_norm="full", scoring_func="softmax", aux_free_bias=False, first_k_dense_replace=0,
                  norm_topk_prob=False, routed_scaling_factor=1.5),
    "glm4_moe": dict(qk_norm="head", n_shared_experts=1, n_group=2, topk_group=1, topk_method="noaux_tc"),
}  # fmt: skip


def _export_model(**kw) -> Transformer:
    torch.manual_seed(1)
    m = Transformer(ModelConfig(**{**EXPORT_BASE, **kw})).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
        for mod in m.moe_layers().values():
            if mod.gate.e_score_correction_bias is not None:
                mod.gate.e_score_correction_bias.normal_(0, 0.3)
    return m


@pytest.mark.parametrize("fmt", list(EXPORT_CASES))
def test_qk_norm_export_matches_transformers_and_imports_back(tmp_path, fmt):
    m = _export_model(**EXPORT_CASES[fmt])
    res = export_model(m, Tokenizer.byte(), tmp_path / "hf")
    assert res.format == fmt
    c = json.loads((tmp_path / "hf" / "config.json").read_text())
    if fmt == "glm4_moe":
        assert c["use_qk_norm"] is True
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert type(hf).__name__ == c["architectures"][0]
    ours = _logits(m)
    assert ours.abs().max() > 1.0 and (ours - _logits(hf)).abs().max().item() <= TOL
    import_hf(tmp_path / "hf", tmp_path / "run")
    back, _, cfg, _ = load_run(tmp_path / "run")
    assert cfg.model.qk_norm == m.cfg.qk_norm
    assert (_logits(back) - ours).abs().max().item() <= 1e-5


@pytest.mark.parametrize("qk_norm", ["head", "full"])
def test_qk_norm_cached_decoding_equals_uncached(qk_norm):
    """Keys are normalised before RoPE and cached that way: decoding with the cache equals re-running
    the whole sequence, and the norm weights change the output (they are used)."""
    model = _export_model(
        qk_norm=qk_norm, scoring_func="softmax", aux_free_bias=False, first_k_dense_replace=0
    ).double()
    prompt = [5, 17, 99, 3, 250]
    want = greedy_no_cache(model, prompt, 12)
    assert list(generate_tokens(model, prompt, 12, temperature=0.0)) == want
    before = _logits(model, torch.tensor([prompt]))
    with torch.no_grad():
        model.layers[0].self_attn.k_norm.weight.mul_(2.0)
    assert (_logits(model, torch.tensor([prompt])) - before).abs().max() > 1e-3


@pytest.mark.parametrize(
    "kw, fmt, match",
    [
        (dict(qk_norm="full", scoring_func="softmax", aux_free_bias=False), "qwen3_moe",
         "qwen3_moe has qk_norm=head, the model uses qk_norm=full"),
        (dict(qk_norm="head", scoring_func="softmax", aux_free_bias=False), "mixtral",
         "mixtral has qk_norm=none, the model uses qk_norm=head"),
        (dict(qk_norm="full"), None, "glm4_moe has qk_norm=none or head, the model uses qk_norm=full"),
        (dict(qk_norm="full", scoring_func="softmax", aux_free_bias=False, head_dim=12, first_k_dense_replace=0), "olmoe",
         "olmoe sizes its q/k norms by hidden_size"),
        (dict(qk_norm="head", n_shared_experts=1, scoring_func="softmax", aux_free_bias=False), "qwen3_moe",
         "qwen3_moe has no shared experts"),
        (dict(n_group=2, topk_group=1, topk_method="group_limited_greedy"), "glm4_moe",
         "glm4_moe scores a group by its two best experts \\(noaux_tc\\), the model uses "
         "topk_method=group_limited_greedy"),
    ],
)  # fmt: skip
def test_export_refuses_q_k_norms_and_group_rules_it_cannot_express(tmp_path, kw, fmt, match):
    with pytest.raises(MinimoeError, match=match):
        export_model(_export_model(**kw), Tokenizer.byte(), tmp_path / "hf", fmt=fmt)
    assert not (tmp_path / "hf").exists()


# ------------------------------------------------------------------ topk_method


def test_configs_without_topk_method_keep_their_group_rule():
    """Configs written before the field existed derive it as they always did; an explicit value wins."""
    old = dict(n_routed_experts=8, n_group=4, topk_group=2)
    assert ModelConfig(**old, scoring_func="sigmoid").effective_topk_method == "noaux_tc"
    assert ModelConfig(**old, scoring_func="softmax").effective_topk_method == "group_limited_greedy"
    assert ModelConfig(scoring_func="softmax").effective_topk_method == "greedy"
    new = ModelConfig(**old, scoring_func="softmax", topk_method="noaux_tc")
    assert new.effective_topk_method == "noaux_tc" and new.group_limited
    torch.manual_seed(0)
    x = torch.randn(1, 64, 32)
    a, b = (
        Transformer(ModelConfig(**old, hidden_size=32, scoring_func="softmax", aux_free_bias=False, **extra))
        for extra in ({}, {"topk_method": "group_limited_greedy"})
    )
    b.load_state_dict(a.state_dict())
    gate_a, gate_b = a.layers[1].mlp.gate, b.layers[1].mlp.gate
    assert torch.equal(gate_a(x).topk_idx, gate_b(x).topk_idx)
    gate_b.cfg = dataclasses.replace(
        gate_b.cfg, topk_method="noaux_tc"
    )  # picks other experts for some tokens
    assert not torch.equal(gate_a(x).topk_idx, gate_b(x).topk_idx)


def test_cli_export_olmoe_verified_and_refusal(tmp_path, capsys):
    write_run(tmp_path / "run", _export_model(**EXPORT_CASES["olmoe"]), Tokenizer.byte(), {"source": "test"})
    argv = ["export", str(tmp_path / "run"), "--out", str(tmp_path / "hf"), "--format", "olmoe", "--verify"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "exported olmoe" in out and float(out.split("against transformers (model):")[1].split()[0]) <= TOL
    argv = ["export", str(tmp_path / "run"), "--out", str(tmp_path / "q3"), "--format", "qwen3_moe"]
    assert main(argv) == 2 and not (tmp_path / "q3").exists()
    err = capsys.readouterr().err.strip()
    assert err.endswith(
        "cannot export to a Hugging Face format: qwen3_moe has qk_norm=head, the model uses qk_norm=full"
    )


def test_cli_import_qwen3_layout_and_generate(published, tmp_path, capsys):
    _, folder = published["qwen3_moe"]
    assert main(["import", str(folder), "--out", str(tmp_path / "run"), "--tokenizer", "byte"]) == 0
    assert "qwen3_moe" in capsys.readouterr().out
    argv = [
        "generate",
        str(tmp_path / "run"),
        "--prompt",
        "ab",
        "--max-new-tokens",
        "3",
        "--temperature",
        "0",
    ]
    assert main(argv) == 0
