"""Supervised fine-tuning on chat JSONL with loss on the assistant's tokens only, full or LoRA.

A client of the pretraining loop (`minimoe.train.trainer.Trainer`): this module builds the model (the
source run's, LoRA-wrapped or not), the batch source (right-padded batches whose targets are -100
outside assistant turns) and the validation batches, and the loop brings gradient accumulation,
non-finite-step skipping, the schedule, checkpoints, progress and metrics. The result is an ordinary
run directory that `minimoe generate`, `eval` and `export` read.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from minimoe.config_yaml import set_dotted
from minimoe.errors import ConfigError, MinimoeError
from minimoe.finetune.chat import (
    DEFAULT_CHAT_TEMPLATE,
    encode_conversation,
    inputs_and_targets,
    read_conversations,
)

log = logging.getLogger(__name__)


@dataclass
class SFTResult:
    out_dir: Path
    steps: int
    examples: int  # training sequences (packed windows with packing)
    dropped: int  # conversations with no trainable token left after truncation
    response_tokens: int  # trainable tokens seen
    final_loss: float
    val_loss: float | None
    checkpoint: Path | None  # None for an unmerged LoRA run (adapter only)
    adapter: Path | None = None
    stopped: str = "max_steps"  # the trainer's reason: "interrupted" after Ctrl-C or SIGTERM
    max_steps: int = 0  # the steps planned


def build_examples(
    tokenizer,
    conversations: list[list[dict]],
    template: str,
    seq_len: int,
    packing: bool = False,
    seed: int = 0,
) -> tuple[list[tuple[np.ndarray, np.ndarray]], int]:
    """Token (x, y) pairs for training; y is -100 outside assistant turns.

    Args:
        tokenizer: the model's Tokenizer.
        conversations: message lists from `read_conversations`.
        template: the chat template.
        seq_len: longest training sequence.
        packing: concatenate conversations (in a seeded random order) and cut windows of seq_len,
            instead of one truncated sequence per conversation. Windows may span two conversations
            (attention is not reset at the boundary; the loss mask still holds).
        seed: order of the packed stream.
    Returns:
        (list of (x, y) int64 arrays of equal length <= seq_len, conversations dropped for having
        no trainable token within seq_len).
    """
    encoded = [encode_conversation(tokenizer, m, template) for m in conversations]
    out: list[tuple[np.ndarray, np.ndarray]] = []
    dropped = 0
    if not packing:
        cut = 0
        for ids, mask in encoded:
            cut += len(ids) > seq_len + 1
            x, y = inputs_and_targets(ids[: seq_len + 1], mask[: seq_len + 1])
            if (y != -100).any():
                out.append((x, y))
            else:
                dropped += 1
        if cut:
            log.warning(
                "%d of %d conversations are longer than train.seq_len=%d tokens and were cut there (what "
                "follows does not train; %d kept no response token and were dropped); a longer "
                "train.seq_len, up to the model's context, keeps more",
                cut, len(encoded), seq_len, dropped,
            )  # fmt: skip
        return out, dropped
    order = np.random.default_rng(seed).permutation(len(encoded))
    ids = np.concatenate([encoded[i][0] for i in order])
    mask = np.concatenate([encoded[i][1] for i in order])
    for start in range(0, max(len(ids) - 1, 0), seq_len):
        x, y = inputs_and_targets(ids[start : start + seq_len + 1], mask[start : start + seq_len + 1])
        if (y != -100).any():
            out.append((x, y))
    return out, dropped


def batches(
    examples: list[tuple[np.ndarray, np.ndarray]], batch_size: int, pad_id: int, seed: int, epoch: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of (x, y) batches in a seeded order, right-padded (x with pad_id, y with -100):
    causal attention never lets a real token see the padding after it."""
    order = np.random.default_rng([seed, epoch]).permutation(len(examples))
    for s in range(0, len(order), batch_size):
        chunk = [examples[i] for i in order[s : s + batch_size]]
        T = max(len(x) for x, _ in chunk)
        X = np.full((len(chunk), T), pad_id, dtype=np.int64)
        Y = np.full((len(chunk), T), -100, dtype=np.int64)
        for r, (x, y) in enumerate(chunk):
            X[r, : len(x)], Y[r, : len(y)] = x, y
        yield torch.from_numpy(X), torch.from_numpy(Y)


