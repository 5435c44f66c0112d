"""The training loop: data -> model -> AdamW with a schedule, aux-free bias updates after each optimizer
step, periodic evaluation, expert-health logging and atomic, exactly resumable checkpoints.

Under torchrun the same loop runs on every rank: `minimoe.dist.parallelize` decides what each rank holds
(DDP, FSDP2, expert or pipeline parallelism) and the loop only calls its methods. train.batch_size is
the global batch; losses, eval sums and expert loads are summed across ranks, so every rank takes the
same decisions (bias updates, skipped steps, early stopping) and rank 0 alone writes files.

The loop is the only one: fine-tuning (minimoe.finetune.sft) hands it a built model, its own batch
source and validation batches. The run state (RNG streams, resume, checkpoints) lives in
train/state.py and the metric writers in train/metrics.py.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from minimoe.config import RunConfig
from minimoe.dist.init import DistContext, on_main, resolve_device
from minimoe.dist.parallel import LOGGED, build_model, parallelize
from minimoe.errors import MinimoeError
from minimoe.model.moe import max_vio
from minimoe.model.transformer import Transformer
from minimoe.provenance import code_version
from minimoe.train import alerts
from minimoe.train import checkpoint as ckpt_lib
from minimoe.train import state as run_state
from minimoe.train.balance import add_loads, balance_step, bias_ranges
from minimoe.train.health import expert_health
from minimoe.train.interrupt import Interrupt
from minimoe.train.metrics import LogWindow, MetricWriters, check_loggers, peak_mem_mb
from minimoe.train.optim import build_optimizer
from minimoe.train.precision import autocast_context, resolve_precision
from minimoe.train.progress import TrainProgress, run_summary, start_logs
from minimoe.train.schedule import lr_multiplier, schedule_step, warmup_overrun
from minimoe.train.state import check_run_dir_writable

log = logging.getLogger("minimoe.train")

MAX_BAD_STEPS = 5  # consecutive skipped steps (non-finite loss or gradient) before a run stops


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    tokens: int
    val_loss: float | None
    val_bpb: float | None
    best_val_loss: float | None
    tokens_per_s: float  # over the whole run clock: data preparation, evaluations, saves (rows: steps only)
    elapsed_s: float
    stopped: str  # "max_steps" | "max_minutes" | "early_stop" | "interrupted" | "paused"
    checkpoint: Path | None
    sample: str | None = None
    is_main: bool = True  # False on ranks > 0 of a distributed run (they print and write nothing)
    train_loss: float | None = None  # the last metrics row's training loss


class Trainer:
    """Owns model, optimizer, data and run directory for one training run.

    Args:
        cfg: the validated RunConfig (saved to RUN_DIR/config.yaml).
        run_dir: output directory; with resume=True, the run to continue from its latest checkpoint.
        data: a `minimoe.data.PreparedData` with train and val splits.
        tokenizer: the tokenizer that made `data` (saved in every checkpoint).
        ctx: the process group context from `minimoe.dist.init_distributed`; None = one process.

    Fine-tuning uses the same loop with its own pieces (data may then be None):
        model: a built model (e.g. loaded from a run, possibly LoRA-wrapped) instead of a fresh
            `Transformer(cfg.model)`; its memory is the caller's business.
        train_batches: the batch source: `next()` gives (x, y) int64 tensors (targets -100 where no
            loss is taken), `state_dict()` / `load_state_dict()` its position. Default: `TokenWindows`.
        val_batches: an iterable of (x, y) validation batches, re-iterated at every evaluation.
            Default: `EvalWindows` of data; None with data None: no evaluation (the latest checkpoint
            counts as the best).
        balance: run the aux-free bias step (False leaves the biases as they are: LoRA).
        checkpoints: write checkpoints (False: the caller saves the result itself).
        run_info: extra entries for every checkpoint's meta.json.
    """

    def __init__(
        self,
        cfg: RunConfig,
        run_dir: Path,
        data,
        tokenizer,
        resume: bool = False,
        progress: bool = True,
        ctx: DistContext | None = None,
        clock_start: float | None = None,
        reserve_s: float = 0.0,
        memory_check: bool = True,
        *,
        model: torch.nn.Module | None = None,
        train_batches=None,
        val_batches=None,
        balance: bool = True,
        checkpoints: bool = True,
        run_info: dict | None = None,
    ):
        from minimoe.data import EvalWindows, TokenWindows

        self.cfg, self.run_dir, self.data, self.tokenizer = cfg, Path(run_dir), data, tokenizer
        self.progress = progress
        # train.max_minutes counts from `clock_start` (a time.perf_counter() value: the command's start,
        # so data preparation and model building count too) and keeps `reserve_s` for what the caller
        # does after fit() (the sample)
        self.clock_start = time.perf_counter() if clock_start is None else clock_start
        self.deadline: float | None = None  # perf_counter() at which train.max_minutes ends (set by fit)
        self.reserve_s = reserve_s
        tc, mc = cfg.train, cfg.model
        if tokenizer.vocab_size > mc.vocab_size:
            raise MinimoeError(
                f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is {mc.vocab_size}; "
                f"set model.vocab_size={tokenizer.vocab_size} or larger"
            )
        check_loggers(tc)  # before a resume writes config.yaml
        self.ctx = ctx if ctx is not None else DistContext(device=resolve_device(tc.device))
        self.device = self.ctx.device
        if tc.threads:
            torch.set_num_threads(tc.threads)
        # config.yaml records what ran; auto's choice on a CPU is timed at the run's threads
        tc.precision = resolve_precision(tc.precision, self.device)
        if tc.precision == "fp16" and self.device.type != "cuda":
            raise MinimoeError("train.precision=fp16 needs a CUDA GPU; use bf16 or fp32 on the CPU")
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        on_main(lambda: check_run_dir_writable(self.run_dir), self.ctx)
        torch.manual_seed(tc.seed)
        np.random.seed(tc.seed % 2**32)
        random.seed(tc.seed)

        if (
            memory_check and model is None and not self.ctx.distributed
        ):  # one process holds it all; ranks hold shares
            from minimoe.memory import check_fits
            from minimoe.params import memory_estimate

            # fp32 weights under bf16 autocast too: the fp32 row is the one that applies
            need = memory_estimate(mc, None, None, tc.optimizer, tc.muon_experts)["by_dtype"]["fp32"]
            check_fits(need["training_total"], self.device, "training this model (fp32 weights, gradients and "
                       f"{tc.optimizer} state)", "pass --skip-memory-check")  # fmt: skip
        if model is None:  # the same model from the same seed on every rank; each keeps its part
            model = build_model(lambda: Transformer(mc), cfg, self.ctx)
            model.gradient_checkpointing = tc.activation_checkpointing
        self.par = parallelize(model, cfg, self.ctx)
        self.model = self.par.model
        if self.ctx.distributed:  # dropout and router jitter: a different stream per rank
            torch.manual_seed(tc.seed + 1_000_003 * self.ctx.rank)
        if tc.compile and self.par.forward is not None:
            self.par.step_forward = torch.compile(self.par.forward)
        self.optimizer = build_optimizer(self.model, tc, self.device)
        # which code this run is, read before the clock starts (checkpoints record it; a resume extends it)
        self.code_history = [{"from_step": 0, "code": code_version()}]
        self.scaler = torch.amp.GradScaler("cuda", enabled=tc.precision == "fp16")
        B, rank, world = tc.batch_size // self.par.dp_size, self.par.dp_rank, self.par.dp_size
        if train_batches is None:
            train_batches = TokenWindows(
                data, "train", tc.seq_len, B, seed=tc.seed, rank=rank, world_size=world
            )
        held_out = data is not None and data.meta.get("split_mode") != "none"  # none: val_fraction=0
        if val_batches is None and held_out:
            val_batches = EvalWindows(
                data, "val", tc.seq_len, B, max_batches=tc.eval_batches, rank=rank, world_size=world
            )
        self.train_windows, self.val_windows = train_batches, val_batches
        self.balance, self.checkpoints, self.run_info = balance, checkpoints, dict(run_info or {})
        self.step, self.tokens, self.elapsed = 0, 0, 0.0
        self.train_loss: float | None = None
        self.best_val: float | None = None
        self.evals_since_best = 0
        self.window = LogWindow(self.device, LOGGED)  # the steps since the last logged row
        self.monitor = alerts.RoutingMonitor.from_config(cfg)  # starved experts, z-loss spikes, dropped pairs
        self.config_text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
        if resume:
            self._resume()
            if self.ctx.is_main:  # overrides given with --resume hold for the next resume too
                ckpt_lib.atomic_write_text(self.run_dir / "config.yaml", self.config_text)
        elif self.ctx.is_main:
            (self.run_dir / "config.yaml").write_text(self.config_text, encoding="utf-8")
            tokenizer.save(self.run_dir / "tokenizer")
        self.metrics_path = self.run_dir / "metrics.jsonl"
        if self.ctx.is_main:
            start_logs(self.run_dir, self.step if resume else None)
        self.metrics = MetricWriters(self.metrics_path, enabled=self.ctx.is_main)
        self._eval_s: float | None = None  # the last evaluation's and checkpoint's wall time
        self._save_s: float | None = None

    # ------------------------------------------------------------------ state
    def _resume(self) -> None:
        run_state.resume(self)

    def save(self, val_loss: float | None = None, is_best: bool = False) -> Path | None:
        """Write a checkpoint in the one-process format (every rank must call it; rank 0 writes).
        None when this trainer writes no checkpoints."""
        return run_state.save(self, val_loss, is_best) if self.checkpoints else None

    # ------------------------------------------------------------------ eval
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean validation cross-entropy over the validation batches' target tokens, perplexity, bits per
        byte, global MaxVio; {} without validation batches. Computed in fp32 whatever train.precision
        says, so runs in different precisions are scored alike (and as `minimoe eval` scores them)."""
        if self.val_windows is None:
            return {}
        self.model.eval()
        total, count = 0.0, 0
        loads: dict[int, torch.Tensor] = {}
        for x, y in self.val_windows:
            x, y = x.to(self.device), y.to(self.device)
            ce, batch_loads = self.par.eval_batch(x, y)
            n = int((y != -100).sum())  # ce is the mean over the targets that carry a loss
            total += ce.item() * n
            count += n
            add_loads(loads, batch_loads)
        self.model.train()
        total, count, loads = self.par.reduce_eval(total, count, loads)
        loss = total / max(count, 1)
        tpb = self.data.tokens_per_byte("val") if self.data is not None else None
        res = {
            "val_loss": loss,
            "val_ppl": math.exp(min(loss, 50)),
            "val_bpb": loss / math.log(2) * tpb if tpb else None,
        }
        if loads:
            vios = [max_vio(v).item() for v in loads.values()]
            res["val_max_vio_global"] = sum(vios) / len(vios)
        return res

    # ------------------------------------------------------------------ loop
    def fit(self, stop_after: int | None = None) -> TrainResult:
        """Train until max_steps (or a time limit, early stop, Ctrl-C). `stop_after` ends this session
        after that many steps with a checkpoint, as an interruption would (resume continues exactly)."""
        try:
            return self._fit(stop_after)
        finally:  # a failed run too: wandb.init in this process would return its open W&B run
            self.metrics.close()

    def _fit(self, stop_after: int | None) -> TrainResult:
        tc = self.cfg.train
        session_end = self.step + stop_after if stop_after is not None else None
        self.model.train()
        self.metrics.open(self.cfg, self.run_dir, self.step)
        # token positions in one optimizer step (all ranks); _train_step counts the real batches, which
        # fine-tuning's padded batches can make shorter
        self._step_tokens = tc.batch_size * tc.seq_len * tc.grad_accum
        window = self.window  # restored by a resume when the checkpoint fell between two logged rows
        if not window.steps:
            window.start = time.perf_counter()
        # train.max_minutes (and the schedule of a time-limited run) read train.clock: wall time from the
        # command's start, or the CPU time of this process from here on, which other jobs on a shared
        # machine do not inflate (steps, evaluations and saves are timed on the same clock)
        if tc.clock == "cpu":
            clock = time.process_time
            t0 = clock() - self.elapsed
            self.deadline = None  # no wall-clock end: the caller's sample is not squeezed into one
        else:
            clock = time.perf_counter
            t0 = self.clock_start - self.elapsed
            self.deadline = t0 + tc.max_minutes * 60 if tc.max_minutes is not None else None
        stopped, last_ckpt, val, bad_steps = "max_steps", None, {}, 0
        step_s: float | None = None  # a moving average of one optimizer step's wall time
        session_steps = 0
        if self.ctx.is_main:
            log.info("%s", run_summary(self.cfg, self.data, self.device, self.ctx.world_size))
        bar = TrainProgress(self.progress and self.ctx.is_main, tc.max_steps, tc.max_minutes, self.step)
        with Interrupt() as interrupt:
            while self.step < tc.max_steps:
                step_start = clock()
                # distributed: the clock all ranks agreed on at the end of the last step, so they share the LR
                now = self.elapsed if self.ctx.distributed else step_start - t0
                mult = lr_multiplier(
                    schedule_step(self.step, now, tc), tc.max_steps, tc.schedule, tc.warmup_steps,
                    tc.min_lr_ratio, tc.decay_fraction,
                )  # fmt: skip
                lr = tc.lr * mult
                for g in self.optimizer.param_groups:  # Muon's groups carry their own peak lr
                    g["lr"] = g.get("base_lr", tc.lr) * mult
                step_vals, step_loads = self._train_step()  # [loss, *LOGGED], over ranks
                step_loss = step_vals[0]
                self.par.finish_grads()
                self.scaler.unscale_(self.optimizer)
                grad_norm = self.par.clip_grad_norm(tc.grad_clip or float("inf"))
                # One host sync per step: a non-finite loss, or a finite loss with a non-finite gradient
                # (clipping would spread it to every weight), must not reach the weights. Every rank
                # sees the same reduced loss and global norm, so all skip together. Under fp16 the
                # GradScaler itself skips steps whose scaled gradients overflow.
                finite = torch.isfinite(step_loss)
                if not self.scaler.is_enabled():
                    finite = finite & torch.isfinite(grad_norm)
                if not finite.item():
                    bad_steps += 1
                    self.optimizer.zero_grad(set_to_none=True)
                    self.scaler.update()  # ends the iteration unscale_ began (a no-op without fp16)
                    log.warning("step %d: non-finite loss or gradient, step skipped (%d in a row)",
                                self.step + 1, bad_steps)  # fmt: skip
                    if bad_steps >= MAX_BAD_STEPS:
                        raise MinimoeError(self._diverged(bad_steps))
                    continue
                bad_steps = 0
                for k, v in zip(LOGGED, step_vals[1:]):
                    window.parts[k] += v
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                if self.balance:
                    balance_step(self.model, step_loads)  # once per optimizer step
                self.step += 1
                self.tokens += self._step_tokens
                window.tokens += self._step_tokens
                self.monitor.observe(step_loads, step_vals[-1])  # router_z: device tensors only, no sync
                window.loss += step_loss
                window.steps += 1
                window.add_loads(step_loads)
                took = clock() - step_start
                if session_steps > 0:  # the first step of a session warms up (allocations): not typical
                    step_s = took if step_s is None else 0.8 * step_s + 0.2 * took
                session_steps += 1
                bar.advance(self.step, clock() - t0)

                if self.step % tc.log_every == 0 or self.step == tc.max_steps:
                    now = time.perf_counter()
                    row = {
                        "step": self.step,
                        "tokens": self.tokens,
                        "loss": window.loss.item() / window.steps,
                        **{k: v.item() / window.steps for k, v in window.parts.items()},
                        "lr": lr,
                        "grad_norm": float(grad_norm),
                        "tokens_per_s": window.tokens / max(now - window.start, 1e-9),
                        "elapsed_s": clock() - t0,
                        "peak_mem_mb": peak_mem_mb(self.device),
                    }
                    health = expert_health(window.loads, step_vio=window.max_vio())
                    fields, warnings = self.monitor.report(self.par.reduce_sum)
                    if session_steps <= tc.log_every + 1:  # the session's first row with a step speed
                        warnings += warmup_overrun(self.step, row["elapsed_s"], step_s, tc)
                    row.update(fields)  # alerts, dropped pairs
                    for w in warnings if self.ctx.is_main else []:
                        log.warning("step %d: %s", self.step, w)
                    if health:
                        row.update(health)
                        row["bias_range"] = self.par.merge_layers(bias_ranges(self.model))
                        for li, e in health["dead_experts"][:3] if self.ctx.is_main else []:
                            log.warning("layer %s expert %s received no tokens in the last %d step%s",
                                        li, e, window.steps, "" if window.steps == 1 else "s")  # fmt: skip
                    self.metrics.log(row)
                    self.train_loss = row["loss"]
                    bar.note(
                        f"loss {row['loss']:.3f}, {row['tokens_per_s']:,.0f} tok/s, "
                        f"maxvio {health.get('max_vio_mean', 0):.2f}"
                    )
                    window.reset(now)

                self.elapsed = clock() - t0
                at_eval = self.step % tc.eval_every == 0 or self.step == tc.max_steps
                out_of_time = tc.max_minutes is not None and not self._time_for_another_step(
                    tc.max_minutes * 60 - self.elapsed, step_s, at_eval
                )
                if self.ctx.distributed:
                    # clocks, timings and Ctrl-C differ per rank: every rank takes the slowest clock (the
                    # LR schedule of a time-limited run reads it) and stops together or not at all
                    self.elapsed, interrupt.requested, out_of_time = self._agree(
                        self.elapsed, interrupt.requested, out_of_time
                    )
                paused = session_end is not None and self.step >= session_end
                # the run's own evaluations (the schedule's, and the last one when the clock ends it) count
                # for early stopping and the best checkpoint; one at a pause or Ctrl-C is logged and saved
                # only, so that the resumed run decides what an uninterrupted one would
                counts = at_eval or out_of_time
                at_eval = counts or interrupt.requested or paused
                self._out_of_time = out_of_time  # the checkpoint below records a stop on the clock
                # evaluating and saving is no training: the logging window's tokens/s leaves it out
                with window.paused():
                    if at_eval:
                        # a stop asked for saves before its evaluation (logged only): a scheduler kills a
                        # process some seconds after its SIGTERM (torchrun and Slurm: 30)
                        urgent = interrupt.requested and not counts
                        if urgent:
                            last_ckpt = self.save(is_best=self.val_windows is None)
                        eval_start = clock()
                        val = self.evaluate()
                        loss = val.get("val_loss")  # None without validation: the latest counts as the best
                        improved = loss is None or (
                            counts and (self.best_val is None or loss < self.best_val)
                        )
                        if loss is None or not counts:
                            pass
                        elif improved:
                            self.best_val, self.evals_since_best = loss, 0
                        else:
                            self.evals_since_best += 1
                        if val:
                            self.metrics.log({"step": self.step, "tokens": self.tokens, **val})
                            bpb = f", val_bpb {val['val_bpb']:.3f}" if val["val_bpb"] is not None else ""
                            bar.note(f"val_loss {loss:.3f}{bpb}")
                        save_start = clock()
                        self._eval_s = save_start - eval_start
                        if not urgent:
                            last_ckpt = self.save(loss, is_best=improved)
                        elif loss is not None and last_ckpt is not None and self.ctx.is_main:
                            ckpt_lib.record_val_loss(last_ckpt, loss)  # evaluated after its save
                        self._save_s = clock() - save_start
                    elif tc.save_every and self.step % tc.save_every == 0:
                        save_start = clock()
                        last_ckpt = self.save()
                        self._save_s = clock() - save_start
                if interrupt.requested or paused:
                    stopped = "interrupted" if interrupt.requested else "paused"
                    break
                if out_of_time:
                    stopped = "max_minutes"
                    break
                if tc.early_stop_patience and self.evals_since_best >= tc.early_stop_patience:
                    stopped = "early_stop"
                    break
        bar.close(self.step, clock() - t0, complete=stopped in ("max_steps", "max_minutes"))
        elapsed = clock() - t0
        return TrainResult(
            run_dir=self.run_dir, step=self.step, tokens=self.tokens,
            val_loss=val.get("val_loss"), val_bpb=val.get("val_bpb"), best_val_loss=self.best_val,
            tokens_per_s=self.tokens / max(elapsed, 1e-9), elapsed_s=elapsed, stopped=stopped,
            checkpoint=last_ckpt, is_main=self.ctx.is_main, train_loss=self.train_loss,
        )  # fmt: skip

    def _time_for_another_step(self, left_s: float, step_s: float | None, at_eval: bool) -> bool:
        """Whether one more step still lets the run end within train.max_minutes: the step itself, then
        the final evaluation and checkpoint (timed when they last ran, estimated before) and the caller's
        reserve. A periodic evaluation due now counts twice (now and at the end)."""
        if step_s is None:  # nothing measured yet
            return left_s > 0
        tc = self.cfg.train
        # before the first evaluation: a forward pass costs about a third of a training step
        eval_s = self._eval_s if self._eval_s is not None else step_s * tc.eval_batches / (3 * tc.grad_accum)
        if self._save_s is not None:
            save_s = self._save_s
        else:  # weights and two AdamW moments in fp32, written at a modest 100 MB/s
            save_s = 12 * sum(p.numel() for p in self.model.parameters()) / 100e6
        finish = eval_s + save_s + self.reserve_s
        return step_s + finish * (2 if at_eval else 1) <= left_s

    def _diverged(self, bad_steps: int) -> str:
        last = ckpt_lib.latest_checkpoint(self.run_dir)
        kept = f"the last good checkpoint {last} is intact" if last else "no checkpoint was written yet"
        return (
            f"training diverged: {bad_steps} consecutive batches gave a non-finite loss or gradient at "
            f"step {self.step + 1}; {kept} (lower train.lr?)"
        )

    def _train_step(self) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Forward and backward over grad_accum micro-batches. Each one's cross-entropy and MTP loss (means
        over its targets) weigh its share of the step's targets, so the gradient is that of one batch of
        them all (padded batches differ; full windows weigh 1 / grad_accum); aux and z weigh 1 / grad_accum.

        Returns:
            (6,) [loss, ce, aux, z, mtp, router_z] averaged over micro-batches (weighted as in the backward) and
            data-parallel ranks, and {layer: (E,) expert loads} summed over micro-batches and ranks.
        """
        tc = self.cfg.train
        vals = torch.zeros(1 + len(LOGGED), device=self.device)
        loads: dict[int, torch.Tensor] = {}
        self._step_tokens = 0
        batches = [next(self.train_windows) for _ in range(tc.grad_accum)]
        targets = [int((y != -100).sum()) for _, y in batches]  # the batch source's CPU tensors: no sync
        total = sum(targets)
        for micro, ((x, y), n) in enumerate(zip(batches, targets)):
            share = n / total if total else 1 / tc.grad_accum
            self._step_tokens += x.numel() * self.par.dp_size  # shapes only: no device sync
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            micro_vals, micro_loads, stats = self.par.micro_step(
                x, y, share, tc.grad_accum, micro == tc.grad_accum - 1, self._autocast, self.scaler
            )
            self.monitor.count_dropped(stats)
            vals += micro_vals
            add_loads(loads, micro_loads)
        return self.par.reduce_step(vals, loads)

    def _autocast(self):
        return autocast_context(self.cfg.train.precision, self.device)

    def _agree(self, elapsed: float, stop: bool, out_of_time: bool) -> tuple[float, bool, bool]:
        """The largest elapsed time of all ranks, whether any rank asked to stop, and whether any rank
        found no time for another step."""
        t = torch.tensor([elapsed, float(stop), float(out_of_time)], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return t[0].item(), bool(t[1].item() > 0), bool(t[2].item() > 0)
