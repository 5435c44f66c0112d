"""A training run's state on disk and in the process: RNG streams, the checkpoint a run resumes from
and the checkpoint it writes (weights, optimizer, scaler, data position, RNG streams, counters).

`resume` and `save` take the `Trainer` (its model, optimizer, windows and counters); every rank calls
them, rank 0 alone reads and writes files, and the state reaches the other ranks through the process
group.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import time
from pathlib import Path

import numpy as np
import torch

from minimoe.dist.init import all_gather_object, broadcast_object
from minimoe.errors import MinimoeError
from minimoe.model.transformer import Transformer
from minimoe.provenance import continue_history
from minimoe.train import checkpoint as ckpt_lib

log = logging.getLogger("minimoe.train")


def rng_state(device: torch.device | None = None) -> dict:
    """RNG states as tensors and plain Python values, so they load with torch.load(weights_only=True):
    the CPU's, NumPy's, Python's and, training on a GPU, that GPU's (only the one this process trains
    on, so that a run resumes on a machine with fewer GPUs, or on another one of them)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    np_state = [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]
    state = {"torch": torch.get_rng_state(), "numpy": np_state, "python": random.getstate()}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device | None = None) -> None:
    """Restore `rng_state`'s streams; the GPU's into `device` when this process trains on one. Older
    checkpoints hold a list, one state per GPU that was visible: the entry of `device`'s index, where
    the list has one."""
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    cuda = state.get("cuda")
    if cuda is None or device is None or device.type != "cuda":
        return
    if isinstance(cuda, list):
        index = torch.cuda.current_device() if device.index is None else device.index
        if index >= len(cuda):
            return  # saved where this GPU was not visible: its stream starts afresh
        cuda = cuda[index]
    torch.cuda.set_rng_state(cuda, device)


