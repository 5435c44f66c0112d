"""Named model configurations, the training recipe that goes with each, and the notes saying where a
seed preset departs from its document.

A preset lists only the fields that differ from the `ModelConfig` defaults. The seed presets
(`optimal-moe`, `mymoe`, `deepseek-mini`, `deepseek-moe-16b`) are the seed systems: their shape,
vocabulary, tokenizer and training recipe, with every departure in `NOTES` (printed by
`minimoe params PRESET`, logged by `minimoe train --preset PRESET`).
"""

from __future__ import annotations

import copy
import difflib
from typing import Any

from minimoe.config import ModelConfig
from minimoe.errors import ConfigError

# name -> the ModelConfig fields that differ from the defaults
PRESET_FIELDS: dict[str, dict[str, Any]] = {
    # CPU demo: trains to readable text in minutes on 2 cores (see README for measured numbers).
    # No MTP: it costs about a quarter of the training compute and did not pay within minutes of CPU, and
    # bias update speed 0.01: V3's 0.001 balances too slowly for runs of hundreds to thousands of steps
    # (docs/RESULTS.md, recipe search); `small` keeps MTP.
    # MHA, not MLA: at width 192 MLA's latent cost quality and saved nothing in training (0.026 nats/byte
    # lower with MHA at the same speed on the children's books, bf16; the Shakespeare headline confirms:
    # docs/RESULTS.md). The larger presets keep MLA; `model.attn_type=mla` puts it back here.
    "tiny": dict(
        hidden_size=192, max_position_embeddings=512, attn_type="gqa", moe_intermediate_size=128,
        seq_aux_loss_alpha=1e-4, bias_update_speed=0.01, tie_word_embeddings=True,
    ),
    # ~100M total parameters: laptop / Colab.
    "small": dict(
        vocab_size=16384, hidden_size=512, num_hidden_layers=8, num_attention_heads=8, kv_lora_rank=128, qk_nope_head_dim=64,
        qk_rope_head_dim=32, v_head_dim=64, intermediate_size=1536, n_routed_experts=16,
        moe_intermediate_size=384, seq_aux_loss_alpha=1e-4, mtp_depth=1,
    ),
    # Seed "Optimal MoE": 8 SwiGLU experts top-2 at 3.5 x dim, GQA 8/2, aux-free bias + z-loss, GPT-2
    # vocabulary, tied embedding.
    "optimal-moe": dict(
        vocab_size=50257, hidden_size=512, num_hidden_layers=8, num_attention_heads=8, max_position_embeddings=512, attn_type="gqa",
        num_key_value_heads=2, first_k_dense_replace=0, n_shared_experts=0, moe_intermediate_size=1792, z_loss_coef=1e-3,
        tie_word_embeddings=True,
    ),
    # Seed "MyMoE": 2 experts top-1 with capacity, jitter and aux loss; GPT-2 vocabulary padded to 50304.
    "mymoe": dict(
        vocab_size=50304, hidden_size=768, num_hidden_layers=12, max_position_embeddings=128, attn_type="gqa", num_key_value_heads=2,
        first_k_dense_replace=0, n_routed_experts=2, n_shared_experts=0, num_experts_per_tok=1,
        moe_intermediate_size=1536, scoring_func="softmax", norm_topk_prob=False, router_jitter=0.01,
        aux_free_bias=False, aux_loss_alpha=0.01, capacity_factor=1.25, tie_word_embeddings=True,
    ),
    # Seed "DeepSeek (Mini)": MLA with compression ratio 8 (kv_lora_rank = 576 / 8 = 72), head dim 72
    # split 48 nope + 24 rope; 8 GELU experts + 1 shared, top-2; SmolLM2's vocabulary, tied embedding.
    "deepseek-mini": dict(
        vocab_size=49152, hidden_size=576, num_hidden_layers=30, num_attention_heads=8, max_position_embeddings=128, kv_lora_rank=72,
        qk_nope_head_dim=48, qk_rope_head_dim=24, v_head_dim=72, first_k_dense_replace=0,
        moe_intermediate_size=1536, expert_act="gelu", scoring_func="softmax", aux_free_bias=False,
        aux_loss_alpha=0.01, z_loss_coef=1e-3, tie_word_embeddings=True,
    ),
    # DeepSeekMoE 16B (arXiv 2401.06066; HF deepseek-moe-16b-base config.json). num_key_value_heads = num_attention_heads:
    # the published model is MHA (see NOTES).
    "deepseek-moe-16b": dict(
        vocab_size=102400, hidden_size=2048, num_hidden_layers=28, num_attention_heads=16, max_position_embeddings=4096, attn_type="gqa",
        num_key_value_heads=16, intermediate_size=10944, n_routed_experts=64, n_shared_experts=2,
        num_experts_per_tok=6, moe_intermediate_size=1408, scoring_func="softmax", norm_topk_prob=False,
        aux_free_bias=False, seq_aux_loss_alpha=0.001,
    ),
    # DeepSeek-V3 (arXiv 2412.19437; HF deepseek-ai/DeepSeek-V3 config.json).
    "deepseek-v3": dict(
        vocab_size=129280, hidden_size=7168, num_hidden_layers=61, num_attention_heads=128, max_position_embeddings=163840,
        q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        rope_scaling={
            "type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
            "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0,
        },
        intermediate_size=18432, first_k_dense_replace=3, n_routed_experts=256, num_experts_per_tok=8,
        moe_intermediate_size=2048, routed_scaling_factor=2.5, n_group=8, topk_group=4,
        seq_aux_loss_alpha=1e-4, mtp_depth=1,
    ),
}  # fmt: skip

