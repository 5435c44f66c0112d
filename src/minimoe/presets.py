"""Named model configurations.

The seed presets (`optimal-moe`, `mymoe`, `deepseek-mini`) follow the numbers their documents give;
where a document is silent the choice is written next to the field. `minimoe params PRESET`
reports their true sizes, which differ from some of the documents' claims (see README).
"""

from __future__ import annotations

import copy

from minimoe.config import ModelConfig
from minimoe.errors import ConfigError

PRESETS: dict[str, ModelConfig] = {
    # CPU demo: trains to readable text in minutes on 2 cores (see README for measured numbers).
    "tiny": ModelConfig(
        vocab_size=4096,
        hidden_size=192,
        n_layers=4,
        n_heads=4,
        max_seq_len=512,
        attn_type="mla",
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        intermediate_size=512,
        first_k_dense=1,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        moe_intermediate_size=128,
        scoring_func="sigmoid",
        aux_free_bias=True,
        bias_update_speed=0.001,
        seq_aux_loss_alpha=1e-4,
        mtp_depth=1,
        mtp_loss_weight=0.3,
        tie_word_embeddings=True,
        dropout=0.0,
    ),
    # ~100M total parameters: laptop / Colab.
    "small": ModelConfig(
        vocab_size=16384,
        hidden_size=512,
        n_layers=8,
        n_heads=8,
        max_seq_len=1024,
        attn_type="mla",
        kv_lora_rank=128,
        qk_nope_head_dim=64,
        qk_rope_head_dim=32,
        v_head_dim=64,
        intermediate_size=1536,
        first_k_dense=1,
        n_routed_experts=16,
        n_shared_experts=1,
        num_experts_per_tok=2,
        moe_intermediate_size=384,
        scoring_func="sigmoid",
        aux_free_bias=True,
        seq_aux_loss_alpha=1e-4,
        mtp_depth=1,
        tie_word_embeddings=False,
    ),
    # Seed "Optimal MoE": its code hard-codes the expert width at 3.5 x dim and ties the embedding.
    "optimal-moe": ModelConfig(
        vocab_size=50257,
        hidden_size=512,
        n_layers=8,
        n_heads=8,
        n_kv_heads=2,
        max_seq_len=512,
        attn_type="gqa",
        first_k_dense=0,
        n_routed_experts=8,
        n_shared_experts=0,
        num_experts_per_tok=2,
        moe_intermediate_size=1792,
        scoring_func="sigmoid",
        aux_free_bias=True,
        z_loss_coef=1e-3,
        tie_word_embeddings=True,
    ),
    # Seed "MyMoE": FFN multiplier 2.0 read as a SwiGLU expert of width 2 x dim; capacity factor 1.25,
    # jitter 0.01 and aux loss 0.01 are the usual Switch-style values (the document gives none).
    "mymoe": ModelConfig(
        vocab_size=50304,
        hidden_size=768,
        n_layers=12,
        n_heads=4,
        n_kv_heads=2,
        max_seq_len=128,
        attn_type="gqa",
        first_k_dense=0,
        n_routed_experts=2,
        n_shared_experts=0,
        num_experts_per_tok=1,
        moe_intermediate_size=1536,
        scoring_func="softmax",
        norm_topk_prob=False,
        aux_free_bias=False,
        aux_loss_alpha=0.01,
        capacity_factor=1.25,
        router_jitter=0.01,
        tie_word_embeddings=True,
    ),
    # Seed "DeepSeek (Mini)": MLA with compression ratio 8 (kv_lora_rank = 576 / 8 = 72), head dim 72
    # split 48 nope + 24 rope; GELU experts of width 1536 (SmolLM2-135M's MLP width, whose tokenizer and
    # tied embedding it uses); aux + z-loss with the usual 0.01 / 0.001.
    "deepseek-mini": ModelConfig(
        vocab_size=49152,
        hidden_size=576,
        n_layers=30,
        n_heads=8,
        max_seq_len=128,
        attn_type="mla",
        kv_lora_rank=72,
        qk_nope_head_dim=48,
        qk_rope_head_dim=24,
        v_head_dim=72,
        first_k_dense=0,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        moe_intermediate_size=1536,
        expert_act="gelu",
        scoring_func="softmax",
        aux_free_bias=False,
        aux_loss_alpha=0.01,
        z_loss_coef=1e-3,
        tie_word_embeddings=True,
    ),
    # DeepSeekMoE 16B (arXiv 2401.06066; HF deepseek-moe-16b-base config.json).
    "deepseek-moe-16b": ModelConfig(
        vocab_size=102400,
        hidden_size=2048,
        n_layers=28,
        n_heads=16,
        n_kv_heads=16,
        max_seq_len=4096,
        attn_type="gqa",
        intermediate_size=10944,
        first_k_dense=1,
        n_routed_experts=64,
        n_shared_experts=2,
        num_experts_per_tok=6,
        moe_intermediate_size=1408,
        scoring_func="softmax",
        norm_topk_prob=False,
        aux_free_bias=False,
        seq_aux_loss_alpha=0.001,
        tie_word_embeddings=False,
    ),
    # DeepSeek-V3 (arXiv 2412.19437; HF deepseek-ai/DeepSeek-V3 config.json).
    "deepseek-v3": ModelConfig(
        vocab_size=129280,
        hidden_size=7168,
        n_layers=61,
        n_heads=128,
        max_seq_len=163840,
        attn_type="mla",
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        rope_theta=10000.0,
        rope_scaling={
            "type": "yarn",
            "factor": 40,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
        intermediate_size=18432,
        first_k_dense=3,
        n_routed_experts=256,
        n_shared_experts=1,
        num_experts_per_tok=8,
        moe_intermediate_size=2048,
        scoring_func="sigmoid",
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        n_group=8,
        topk_group=4,
        aux_free_bias=True,
        bias_update_speed=0.001,
        seq_aux_loss_alpha=1e-4,
        mtp_depth=1,
        mtp_loss_weight=0.3,
        tie_word_embeddings=False,
    ),
}

# Training defaults that go with a preset (dotted keys), applied before the user's config.
TRAIN_DEFAULTS: dict[str, dict[str, object]] = {
    # the quickstart: at most 8 minutes of training on 2 cores, whatever the machine's speed
    "tiny": {
        "train.seq_len": 256,
        "train.batch_size": 16,
        "train.max_steps": 2000,
        "train.max_minutes": 8,
        "train.warmup_steps": 30,
        "train.eval_every": 100,
        "train.eval_batches": 8,
        "data.tokenizer": "bpe:4096",
    },
    "small": {"train.seq_len": 512, "train.batch_size": 16, "data.tokenizer": "bpe:16384"},
    "mymoe": {"train.seq_len": 128},
    "deepseek-mini": {"train.seq_len": 128},
}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        import difflib

        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f" (choose from {', '.join(PRESETS)})"
        raise ConfigError(f"unknown preset '{name}'{hint}")
    return copy.deepcopy(PRESETS[name])


def preset_train_defaults(name: str) -> dict[str, object]:
    return dict(TRAIN_DEFAULTS.get(name, {}))
