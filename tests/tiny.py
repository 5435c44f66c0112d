"""The smallest run the tests train: a 2-layer MLA MoE (4 routed experts, top-2) on bytes, in seconds.

Test files extend these dotted overrides; a later `key=value` wins over an earlier one."""

TINY_MODEL = [
    "model.attn_type=mla",  # the `tiny` preset is MHA since the bf16 recipe search: the tests keep MLA
    "model.hidden_size=32", "model.num_hidden_layers=2", "model.num_attention_heads=2", "model.kv_lora_rank=16",
    "model.qk_nope_head_dim=8", "model.qk_rope_head_dim=8", "model.v_head_dim=8",
    "model.intermediate_size=64", "model.moe_intermediate_size=16", "model.n_routed_experts=4",
    "model.num_experts_per_tok=2", "model.max_position_embeddings=64", "model.mtp_depth=1",
    "model.bias_update_speed=0.001",  # the test model stays as it was when the tiny recipe changes
]  # fmt: skip
TINY_TRAIN = TINY_MODEL + [
    "train.seq_len=32", "train.batch_size=4", "train.eval_batches=2", "train.log_every=1",
    "train.warmup_steps=2", "data.tokenizer=byte", "data.workers=0", "train.sample_tokens=0",
    "train.precision=fp32",  # auto would pick bf16 on some CPUs: the tests' numbers must not depend on the host
    "train.optimizer=adamw",  # the `tiny` recipe trains with Muon: the test model stays on AdamW
]  # fmt: skip