def check_run_dir_writable(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise MinimoeError(f"cannot write to output directory {run_dir} ({e.strerror})") from None


# model settings a resume may change: those that only shape training (noise, balancing, losses, kernels),
# and the context (its length and YaRN scaling, to extend it); any other changes what the weights compute
TRAINING_ONLY = frozenset({
    "router_jitter", "bias_update_speed", "aux_loss_alpha", "seq_aux_loss_alpha", "z_loss_coef",
    "capacity_factor", "moe_impl", "mtp_loss_weight", "dropout", "attn_dropout", "initializer_range",
    "max_position_embeddings", "rope_scaling",
})  # fmt: skip


def check_same_model(cfg, saved_cfg, ckpt: Path) -> None:
    """MinimoeError naming the first model setting of `cfg` (a RunConfig) that differs from the one
    checkpoint `ckpt` was trained with (`saved_cfg`, its RunConfig), outside TRAINING_ONLY."""
    saved = saved_cfg.model
    for f in dataclasses.fields(saved):
        old, new = getattr(saved, f.name), getattr(cfg.model, f.name)
        if f.name not in TRAINING_ONLY and old != new:
            raise MinimoeError(
                f"checkpoint {ckpt} was trained with model.{f.name}={old}, not {new}; a resume continues "
                "the same model (start a new run for another one)"
            )


def read_checkpoint(tr) -> tuple[Path, object, dict, dict]:
    """Rank 0: the latest checkpoint, the RunConfig it was trained with, its weights (checked against the
    full model) and state."""
    ckpt = ckpt_lib.find_checkpoint(tr.run_dir, "latest")
    saved_cfg = ckpt_lib.read_config(ckpt)
    check_same_model(tr.cfg, saved_cfg, ckpt)
    weights = ckpt_lib.read_weights(ckpt)
    with torch.device("meta"):
        reference = Transformer(tr.cfg.model)
    ckpt_lib.check_weights(weights, reference, ckpt)
    if tr.cfg.model.tie_word_embeddings:  # stored once, as save_model does
        weights.setdefault("lm_head.weight", weights["embed_tokens.weight"])
    return ckpt, saved_cfg, weights, ckpt_lib.load_state(ckpt)


def check_resumable(ckpt: Path, meta: dict, state: dict) -> None:
    """One sentence when `minimoe train --resume` cannot continue this checkpoint, saying what can."""
    if meta.get("sft") is not None:  # fine-tuning state has no pre-training data position
        how = "minimoe lora" if meta["sft"].get("lora") else "minimoe sft"
        raise MinimoeError(
            f"checkpoint {ckpt} was written by `{how}`, which `minimoe train --resume` cannot continue: "
            f"fine-tune it further with `minimoe sft {ckpt.parent.parent} --data CHAT.jsonl --out NEW_RUN` "
            "(or `minimoe lora`)"
        )
    if "optimizer" not in state:
        origin = next(
            (cmd for key, cmd in (("upcycled", "minimoe upcycle"), ("format", "minimoe import"),
                                  ("adapter", "minimoe lora --merge")) if key in meta),
            None,
        )  # fmt: skip
        by = f"was written by `{origin}` and " if origin else ""
        raise MinimoeError(
            f"checkpoint {ckpt} cannot be resumed: it {by}holds weights without training state; train a new "
            f"run from them with `minimoe train --init {ckpt.parent.parent} --out NEW_RUN`, or fine-tune them "
            f"with `minimoe sft {ckpt.parent.parent} --data CHAT.jsonl --out NEW_RUN`"
        )


def check_same_optimizer(ckpt: Path, optim: dict, optimizer: str, saved_name: str | None = None) -> None:
    """One sentence when the checkpoint's optimizer state is not the run's optimizer's: one optimizer's
    moments cannot continue as another's. Every group of MuonAdamW's carries `use_muon` (True or False),
    so a Muon state is told apart even where its Muon group was empty; `saved_name` (the checkpoint's
    train.optimizer, where its config names one) tells torch's AdamW from bitsandbytes' 8-bit one, whose
    states differ (`exp_avg` against quantized `state1`) though either would load the other's."""
    saved_muon = any("use_muon" in g for g in optim.get("param_groups", []))
    adamws = ("adamw", "adamw8bit")
    other_adamw = not saved_muon and saved_name in adamws and optimizer in adamws and saved_name != optimizer
    if saved_muon != (optimizer == "muon") or other_adamw:
        saved = "muon" if saved_muon else saved_name if saved_name in adamws else "adamw"
        raise MinimoeError(
            f"checkpoint {ckpt} was trained with train.optimizer={saved}, and this run's config says "
            f"train.optimizer={optimizer}: resume with train.optimizer={saved}, or start a new run from its "
            f"weights with `minimoe train --init {ckpt.parent.parent} --out NEW_RUN train.optimizer={optimizer}`"
        )


def resume(tr) -> None:
    """Load the latest checkpoint of tr.run_dir into the trainer `tr` (every rank must call it):
    weights, optimizer, scaler, data position, RNG streams and counters."""
    # Rank 0 reads the checkpoint; the state reaches the other ranks through the process group.
    ckpt = weights = state = optim = error = None
    legacy = False
    if tr.ctx.is_main:
        try:
            ckpt, saved_cfg, weights, state = read_checkpoint(tr)
            meta = ckpt_lib.read_meta(ckpt)
            check_resumable(ckpt, meta, state)
            optim = state.pop("optimizer")
            check_same_optimizer(ckpt, optim, tr.cfg.train.optimizer, saved_cfg.train.optimizer)
            # written before checkpoints keyed the optimizer state by parameter name
            legacy = any(isinstance(k, int) for k in optim["state"])
            ckpt_lib.warn_if_old_mtp(tr.cfg.model, meta, ckpt)
            # the budget a stop on the clock ran out of (the trainer stops a little before it: the next
            # step and the final evaluation would not have fitted); older checkpoints name none
            state["stopped_at_minutes"] = meta.get("max_minutes") if meta.get("out_of_time") else None
            state["code_history"] = continue_history(meta, state["step"])  # this code from here on
        except MinimoeError as e:
            error = str(e)
    error = broadcast_object(error, tr.ctx)
    if error is not None:
        raise MinimoeError(error)
    ckpt, state, legacy = broadcast_object((ckpt, state, legacy), tr.ctx)
    if legacy and tr.ctx.distributed:
        raise MinimoeError(f"checkpoint {ckpt} predates distributed resume; resume it in one process first")
    # loading the optimizer's state also restores the settings it was saved with; the ones of this run's
    # config (overrides given with --resume: train.lr, muon_lr, weight_decay, betas) are put back after
    settings = [{k: v for k, v in g.items() if k != "params"} for g in tr.optimizer.param_groups]
    try:
        if legacy:
            tr.par.load_state(None, weights, None)
            tr.optimizer.load_state_dict(optim)
        else:
            tr.par.load_state(tr.optimizer, weights, optim)
        for group, own in zip(tr.optimizer.param_groups, settings):
            group.update(own)
        tr.scaler.load_state_dict(state["scaler"])
        tr.train_windows.load_state_dict(state["loader"])
        ranks = state.get("rng_ranks")
        if ranks is not None and len(ranks) == tr.ctx.world_size:
            set_rng_state(ranks[tr.ctx.rank], tr.device)
        else:
            set_rng_state(state["rng"], tr.device)
            if tr.ctx.rank > 0:  # saved by another number of ranks: a fresh stream per rank
                torch.manual_seed(tr.cfg.train.seed + 1_000_003 * tr.ctx.rank + state["step"])
        tr.step, tr.tokens, tr.elapsed = state["step"], state["tokens"], state["elapsed"]
        tr.code_history = state["code_history"]
        tr.best_val, tr.evals_since_best = state["best_val"], state["evals_since_best"]
        # a checkpoint written before the window was kept: the first row after the resume averages fewer steps
        if "log_window" in state:
            tr.window.load_state_dict(state["log_window"])
        if "routing_window" in state:
            tr.monitor.load_state_dict(state["routing_window"], tr.device, holds_dropped=tr.ctx.rank == 0)
    except (KeyError, ValueError, RuntimeError) as e:
        raise MinimoeError(f"checkpoint {ckpt} cannot be resumed with this config ({e})") from None
    tc = tr.cfg.train
    if tr.step >= tc.max_steps:
        raise MinimoeError(
            f"the run in {tr.run_dir} is already at step {tr.step} and train.max_steps is "
            f"{tc.max_steps}; resume with train.max_steps={tr.step + tc.max_steps} (or any value "
            f"above {tr.step}) to train further"
        )
    if tc.early_stop_patience and tr.evals_since_best >= tc.early_stop_patience:
        raise MinimoeError(
            f"the run in {tr.run_dir} stopped early at step {tr.step}: {tr.evals_since_best} evaluations "
            f"without improvement reached train.early_stop_patience={tc.early_stop_patience}; resume with a "
            "larger train.early_stop_patience (or 0) to train further"
        )
    stopped_at = state.get("stopped_at_minutes")
    if tc.max_minutes is not None and (
        tr.elapsed >= tc.max_minutes * 60 or (stopped_at is not None and tc.max_minutes <= stopped_at)
    ):
        raise MinimoeError(
            f"the run in {tr.run_dir} has already used {tr.elapsed / 60:.1f} of its "
            f"train.max_minutes={tc.max_minutes:g}; resume with a larger train.max_minutes to train further"
        )
    if tr.ctx.is_main:
        log.info("resumed from %s at step %d", ckpt, tr.step)


def save(tr, val_loss: float | None = None, is_best: bool = False) -> Path:
    """Write the trainer `tr`'s checkpoint in the one-process format (every rank must call it; rank 0
    writes)."""
    weights, optim = tr.par.gather_state(tr.optimizer)
    rngs = all_gather_object(rng_state(tr.device), tr.ctx)
    routing = tr.monitor.state_dict(tr.par.reduce_sum)  # sums over ranks: before the other ranks return
    if not tr.ctx.is_main:
        return tr.run_dir / ckpt_lib.CKPT / ckpt_lib.step_dir_name(tr.step)
    metadata = None
    if tr.cfg.model.tie_word_embeddings:  # one tensor in the file, as safetensors' save_model does
        weights.pop("lm_head.weight", None)
        metadata = {"lm_head.weight": "embed_tokens.weight"}
    state = {
        "step": tr.step,
        "tokens": tr.tokens,
        "elapsed": tr.elapsed,
        "optimizer": optim,
        "scaler": tr.scaler.state_dict(),
        "loader": tr.train_windows.state_dict(),
        "rng": rngs[0],
        "best_val": tr.best_val,
        "evals_since_best": tr.evals_since_best,
        "log_window": tr.window.state_dict(),
        "routing_window": routing,
    }
    if tr.ctx.distributed:
        state["rng_ranks"] = rngs
    meta = {
        "step": tr.step, "tokens": tr.tokens, "val_loss": val_loss, "time": time.time(),
        "elapsed_s": tr.elapsed, "clock": tr.cfg.train.clock, "out_of_time": getattr(tr, "_out_of_time", False),
        "max_minutes": tr.cfg.train.max_minutes, "code_history": tr.code_history, **tr.run_info,
    }  # fmt: skip
    return ckpt_lib.save_checkpoint(
        tr.run_dir, tr.step, weights, state, meta, tr.config_text, tr.tokenizer,
        keep_last=tr.cfg.train.keep_last, is_best=is_best, weights_metadata=metadata,
    )  # fmt: skip