PRESETS: dict[str, ModelConfig] = {name: ModelConfig(**copy.deepcopy(f)) for name, f in PRESET_FIELDS.items()}

# The training recipe of a preset (dotted keys that differ from the TrainConfig/DataConfig defaults),
# applied before the user's config and overrides. AdamW betas 0.9/0.95, weight decay 0.1, gradient
# clipping 1.0 and a cosine schedule are the defaults, and the seeds' recipes too.
TRAIN_DEFAULTS: dict[str, dict[str, object]] = {
    # the quickstart: at most 8 minutes of training on 2 cores, whatever the machine's speed
    "tiny": {
        # sequence length 128 (not 256): twice the optimizer steps for the same tokens, 0.14 nats lower after
        # 3 CPU-minutes on children's books (docs/RESULTS.md, recipe screen)
        "train.seq_len": 128, "train.batch_size": 16, "train.max_steps": 4000, "train.max_minutes": 8,
        # 16-30 warmup steps to lr 3e-3 left some seeds on a 3.0-nat plateau (docs/RESULTS.md)
        "train.warmup_steps": 100, "train.eval_every": 100, "train.eval_batches": 8,
        "data.tokenizer": "bpe:4096",
        # Muon for the hidden matrices, AdamW for the rest: 0.085 nats/byte lower than AdamW after 5
        # CPU-minutes on the children's books, 0.092 on TinyStories, lower on Shakespeare too, although its Newton-Schulz
        # iterations cost about a fifth of the steps (docs/RESULTS.md, r7 and the Muon headline; BENCHMARKS.md, M)
        "train.optimizer": "muon",
    },
    "small": {"train.seq_len": 512, "train.batch_size": 16, "data.tokenizer": "bpe:16384"},
    # launch_training.py defaults: batch 4 x 16 accumulation, lr 3e-4, warmup 2000 of 10000 steps, bf16
    "optimal-moe": {
        "train.seq_len": 512, "train.batch_size": 4, "train.grad_accum": 16, "train.lr": 3e-4,
        "train.warmup_steps": 2000, "train.max_steps": 10000, "train.precision": "bf16",
        "data.tokenizer": "gpt2",
    },
    "mymoe": {"train.seq_len": 128, "train.lr": 3e-4, "train.warmup_steps": 100, "data.tokenizer": "gpt2"},
    # lr 3e-4 cosine, warmup 20, effective batch 8, FP16 autocast + GradScaler
    "deepseek-mini": {
        "train.seq_len": 128, "train.batch_size": 8, "train.lr": 3e-4, "train.warmup_steps": 20,
        "train.precision": "fp16", "data.tokenizer": "smollm2",
    },
    # paper, section 5.1: 4.5K x 4K-token batches (4608 = 16 x 288), lr 4.2e-4 after 2K warmup steps,
    # 2T tokens (~106K steps), bf16
    "deepseek-moe-16b": {
        "train.seq_len": 4096, "train.batch_size": 16, "train.grad_accum": 288, "train.lr": 4.2e-4,
        "train.warmup_steps": 2000, "train.max_steps": 106_000, "train.schedule": "wsd",
        "train.decay_fraction": 0.2, "train.min_lr_ratio": 0.1, "train.precision": "bf16",
        "data.tokenizer": "deepseek-moe",
    },
}  # fmt: skip

