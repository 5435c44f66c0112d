"""Fine-tune an exported minimoe model (a Hugging Face folder from `minimoe export`) with the
`transformers` Trainer, under DeepSpeed ZeRO when launched with one of the configs next to this file.

    # one process, no DeepSpeed (a smoke test; CPU is fine)
    python examples/deepspeed/finetune.py --model hf_model --data sft.jsonl --out ft --max-steps 10

    # DeepSpeed ZeRO-2 (or ZeRO-3) on 8 GPUs, through accelerate
    accelerate launch --config_file examples/deepspeed/accelerate_zero2.yaml \
        examples/deepspeed/finetune.py --model hf_model --data sft.jsonl --out ft --bf16

    # or the DeepSpeed JSON straight to the Trainer, launched by torchrun or deepspeed
    torchrun --nproc-per-node 8 examples/deepspeed/finetune.py --model hf_model --data sft.jsonl \
        --out ft --bf16 --deepspeed examples/deepspeed/ds_zero3.json

Data: JSONL, one object per line, either {"prompt": ..., "response": ...} (the loss covers the response
tokens only) or {"text": ...} (the loss covers every token). DeepSpeed is not a minimoe dependency:
install it where it builds (`pip install deepspeed`, CUDA machines).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import torch


def load_examples(path: str, tokenizer, max_len: int) -> list[dict[str, list[int]]]:
    """Tokenize a JSONL file into input_ids/labels; prompt tokens get label -100 (no loss)."""
    eos = tokenizer.eos_token_id
    out = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        if "prompt" in row and "response" in row:
            prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
            response = tokenizer(row["response"], add_special_tokens=False)["input_ids"]
            ids = prompt + response + ([eos] if eos is not None else [])
            labels = [-100] * len(prompt) + ids[len(prompt) :]
        elif "text" in row:
            ids = tokenizer(row["text"], add_special_tokens=False)["input_ids"]
            ids = ids + ([eos] if eos is not None else [])
            labels = list(ids)
        else:
            raise SystemExit(f"{path}:{n}: expected 'prompt' and 'response', or 'text'")
        out.append({"input_ids": ids[:max_len], "labels": labels[:max_len]})
    if not out:
        raise SystemExit(f"{path} holds no examples")
    return out


def collate(batch: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding is masked out of attention and loss."""
    T = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), T), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), T), dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        ids[i, :n] = torch.tensor(b["input_ids"])
        labels[i, :n] = torch.tensor(b["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="folder written by `minimoe export`")
    ap.add_argument("--data", required=True, help="JSONL with prompt/response or text")
    ap.add_argument("--out", required=True, help="output folder (a Hugging Face model folder)")
    ap.add_argument("--deepspeed", help="DeepSpeed JSON (not needed under `accelerate launch`)")
    ap.add_argument("--lr", type=float, default=1e-5, help="peak learning rate")
    ap.add_argument("--epochs", type=float, default=1.0, help="passes over the data")
    ap.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (-1: epochs)")
    ap.add_argument("--batch-size", type=int, default=4, help="sequences per GPU per step")
    ap.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    ap.add_argument("--max-len", type=int, default=1024, help="truncate examples to this many tokens")
    ap.add_argument("--bf16", action="store_true", help="bf16 mixed precision (GPUs)")
    ap.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations")
    args = ap.parse_args()
    if args.deepspeed and importlib.util.find_spec("deepspeed") is None:
        raise SystemExit(
            f"--deepspeed {args.deepspeed} needs DeepSpeed, which is not installed (pip install deepspeed, on a "
            "CUDA machine); leave out --deepspeed for a one-process run without it"
        )

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train = load_examples(args.data, tokenizer, args.max_len)
    targs = TrainingArguments(
        output_dir=args.out,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        lr_scheduler_type="cosine",
        warmup_steps=0.03,  # a float below 1 is a share of the steps
        weight_decay=0.1,
        adam_beta2=0.95,
        max_grad_norm=1.0,
        bf16=args.bf16,
        gradient_checkpointing=args.gradient_checkpointing,
        deepspeed=args.deepspeed,
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        remove_unused_columns=False,
    )
    # under ZeRO-3 (zero3_init_flag / a stage-3 JSON) from_pretrained builds the model already sharded
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16 if args.bf16 else None)
    trainer = Trainer(
        model=model,
        args=targs,
        train_dataset=train,
        data_collator=lambda b: collate(b, pad_id),
    )
    trainer.train()
    trainer.save_model(args.out)  # ZeRO-3: gathers the 16-bit weights (stage3_gather_16bit_...)
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(args.out)


if __name__ == "__main__":
    main()