class PaddedBatches:
    """The training loop's batch source for fine-tuning: `batches` epoch after epoch, without end.

    It counts the trainable (response) tokens it hands out, and its position (epoch, batch) is part
    of the training loop's checkpoints like the pretraining windows'.
    """

    def __init__(
        self, examples: list[tuple[np.ndarray, np.ndarray]], batch_size: int, pad_id: int, seed: int
    ):
        self.examples, self.batch_size, self.pad_id, self.seed = examples, batch_size, pad_id, seed
        self.epoch, self.pos, self.response_tokens = 0, 0, 0
        self._it: Iterator | None = None

    def __iter__(self) -> PaddedBatches:
        return self

    def _epoch_iter(self) -> Iterator:
        it = batches(self.examples, self.batch_size, self.pad_id, self.seed, self.epoch)
        return itertools.islice(it, self.pos, None)

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._it is None:
            self._it = self._epoch_iter()
        batch = next(self._it, None)
        if batch is None:  # the epoch is over: the next one, in a new order
            self.epoch, self.pos = self.epoch + 1, 0
            self._it = self._epoch_iter()
            batch = next(self._it)
        self.pos += 1
        self.response_tokens += int((batch[1] != -100).sum())
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "response_tokens": self.response_tokens}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos, self.response_tokens = state["epoch"], state["pos"], state["response_tokens"]
        self._it = None


class ValBatches:
    """Fixed validation batches (one pass of `batches` in a fixed order), re-read at every evaluation."""

    def __init__(self, examples: list[tuple[np.ndarray, np.ndarray]], batch_size: int, pad_id: int):
        self.examples, self.batch_size, self.pad_id = examples, batch_size, pad_id

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return batches(self.examples, self.batch_size, self.pad_id, seed=0, epoch=0)


def _apply_overrides(cfg, overrides: list[str]) -> None:
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        if key.strip().startswith("model.") and key.strip() not in (
            "model.dropout",
            "model.attn_dropout",
            "model.router_jitter",
        ):
            raise ConfigError(
                f"{key.strip()} cannot change when fine-tuning (only dropout, attn_dropout, router_jitter)"
            )
        set_dotted(cfg, key.strip(), value)
    cfg.validate()


