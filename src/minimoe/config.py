"""Configuration: ModelConfig (one flat dataclass, HF DeepseekV3 names where they exist),
TrainConfig and DataConfig, grouped in RunConfig. Reading them from YAML and dotted overrides is
`minimoe.config_yaml`; named configs are `minimoe.presets`. This module imports neither."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal

from minimoe.errors import ConfigError

# the numeric entries of a YaRN `rope_scaling` mapping (model/rope.py reads them)
YARN_NUMBERS = (
    "factor",
    "original_max_position_embeddings",
    "beta_fast",
    "beta_slow",
    "mscale",
    "mscale_all_dim",
)


@dataclass
class ModelConfig:
    # sizes
    vocab_size: int = 4096
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    max_position_embeddings: int = 1024
    # attention
    attn_type: Literal["mla", "gqa"] = "mla"
    num_key_value_heads: int | None = None  # gqa only; None = num_attention_heads (MHA)
    head_dim: int | None = None  # gqa only; None = hidden_size // num_attention_heads
    # gqa only: RMSNorm on queries and keys before RoPE. "head": over each head (Qwen3-MoE, GLM-4.5
    # use_qk_norm); "full": over the whole q/k projection (OLMoE). HF names: q_norm, k_norm
    qk_norm: Literal["none", "head", "full"] = "none"
    q_lora_rank: int | None = None  # mla: None = direct q_proj
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    rope_theta: float = 10000.0
    # YaRN: {"type": "yarn", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
    #        "mscale", "mscale_all_dim"}; None = plain RoPE
    rope_scaling: dict | None = None
    # feed-forward
    intermediate_size: int = 512  # dense SwiGLU layers
    first_k_dense_replace: int = 1  # the first k layers are dense, the rest MoE
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 256
    expert_act: Literal["swiglu", "gelu"] = "swiglu"
    # routing
    scoring_func: Literal["softmax", "sigmoid"] = "sigmoid"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    # how a group is scored (HF names): "noaux_tc" sum of its top-2 (DeepSeek-V3), "group_limited_greedy"
    # its best expert (DeepSeek-V2), "greedy" no group limit; None = sigmoid: noaux_tc, softmax: the
    # V2 rule (configs written before this field existed)
    topk_method: Literal["greedy", "group_limited_greedy", "noaux_tc"] | None = None
    router_jitter: float = 0.0  # multiplicative noise eps in training (Switch/MyMoE style)
    # balancing
    aux_free_bias: bool = True  # DeepSeek-V3 auxiliary-loss-free bias (selection only)
    bias_update_speed: float = 0.001
    aux_loss_alpha: float = 0.0  # token-level (batch) balance loss
    seq_aux_loss_alpha: float = 0.0  # sequence-wise balance loss (V3 eq. 17-20)
    z_loss_coef: float = 0.0
    capacity_factor: float | None = None  # None = dropless; drops only in training (eval mode is dropless)
    moe_impl: Literal["auto", "grouped_mm", "loop"] = "auto"
    # multi-token prediction
    mtp_depth: int = 0
    mtp_loss_weight: float = 0.3
    # misc
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    dropout: float = 0.0  # residual branches
    attn_dropout: float = 0.0
    initializer_range: float = 0.02

    # ---- derived ----
    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def gqa_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def rope_dim(self) -> int:
        """Dimensions RoPE rotates per head."""
        return self.qk_rope_head_dim if self.attn_type == "mla" else self.gqa_head_dim

    @property
    def effective_topk_method(self) -> str:
        """topk_method, or the rule a config without one has always had (the only place it is derived)."""
        if self.topk_method is not None:
            return self.topk_method
        if self.scoring_func == "sigmoid":
            return "noaux_tc"
        return "group_limited_greedy" if self.n_group > 1 else "greedy"

    @property
    def group_limited(self) -> bool:
        """Whether routing keeps only `topk_group` of `n_group` expert groups per token."""
        grouped = self.n_group > 1 and self.topk_group < self.n_group
        return grouped and self.effective_topk_method != "greedy"

    def is_moe_layer(self, i: int) -> bool:
        return i >= self.first_k_dense_replace and self.n_routed_experts > 0

    def validate(self) -> ModelConfig:
        """Raise ConfigError with one sentence naming the field if the config is not buildable."""

        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "max_position_embeddings",
            "intermediate_size",
        ):
            need(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        need(self.attn_type in ("mla", "gqa"), f"attn_type must be 'mla' or 'gqa', got {self.attn_type!r}")
        if self.attn_type == "gqa":
            if self.head_dim is None:
                need(
                    self.hidden_size % self.num_attention_heads == 0,
                    f"num_attention_heads ({self.num_attention_heads}) does not divide hidden_size ({self.hidden_size})",
                )
            need(self.gqa_head_dim > 0, f"head_dim must be positive, got {self.head_dim}")
            need(self.gqa_head_dim % 2 == 0, f"head_dim ({self.gqa_head_dim}) must be even for RoPE")
            need(
                1 <= self.kv_heads <= self.num_attention_heads
                and self.num_attention_heads % self.kv_heads == 0,
                f"num_key_value_heads ({self.kv_heads}) must divide num_attention_heads ({self.num_attention_heads})",
            )
            need(
                self.qk_norm in ("none", "head", "full"),
                f"qk_norm must be none, head or full, got {self.qk_norm!r}",
            )
        else:
            need(self.qk_norm == "none", f"qk_norm ({self.qk_norm}) is a GQA option; MLA has no q/k norm")
            for name in ("kv_lora_rank", "qk_rope_head_dim", "v_head_dim"):
                need(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
            need(self.qk_nope_head_dim >= 0, f"qk_nope_head_dim must be >= 0, got {self.qk_nope_head_dim}")
            need(
                self.qk_rope_head_dim % 2 == 0,
                f"qk_rope_head_dim ({self.qk_rope_head_dim}) must be even for RoPE",
            )
            need(
                self.q_lora_rank is None or self.q_lora_rank > 0,
                f"q_lora_rank must be positive or null, got {self.q_lora_rank}",
            )
        need(
            0 <= self.first_k_dense_replace <= self.num_hidden_layers,
            f"first_k_dense_replace ({self.first_k_dense_replace}) must be between 0 and num_hidden_layers ({self.num_hidden_layers})",
        )
        need(self.n_routed_experts >= 0, f"n_routed_experts must be >= 0, got {self.n_routed_experts}")
        if self.n_routed_experts > 0:
            need(
                self.num_experts_per_tok >= 1,
                f"num_experts_per_tok must be at least 1, got {self.num_experts_per_tok}",
            )
            need(
                self.num_experts_per_tok <= self.n_routed_experts,
                f"num_experts_per_tok ({self.num_experts_per_tok}) is larger than "
                f"n_routed_experts ({self.n_routed_experts})",
            )
            need(self.moe_intermediate_size > 0, "moe_intermediate_size must be positive")
            # 0 would cut the routed experts and the router off from the loss; a negative factor flips them
            need(
                self.routed_scaling_factor > 0,
                f"routed_scaling_factor must be positive, got {self.routed_scaling_factor}",
            )
            need(self.n_shared_experts >= 0, "n_shared_experts must be >= 0")
            need(self.n_group >= 1, f"n_group must be at least 1, got {self.n_group}")
            need(
                self.n_routed_experts % self.n_group == 0,
                f"n_routed_experts ({self.n_routed_experts}) is not divisible into n_group ({self.n_group}) groups",
            )
            need(
                1 <= self.topk_group <= self.n_group,
                f"topk_group ({self.topk_group}) must be between 1 and n_group ({self.n_group})",
            )
            per_group = self.n_routed_experts // self.n_group
            need(
                self.num_experts_per_tok <= self.topk_group * per_group,
                f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds the experts in topk_group "
                f"({self.topk_group}) groups of {per_group}",
            )
            method = self.effective_topk_method
            need(
                method in ("greedy", "group_limited_greedy", "noaux_tc"),
                f"topk_method must be greedy, group_limited_greedy or noaux_tc, got {method!r}",
            )
            need(
                method != "greedy" or self.n_group == 1 or self.topk_group == self.n_group,
                f"topk_method greedy limits no groups; n_group ({self.n_group}) and topk_group "
                f"({self.topk_group}) need group_limited_greedy or noaux_tc",
            )
            if self.n_group > 1 and method == "noaux_tc":
                # V3 scores a group by the sum of its top-2 experts
                need(
                    per_group >= 2,
                    f"n_group ({self.n_group}) leaves {per_group} expert per group; topk_method noaux_tc "
                    "needs at least 2",
                )
        need(
            self.scoring_func in ("softmax", "sigmoid"),
            f"scoring_func must be 'softmax' or 'sigmoid', got {self.scoring_func!r}",
        )
        need(
            self.expert_act in ("swiglu", "gelu"),
            f"expert_act must be 'swiglu' or 'gelu', got {self.expert_act!r}",
        )
        need(
            self.moe_impl in ("auto", "grouped_mm", "loop"),
            f"moe_impl must be auto, grouped_mm or loop, got {self.moe_impl!r}",
        )
        need(
            self.capacity_factor is None or self.capacity_factor > 0,
            f"capacity_factor must be positive or null, got {self.capacity_factor}",
        )
        need(self.router_jitter >= 0, f"router_jitter must be >= 0, got {self.router_jitter}")
        for name in (
            "aux_loss_alpha",
            "seq_aux_loss_alpha",
            "z_loss_coef",
            "bias_update_speed",
            "mtp_loss_weight",
        ):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("dropout", "attn_dropout"):
            need(0 <= getattr(self, name) < 1, f"{name} must be in [0, 1), got {getattr(self, name)}")
        need(self.mtp_depth >= 0, f"mtp_depth must be >= 0, got {self.mtp_depth}")
        # each would fail later: a non-finite RoPE table or norm (reported as a diverged run), or torch's
        # error from the weight initialisation
        need(self.rope_theta > 0, f"rope_theta must be positive, got {self.rope_theta}")
        need(self.rms_norm_eps >= 0, f"rms_norm_eps must be >= 0, got {self.rms_norm_eps}")
        need(self.initializer_range >= 0, f"initializer_range must be >= 0, got {self.initializer_range}")
        if self.rope_scaling is not None:
            rs = self.rope_scaling
            need(isinstance(rs, dict), "rope_scaling must be a mapping or null")
            unknown = sorted(set(rs) - {"type", "rope_type", *YARN_NUMBERS})
            if unknown:  # a misspelt key would leave its default in place, silently
                raise ConfigError(
                    f"rope_scaling has no key {unknown[0]!r} (it takes {', '.join(YARN_NUMBERS)})"
                )
            for key in ("type", "rope_type"):  # either spelling, and both when both are given
                need(rs.get(key, "yarn") == "yarn", f"rope_scaling {key} must be 'yarn', got {rs.get(key)!r}")
            for key in YARN_NUMBERS:
                v = rs.get(key, 0)
                need(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
                    f"rope_scaling.{key} must be a number, got {v!r}",
                )
            need(float(rs.get("factor", 0)) >= 1, "rope_scaling.factor must be >= 1")
            need(
                int(rs.get("original_max_position_embeddings", 0)) > 0,
                "rope_scaling.original_max_position_embeddings must be positive",
            )
            # the YaRN ramp's ends are log(original / (2 pi beta)): a beta of 0 divides by zero
            for key in ("beta_fast", "beta_slow"):
                need(rs.get(key, 1) > 0, f"rope_scaling.{key} must be positive, got {rs.get(key)}")
            fast, slow = rs.get("beta_fast", 32), rs.get("beta_slow", 1)  # the ramp runs from fast to slow
            need(fast > slow, f"rope_scaling.beta_fast ({fast}) must be larger than beta_slow ({slow})")
        return self


@dataclass
class DataConfig:
    path: str | None = None  # file, folder, .jsonl, .parquet, .npy/.bin, or hf:NAME; None = built-in corpus
    val_path: str | None = None  # a separate validation source; None = split val_fraction off `path`
    tokenizer: str = "byte"  # byte, bpe:VOCAB, a tokenizer.json (or folder), or a name: gpt2, hf:ORG/NAME
    text_field: str = "text"
    glob: str = "**/*"
    val_fraction: float = 0.01
    cache_dir: str | None = None  # shards in DIR/prepared/; None: $MINIMOE_CACHE or ~/.cache/minimoe
    workers: int = 2


@dataclass
class TrainConfig:
    max_steps: int = 1000
    max_minutes: float | None = None
    clock: Literal["wall", "cpu"] = "wall"  # what max_minutes counts: wall time or this process's CPU time
    batch_size: int = 16
    seq_len: int = 256
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    schedule: Literal["cosine", "linear", "constant", "wsd"] = "cosine"
    warmup_steps: int = 50
    decay_fraction: float = 0.2  # wsd: share of steps spent decaying
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    optimizer: Literal["adamw", "adamw8bit", "muon"] = "adamw"
    muon_lr: float | None = None  # optimizer=muon: peak lr of the hidden matrices (None = train.lr)
    muon_ns_steps: int = 5  # optimizer=muon: Newton-Schulz iterations per step (Muon's and torch's 5)
    # optimizer=muon: the routed experts' matrices on Muon (True) or on AdamW (False; their iteration is most
    # of a MoE's Muon cost, though few tokens reach each expert per step)
    muon_experts: bool = True
    # autocast dtype; the weights and AdamW state stay fp32. auto = bf16 where the hardware multiplies bf16
    # natively (CUDA GPUs with bf16, CPUs with AVX-512 BF16 or AMX), else fp32 (train/trainer.py)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    compile: bool = False
    activation_checkpointing: bool = False
    eval_every: int = 100
    eval_batches: int = 20
    log_every: int = 10
    # routing alerts (train/alerts.py): an expert under alert_low_load x its fair share 1/E of tokens for
    # alert_window steps in a row (0.4 = the Optimal MoE seed's 5% at 8 experts), or a step's router z (the
    # unweighted z-loss, measured whatever model.z_loss_coef is) above alert_z_spike x its running mean; 0
    # turns either off
    alert_low_load: float = 0.4
    alert_window: int = 100
    alert_z_spike: float = 2.0
    save_every: int = 0  # 0 = at eval steps and at the end
    keep_last: int = 2
    early_stop_patience: int = 0  # evals without improvement; 0 = off
    seed: int = 1337
    device: str = "auto"
    threads: int = 0  # 0 = torch default
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "minimoe"
    sample_tokens: int = 200  # sample printed at the end
    sample_prompt: str = ""


@dataclass
class DistConfig:
    """How a `torchrun` launch splits the work; ignored in a single process. train.batch_size stays the
    global batch whatever the number of processes."""

    strategy: Literal["ddp", "fsdp"] = "ddp"  # how dense weights are replicated: DDP, or FSDP2 sharding
    expert_parallel: int = 1  # E: routed experts sharded over groups of E ranks (all-to-all dispatch)
    pipeline_parallel: int = 1  # P: transformer blocks split into P pipeline stages
    pp_schedule: Literal["1f1b", "gpipe"] = "1f1b"
    pp_microbatches: int = 0  # micro-batches per pipeline step; 0 = P (must divide the batch)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> RunConfig:
        self.model.validate()
        t = self.train
        for name in ("max_steps", "batch_size", "seq_len", "grad_accum", "eval_batches", "log_every"):
            if getattr(t, name) <= 0:
                raise ConfigError(f"train.{name} must be positive, got {getattr(t, name)}")
        for name in ("alert_low_load", "alert_window", "alert_z_spike"):
            if getattr(t, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(t, name)}")
        if t.lr <= 0:
            raise ConfigError(f"train.lr must be positive, got {t.lr}")
        _check_train_ranges(t)
        if t.muon_lr is not None and t.muon_lr <= 0:
            raise ConfigError(f"train.muon_lr must be positive, got {t.muon_lr}")
        if t.muon_ns_steps < 1:
            raise ConfigError(f"train.muon_ns_steps must be at least 1, got {t.muon_ns_steps}")
        if t.seq_len > self.model.max_position_embeddings:
            raise ConfigError(
                f"train.seq_len ({t.seq_len}) exceeds model.max_position_embeddings ({self.model.max_position_embeddings})"
            )
        if not 0 <= self.data.val_fraction < 1:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {self.data.val_fraction}")
        if self.data.workers < 0:
            raise ConfigError(f"data.workers must be >= 0, got {self.data.workers}")
        d = self.dist
        for name in ("expert_parallel", "pipeline_parallel"):
            if getattr(d, name) < 1:
                raise ConfigError(f"dist.{name} must be at least 1, got {getattr(d, name)}")
        if d.pp_microbatches < 0:
            raise ConfigError(f"dist.pp_microbatches must be >= 0, got {d.pp_microbatches}")
        if d.expert_parallel > 1 and self.model.n_routed_experts % d.expert_parallel:
            raise ConfigError(
                f"dist.expert_parallel ({d.expert_parallel}) does not divide "
                f"model.n_routed_experts ({self.model.n_routed_experts})"
            )
        return self


def _check_train_ranges(t: TrainConfig) -> None:
    """Ranges of the TrainConfig numbers (finiteness and 64-bit size are checked when they are read)."""
    ranges = {
        "max_minutes": (0.0, None, False), "min_lr_ratio": (0.0, 1.0, True), "warmup_steps": (0, None, True),
        "decay_fraction": (0.0, 1.0, True), "weight_decay": (0.0, None, True), "beta1": (0.0, 1.0, "lo"),
        "beta2": (0.0, 1.0, "lo"), "grad_clip": (0.0, None, True), "eval_every": (0, None, False),
        "save_every": (0, None, True), "keep_last": (1, None, True), "early_stop_patience": (0, None, True),
        "seed": (0, 2**63 - 1, True), "threads": (0, None, True), "sample_tokens": (0, None, True),
    }  # fmt: skip
    for name, (lo, hi, closed) in ranges.items():
        v = getattr(t, name)
        if v is None:
            continue
        low_ok = v >= lo if closed else v > lo
        high_ok = hi is None or (v <= hi if closed is True else v < hi)
        if not (low_ok and high_ok):
            if hi is None:
                need = f"at least {lo}" if closed else f"above {lo}"
            else:
                need = f"between {lo} and {hi}" + (" (exclusive of the upper end)" if closed == "lo" else "")
            raise ConfigError(f"train.{name} must be {need}, got {v}")