# The presets that are the seed systems: trained with their own tokenizer, they keep their vocabulary.
SEED_PRESETS = ("optimal-moe", "mymoe", "deepseek-mini", "deepseek-moe-16b")

# Where a preset's default tokenizer cannot be found, what it trains instead (said in a warning).
TOKENIZER_FALLBACKS: dict[str, str] = {"deepseek-mini": "bpe:49152"}

# Every place a seed preset departs from (or fills in) its document, one line each, with the reason.
NOTES: dict[str, list[str]] = {
    "optimal-moe": [
        "the document claims ~47M total / ~13M active parameters; with its GPT-2 vocabulary, tied "
        "embedding and 3.5 x dim experts the model has the counts shown here",
        "z-loss weight 1e-3: the document turns z-loss on without giving its weight",
        "the '<5% of tokens' alert fires below 0.4 x the fair share 1/E, which is 5% at its 8 experts",
    ],
    "mymoe": [
        "the document gives no training settings beyond sequence length 128; lr 3e-4 with 100 warmup "
        "steps follows the sibling seeds",
        "FFN multiplier 2.0 read as a SwiGLU expert of width 2 x dim; capacity factor 1.25, jitter 0.01 "
        "and aux loss 0.01 are the usual Switch values (the document gives none)",
    ],
    "deepseek-mini": [
        "tokenizer: SmolLM2's (49152 tokens) when found; otherwise a 49152-token BPE trained on the data, "
        "so the model keeps the seed's size",
        "fp16 + GradScaler needs a CUDA GPU; on a CPU the recipe trains in bf16 autocast instead",
        "'1 KV head (GQA-style)': MLA has no KV heads; all 8 heads share one latent of rank 72 instead",
        "expert width 1536 (SmolLM2-135M's MLP width) and aux 0.01 / z-loss 1e-3: the document gives neither",
        "the seed warm-starts from SmolLM2, whose GQA attention and SwiGLU MLP do not map onto MLA and "
        "GELU experts; minimoe trains from scratch",
    ],
    "deepseek-moe-16b": [
        "top-k weights are not renormalised and attention is MHA (16 KV heads): the seed text says "
        "renormalised and GQA, but the published config.json (norm_topk_prob false, "
        "num_key_value_heads 16) and the published 16.4B / 2.8B counts are the model",
        "the paper's step decay (x0.316 at 80% and 90% of tokens) is run as warmup-stable-decay: "
        "linear decay over the last 20% of steps to 0.1 x lr (= 0.316^2)",
        "tokenizer: DeepSeek's 100K BPE (deepseek-ai/deepseek-moe-16b-base), which must be present "
        "locally; nothing is downloaded",
    ],
}


def get_preset(name: str) -> ModelConfig:
    """A fresh ModelConfig of the named preset (ConfigError, with a suggestion, for an unknown name)."""
    if name not in PRESET_FIELDS:
        close = difflib.get_close_matches(name, PRESET_FIELDS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f" (choose from {', '.join(PRESET_FIELDS)})"
        raise ConfigError(f"unknown preset '{name}'{hint}")
    return ModelConfig(**copy.deepcopy(PRESET_FIELDS[name]))


def preset_train_defaults(name: str) -> dict[str, object]:
    return dict(TRAIN_DEFAULTS.get(name, {}))