def finetune(
    run_dir: str | Path,
    data: str | Path,
    out_dir: str | Path,
    overrides: list[str] | None = None,
    *,
    val_data: str | Path | None = None,
    packing: bool = False,
    epochs: float = 1.0,
    which: str = "best",
    lora: dict | None = None,
    merge: bool = True,
    progress: bool = True,
) -> SFTResult:
    """Fine-tune the model of `run_dir` on chat JSONL and write a new run directory.

    Defaults: the source run's batch size and sequence length; a tenth of its peak lr for full
    fine-tuning (the full lr for LoRA); `epochs` passes over the data unless `train.max_steps` is
    given; warmup of 10% of the steps. Dotted `train.*` overrides win.

    Args:
        run_dir: source run (or checkpoint) directory.
        data: chat JSONL (`read_conversations`).
        out_dir: new run directory.
        overrides: `train.KEY=VALUE` (and model.dropout/attn_dropout/router_jitter).
        val_data: optional chat JSONL for a masked validation loss at the end.
        packing: pack conversations into full windows (see `build_examples`).
        epochs: passes over the data when train.max_steps is not given.
        which: "best" or "latest" checkpoint of the source.
        lora: None for full fine-tuning, else keyword arguments of `apply_lora` (r, alpha, targets, qlora).
        merge: with LoRA, also write the merged model as a checkpoint (else the adapter only).
        progress: show a progress bar.
    Returns:
        SFTResult.
    """
    from minimoe.dist.init import resolve_device
    from minimoe.train import checkpoint as ckpt_lib
    from minimoe.train.trainer import Trainer

    out = Path(out_dir)
    if (out / ckpt_lib.CKPT).exists() and any((out / ckpt_lib.CKPT).iterdir()):
        raise MinimoeError(f"{out} already holds a run; choose another --out")
    if (out / "adapter").exists():
        raise MinimoeError(f"{out} already holds an adapter; choose another --out")
    model, tok, cfg, meta = ckpt_lib.load_run(run_dir, which)
    ckpt_lib.check_not_quantized(model, meta)
    if not tok.chat_template:
        tok.chat_template = DEFAULT_CHAT_TEMPLATE  # stored with the new run's tokenizer
    tc = cfg.train
    tc.lr = tc.lr if lora else tc.lr * 0.1
    explicit = {o.split("=", 1)[0].strip() for o in overrides or []}
    # the source run's pretraining budget and plumbing do not carry over: one batch per step, a metrics
    # row per step, no time limit, no compilation, unless given here
    # LoRA's adapters train with AdamW (Muon orthogonalises whole hidden matrices; a full fine-tune keeps
    # the run's optimizer, as Moonlight fine-tunes a Muon-trained model with Muon)
    carried = [("grad_accum", 1), ("log_every", 1), ("max_minutes", None), ("compile", False)]
    for key, value in carried + ([("optimizer", "adamw")] if lora else []):
        if f"train.{key}" not in explicit:
            setattr(tc, key, value)
    _apply_overrides(cfg, list(overrides or []))
    train_ex, dropped = build_examples(
        tok, read_conversations(data), tok.chat_template, tc.seq_len, packing, tc.seed
    )
    if not train_ex:
        raise MinimoeError(f"no example in {data} has an assistant token within train.seq_len={tc.seq_len}")
    val_ex = (
        build_examples(tok, read_conversations(val_data), tok.chat_template, tc.seq_len)[0]
        if val_data
        else None
    )
    per_epoch = math.ceil(len(train_ex) / tc.batch_size)
    if "train.max_steps" not in explicit:
        tc.max_steps = max(1, math.ceil(per_epoch * epochs / tc.grad_accum))
    if "train.warmup_steps" not in explicit:
        tc.warmup_steps = tc.max_steps // 10
    cfg.validate()

    device = resolve_device(tc.device)
    torch.manual_seed(tc.seed)
    model = model.to(device).train()
    for m in model.modules():  # the loaded model was built with the source's dropout
        if isinstance(m, torch.nn.Dropout):
            m.p = cfg.model.dropout
    for blk in model.layers:
        blk.self_attn.attn_dropout = cfg.model.attn_dropout
    trained, fingerprint = model, None
    if lora:
        from minimoe.finetune.lora import apply_lora, base_fingerprint

        fingerprint = base_fingerprint(model)  # the weights as a merge loads them: QLoRA changes these
        trained = apply_lora(model, **lora)
    source = str(Path(meta["path"]).resolve())
    info = {"source": source, "sft": {"data": str(Path(data).resolve()), "packing": packing, "lora": lora}}
    train_batches = PaddedBatches(train_ex, tc.batch_size, tok.pad_id, tc.seed)
    trainer = Trainer(
        cfg, out, None, tok, progress=progress, model=trained, train_batches=train_batches,
        val_batches=ValBatches(val_ex, tc.batch_size, tok.pad_id) if val_ex else None,
        balance=not lora,  # LoRA leaves the base model (and its balancing bias) alone
        checkpoints=not lora,  # LoRA: the adapter, and the merged model written below
        run_info=info,
    )  # fmt: skip
    res = trainer.fit()
    step, seen, val_loss = res.step, train_batches.response_tokens, res.val_loss
    loss_v = res.train_loss if res.train_loss is not None else float("nan")
    # what every outcome reports; each adds its checkpoint and adapter
    result = functools.partial(
        SFTResult, out, step, len(train_ex), dropped, seen, loss_v, val_loss,
        stopped=res.stopped, max_steps=tc.max_steps,
    )  # fmt: skip
    if not lora:
        return result(res.checkpoint)
    from minimoe.finetune.lora import merge_lora, save_adapter

    adapter = save_adapter(trained, out / "adapter", base=source, tokenizer=tok, fingerprint=fingerprint)
    if not merge:
        return result(None, adapter)
    model = merge_lora(trained)
    cfg.model = model.cfg
    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    (out / "config.yaml").write_text(text, encoding="utf-8")
    info = {"step": step, "tokens": seen, "val_loss": val_loss, **info}
    ck = ckpt_lib.save_checkpoint(
        out, step, model.cpu(), {"step": step, "sft": True}, info, text, tok, is_best=True
    )
    return result(ck, adapter)
