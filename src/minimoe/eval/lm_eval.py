"""lm-evaluation-harness adapter: a minimoe run as lm_eval model `minimoe`.

From the command line, run lm_eval through this module, with lm_eval's own arguments::

    python -m minimoe.eval.lm_eval --model minimoe --model_args path=runs/tiny,batch_size=16 \\
        --tasks hellaswag,lambada_openai --device cpu

lm_eval 0.4.13 looks models up only in its in-process registry: it reads no plugin entry points and
imports nothing from `--include_path` before it builds the model. So the bare `lm_eval` command
cannot know `minimoe`; this module registers the model and then hands its arguments to lm_eval's
command line unchanged. From Python, importing this module is enough::

    import lm_eval, minimoe.eval.lm_eval
    lm_eval.simple_evaluate(model="minimoe", model_args="path=runs/tiny", tasks=["hellaswag"])

Model arguments: path (run or checkpoint directory), checkpoint (best | latest), device, dtype
(float32 | bfloat16 | float16), batch_size, max_length (default: the run's training sequence
length, capped by the model context), max_gen_toks (default 256). Scoring and tokenisation are minimoe's own (`minimoe.eval.scoring`), which follow
lm-eval's HF backend: trailing context whitespace moves to the continuation, an empty context is the
end-of-text token, long contexts are cut from the left, rolling windows are disjoint.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import lm_eval.models  # noqa: F401 - lm_eval imports its own models only while its registry is empty
import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import model_registry, register_model
from tqdm.auto import tqdm

from minimoe.errors import MinimoeError
from minimoe.eval.perplexity import window_pairs
from minimoe.eval.scoring import encode_pair, model_context, prefix_id, score_pairs
from minimoe.eval.tasks import generate_until

log = logging.getLogger(__name__)
DEFAULT_BATCH = 8


def _batch_size(value: Any) -> int:
    """lm_eval passes an int, "8", "auto" or "auto:N"; auto sizing is not implemented, so it means 8."""
    if isinstance(value, str) and value.startswith("auto"):
        return DEFAULT_BATCH
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise MinimoeError(f"batch_size must be a positive integer or 'auto', got {value!r}") from None
    if n <= 0:
        raise MinimoeError(f"batch_size must be positive, got {n}")
    return n


class MinimoeLM(LM):
    """lm_eval `LM` over a minimoe Transformer: loglikelihood, loglikelihood_rolling, generate_until.

    Args:
        path: run or checkpoint directory (or pass `model` and `tokenizer` instead).
        checkpoint: "best" or "latest".
        device: "cpu", "cuda", ... (lm_eval's --device).
        dtype: weight dtype name.
        batch_size: sequences per forward pass (lm_eval's --batch_size).
        max_length: tokens per forward pass (default: the run's training length; at most the model
            context).
        max_gen_toks: default generation budget when a task gives none.
        model, tokenizer: an already loaded model and tokenizer (Python use).
    """

    def __init__(
        self,
        path: str | None = None,
        checkpoint: str = "best",
        device: str | None = "cpu",
        dtype: str = "float32",
        batch_size: int | str = DEFAULT_BATCH,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        model=None,
        tokenizer=None,
        max_batch_size: int | None = None,  # passed by lm_eval; unused (no auto batch sizing)
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            raise MinimoeError(
                f"unknown minimoe model_args: {', '.join(sorted(unknown))} (known: path, checkpoint, "
                "device, dtype, batch_size, max_length, max_gen_toks)"
            )
        if model is None:
            if path is None:
                raise MinimoeError("the minimoe lm_eval model needs model_args path=RUN_DIR")
            from minimoe.eval.runner import DTYPES
            from minimoe.train.checkpoint import load_run

            if dtype not in DTYPES:
                raise MinimoeError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
            device = device or "cpu"
            if device.startswith("cuda") and not torch.cuda.is_available():
                # lm_eval's CLI defaults to cuda:0; its HF backend falls back to the CPU the same way
                log.warning("minimoe: %s is not available, evaluating on the CPU", device)
                device = "cpu"
            model, tokenizer, cfg, meta = load_run(str(path), checkpoint, device)
            model = model.to(DTYPES[dtype])
            self.info = {"path": meta["path"], "step": meta.get("step")}
            # positions past the training length were never trained
            max_length = max_length or min(cfg.train.seq_len, cfg.model.max_position_embeddings)
        elif tokenizer is None:
            raise MinimoeError("pass the tokenizer together with the model")
        else:
            self.info = {}
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = _batch_size(batch_size)
        ctx = model_context(model)
        self.max_length = int(max_length or ctx)
        if not 1 <= self.max_length <= ctx:
            raise MinimoeError(
                f"max_length must be between 1 and the model context ({ctx}), got {max_length}"
            )
        self.max_gen_toks = int(max_gen_toks)
        self._device = self.model.embed_tokens.weight.device

    # ------------------------------------------------------------------ lm_eval interface

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def tokenizer_name(self) -> str:
        return f"minimoe-{self.tokenizer.kind}-{self.tokenizer.hash()[:12]}"

    def get_model_info(self) -> dict:
        return {"minimoe_checkpoint": self.info.get("path"), "minimoe_step": self.info.get("step")}

    def _score(self, pairs, desc: str, disable: bool):
        with tqdm(total=len(pairs), desc=desc, disable=disable, leave=False) as bar:
            return score_pairs(self.model, pairs, self.batch_size, self.max_length, on_batch=bar.update)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(context, continuation) -> (sum of continuation log-probs, whether greedy decoding yields it)."""
        pairs = [encode_pair(self.tokenizer, ctx, cont) for ctx, cont in (r.args for r in requests)]
        scores = self._score(pairs, "minimoe loglikelihood", disable_tqdm)
        out = [(s.logprob, s.greedy) for s in scores]
        for r, res in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", r.args, res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts after end-of-text, in disjoint windows of max_length tokens."""
        texts = [r.args[0] for r in requests]
        pairs, owner = [], []
        for i, ids in enumerate(self.tokenizer.encode_batch(texts)):
            ws = window_pairs(ids, prefix_id(self.tokenizer), self.max_length, self.max_length) if ids else []
            pairs += ws
            owner += [i] * len(ws)
        totals = [0.0] * len(texts)
        for i, s in zip(owner, self._score(pairs, "minimoe loglikelihood_rolling", disable_tqdm)):
            totals[i] += s.logprob
        for r, res in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, res)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Generate from each context until a stop string (`until`), end-of-text or max_gen_toks;
        greedy unless `do_sample`, when request i samples with seed + i (`seed` from the request, else 0)."""
        out = []
        bar = tqdm(requests, desc="minimoe generate_until", disable=disable_tqdm, leave=False)
        for i, r in enumerate(bar):
            context, gen_kwargs = r.args
            kw = dict(gen_kwargs or {})
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = kw.pop("max_gen_toks", None)  # absent or null: the default
            max_new = self.max_gen_toks if max_new is None else int(max_new)
            do_sample = bool(kw.pop("do_sample", False))
            # read even when greedy: `do_sample: false, temperature: 0.0` (GSM8K) is not an ignored argument
            temperature = float(kw.pop("temperature", 0.0) or 0.0)
            temperature = temperature if do_sample else 0.0
            top_k = int(kw.pop("top_k", 0) or 0)
            top_p = float(kw.pop("top_p", 1.0) or 1.0)
            # request i samples with seed + i: lm-eval hands a task's `repeats` over as copies of one
            # request, which must draw different samples (self-consistency votes over them)
            seed = int(kw.pop("seed", 0) or 0) + i
            if kw:
                log.warning("minimoe ignores generation arguments %s", ", ".join(sorted(kw)))
            # as lm-eval's hf model: the prompt keeps its last max_length - max_gen_toks tokens
            max_new = max(1, min(max_new, self.max_length - 1))
            text = generate_until(
                self.model, self.tokenizer, context, max_new, until, temperature, top_k, top_p, seed,
                context=self.max_length,
            )  # fmt: skip
            self.cache_hook.add_partial("generate_until", r.args, text)
            out.append(text)
        return out


if "minimoe" not in model_registry:  # a second import (e.g. under `python -m`) keeps the first class
    register_model("minimoe")(MinimoeLM)


def main(argv: list[str] | None = None) -> int:
    """Run lm_eval's command line with `minimoe` registered. Returns the exit code."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm-eval", *(sys.argv[1:] if argv is None else argv)]
    try:
        cli_evaluate()
    except MinimoeError as e:
        sys.stderr.write(f"minimoe lm_eval: error: {e}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
