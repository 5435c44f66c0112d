"""JSONL evaluation tasks: multiple choice, minimal pairs and generation.

- multiple choice, `{"context", "choices", "label"}`: the log-likelihood of each choice after the
  context; accuracy as lm-evaluation-harness computes `acc`, `acc_norm` (log-likelihood divided by
  the choice's length in characters), `acc_bytes` (by its UTF-8 bytes), plus per token.
- minimal pairs, `{"sentence_good", "sentence_bad"}` (BLiMP): the fraction of pairs where the good
  sentence has the strictly higher total log-probability.
- generation, `{"prompt", "reference"}`: generate from the prompt and score against the reference
  (a string or a list of strings) with BLEU, chrF, ROUGE, token F1 and exact match; GSM8K-style
  references ("... #### 42") add the accuracy of the final number (`metrics.final_answer`).

A task file is a .jsonl file or a folder of them (results then also per file). Field names can be
remapped (`fields={"sentence_good": "good"}`). Bad input raises MinimoeError naming the file and line.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from minimoe.data.records import iter_jsonl
from minimoe.errors import MinimoeError
from minimoe.eval.scoring import encode_pair, model_context, score_pairs
from minimoe.files import visible_files

JSONL_SUFFIXES = (".jsonl", ".ndjson")


# ---------------------------------------------------------------------- reading task files


@dataclass
class Record:
    """One JSONL record and where it came from (for error messages and per-file results)."""

    file: str  # path relative to the task folder (the file name for a single file)
    line: int
    data: dict[str, Any]

    @property
    def where(self) -> str:
        return f"{self.file} line {self.line}"


def task_files(path: str | Path) -> tuple[list[Path], Path | None]:
    """The .jsonl files of a task: the file itself, or those under a folder (sorted). A folder's hidden
    files and folders (.ipynb_checkpoints copies, .git) are left out, as training data folders leave them.

    Returns:
        (files, root) where root is the folder (None for a single file).
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise MinimoeError(f"task data {p} does not exist")
    if p.is_file():
        return [p], None
    files = sorted(f for _, f in visible_files(p) if f.suffix.lower() in JSONL_SUFFIXES and f.is_file())
    if not files:
        raise MinimoeError(f"folder {p} holds no .jsonl files")
    return files, p


def read_jsonl(path: Path, name: str | None = None) -> list[Record]:
    """Records of a JSON Lines file; blank lines are skipped.

    Raises MinimoeError for a file with no records, a line that is not JSON, or one that is not an object.
    """
    name = name or str(path)
    records = []
    for n, rec in iter_jsonl(path, name):
        if not isinstance(rec, dict):
            raise MinimoeError(f"{name} line {n} is a JSON {type(rec).__name__}, not an object")
        records.append(Record(name, n, rec))
    if not records:
        raise MinimoeError(f"{name} is empty (no JSON records)")
    return records


@dataclass
class TaskData:
    records: list[Record]
    sha256: str  # over file names and contents
    folder: bool  # read from a folder: results are also given per file


def load_records(path: str | Path, limit: int | None = None) -> TaskData:
    """All records of a task file or folder (at most `limit` per file) and a sha256 of the data."""
    if limit is not None and limit <= 0:
        raise MinimoeError(f"--limit must be positive, got {limit}")
    files, root = task_files(path)
    h = hashlib.sha256()
    records: list[Record] = []
    for f in files:
        name = str(f.relative_to(root)) if root else str(f)
        records += read_jsonl(f, name)[:limit]
        h.update(name.encode() + b"\0" + hashlib.sha256(f.read_bytes()).hexdigest().encode())
    return TaskData(records, h.hexdigest(), root is not None)


def _field(rec: Record, fields: dict[str, str], role: str) -> Any:
    name = fields.get(role, role)
    if name not in rec.data:
        keys = ", ".join(map(str, rec.data)) or "none"
        raise MinimoeError(
            f"{rec.where} has no '{name}' field (it has: {keys}); --field {role}=NAME reads it from another"
        )
    return rec.data[name]


def _text(rec: Record, fields: dict[str, str], role: str, allow_empty: bool = False) -> str:
    value = _field(rec, fields, role)
    if not isinstance(value, str):
        raise MinimoeError(
            f"{rec.where}: field '{fields.get(role, role)}' holds {type(value).__name__}, not text"
        )
    if not allow_empty and not value.strip():
        raise MinimoeError(f"{rec.where}: field '{fields.get(role, role)}' is empty")
    return value


def _per_file(records: Sequence[Record], values: Sequence[dict[str, float]]) -> dict[str, dict]:
    """Mean of each metric per file (files in first-seen order), with the example count `n`."""
    groups: dict[str, list[dict[str, float]]] = {}
    for rec, v in zip(records, values):
        groups.setdefault(rec.file, []).append(v)
    return {f: {**_means(vs), "n": len(vs)} for f, vs in groups.items()}


def _means(values: Sequence[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([v[k] for v in values])) for k in values[0]}


def stderr_of_mean(xs: Sequence[float]) -> float:
    """Sample standard deviation / sqrt(n), as lm-eval reports `*_stderr`."""
    n = len(xs)
    return float(np.std(xs, ddof=1) / math.sqrt(n)) if n > 1 else float("nan")


def _check_fits(n_tokens: int, ctx: int, where: str, what: str) -> None:
    if n_tokens > ctx:
        raise MinimoeError(
            f"{where}: {what} is {n_tokens} tokens, longer than the {ctx} tokens the model reads (the context: "
            "by default the run's train.seq_len, at most its model context)"
        )


# ---------------------------------------------------------------------- multiple choice


def join_choice(context: str, choice: str, delimiter: str = " ") -> str:
    """The continuation scored after `context`: `delimiter + choice`, except that no delimiter is
    added after an empty context or where the context already ends, or the choice starts, with
    whitespace (so "The cat sat on the " + "mat" is not scored with two spaces)."""
    if not context or context[-1:].isspace() or choice[:1].isspace():
        return choice
    return delimiter + choice


def multiple_choice_example(rec: Record, fields: dict[str, str]) -> tuple[str, list[str], int]:
    """(context, choices, label) of a record, or MinimoeError naming the line. A label may be an int
    or a string of digits (as HellaSwag stores it)."""
    context = _text(rec, fields, "context", allow_empty=True)
    choices = _field(rec, fields, "choices")
    if not isinstance(choices, list) or len(choices) < 2:
        raise MinimoeError(
            f"{rec.where}: '{fields.get('choices', 'choices')}' must be a list of 2 or more texts"
        )
    for j, c in enumerate(choices):
        if not isinstance(c, str) or not c:
            raise MinimoeError(f"{rec.where}: choice {j} is {'empty' if c == '' else 'not text'}")
    label = _field(rec, fields, "label")
    if isinstance(label, str) and label.strip().isdigit():
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
        raise MinimoeError(
            f"{rec.where}: label {label!r} is not an index into its {len(choices)} choices (0-{len(choices) - 1})"
        )
    return context, choices, label


def choice_correct(
    logprobs: Sequence[float], n_tokens: Sequence[int], choices: Sequence[str], label: int
) -> dict:
    """Whether each criterion picks `label`: the raw log-likelihood, and divided by the choice's
    characters (lm-eval acc_norm), UTF-8 bytes (acc_bytes) or tokens. np.argmax takes the first of
    equal scores, as lm-eval does."""
    ll = np.asarray(logprobs, dtype=np.float64)
    chars = np.array([len(c) for c in choices], dtype=np.float64)
    nbytes = np.array([len(c.encode("utf-8")) for c in choices], dtype=np.float64)
    toks = np.maximum(np.asarray(n_tokens, dtype=np.float64), 1.0)
    return {
        "accuracy": float(np.argmax(ll) == label),
        "accuracy_norm": float(np.argmax(ll / chars) == label),
        "accuracy_per_byte": float(np.argmax(ll / nbytes) == label),
        "accuracy_per_token": float(np.argmax(ll / toks) == label),
    }


def evaluate_multiple_choice(
    model,
    tokenizer,
    path: str | Path,
    fields: dict[str, str] | None = None,
    delimiter: str = " ",
    batch_size: int = 16,
    limit: int | None = None,
    progress: bool = False,
    context: int | None = None,
) -> dict:
    """Accuracy of picking the most likely choice.

    Args:
        model, tokenizer: the model (eval mode) and its tokenizer.
        path: a .jsonl file of {"context": str, "choices": [str, ...], "label": int}, or a folder.
        fields: remapped field names, e.g. {"choices": "endings", "label": "gold"}.
        delimiter: put between context and choice (see `join_choice`); lm-eval's target_delimiter.
        batch_size: sequences per forward pass.
        limit: the first `limit` examples of each file.
        progress: a progress bar on stderr.
        context: tokens the model reads per sequence (contexts are cut from the left to fit; default:
            the model context; `evaluate_run` passes the run's training length, past which no position
            was trained).
    Returns:
        {"accuracy", "accuracy_norm" (lm-eval acc_norm: by characters), "accuracy_per_byte"
        (lm-eval acc_bytes), "accuracy_per_token", "accuracy_stderr", "n", "data_sha256"}, plus
        "per_file" and "accuracy_macro" for a folder.
    """
    fields = fields or {}
    data = load_records(path, limit)
    ctx_len = _context(model, context)
    examples, pairs = [], []
    for rec in data.records:
        prefix, choices, label = multiple_choice_example(rec, fields)  # (`context` is the token budget)
        for j, c in enumerate(choices):
            ctx_ids, cont_ids = encode_pair(tokenizer, prefix, join_choice(prefix, c, delimiter))
            _check_fits(len(cont_ids), ctx_len, rec.where, f"choice {j}")
            pairs.append((ctx_ids, cont_ids))
        examples.append((choices, label))
    scores = _score(model, pairs, batch_size, ctx_len, progress, "multiple choice")
    values, i = [], 0
    for choices, label in examples:
        sc = scores[i : i + len(choices)]
        i += len(choices)
        values.append(choice_correct([s.logprob for s in sc], [s.n_tokens for s in sc], choices, label))
    return _summary(data, values, "accuracy")


def _summary(data: TaskData, values: list[dict[str, float]], main: str) -> dict:
    out: dict[str, Any] = _means(values)
    out[f"{main}_stderr"] = stderr_of_mean([v[main] for v in values])
    out["n"] = len(values)
    if data.folder:
        out["per_file"] = _per_file(data.records, values)
        out[f"{main}_macro"] = float(np.mean([f[main] for f in out["per_file"].values()]))
    out["data_sha256"] = data.sha256
    return out


def _score(model, pairs, batch_size: int, max_len: int, progress: bool, desc: str):
    from tqdm.auto import tqdm

    with tqdm(total=len(pairs), desc=desc, unit="seq", disable=not progress, leave=False) as bar:
        return score_pairs(model, pairs, batch_size=batch_size, max_len=max_len, on_batch=bar.update)


def _context(model, context: int | None) -> int:
    """The tokens a task reads per sequence: `context`, at most the model's."""
    ctx = model_context(model)
    if context is not None and not 1 <= context <= ctx:
        raise MinimoeError(
            f"the context (--context) must be between 1 and the model context ({ctx}), got {context}"
        )
    return context or ctx


# ---------------------------------------------------------------------- minimal pairs


def evaluate_minimal_pairs(
    model,
    tokenizer,
    path: str | Path,
    fields: dict[str, str] | None = None,
    batch_size: int = 16,
    limit: int | None = None,
    progress: bool = False,
    context: int | None = None,
) -> dict:
    """BLiMP-style accuracy: how often the good sentence is more probable than the bad one.

    Args:
        path: a .jsonl file of {"sentence_good": str, "sentence_bad": str}, or a folder of them
            (e.g. one file per BLiMP paradigm).
        fields: remapped names, e.g. {"sentence_good": "good", "sentence_bad": "bad"}.
        Others as for `evaluate_multiple_choice`.
    Returns:
        {"accuracy", "accuracy_stderr", "n", "data_sha256"} plus, for a folder, "per_file" and
        "accuracy_macro" (the mean over files, as BLiMP reports).
    """
    fields = fields or {}
    data = load_records(path, limit)
    records = data.records
    ctx_len = _context(model, context)
    pairs = []
    for rec in records:
        for role in ("sentence_good", "sentence_bad"):
            ids = encode_pair(tokenizer, "", _text(rec, fields, role))
            # the whole sentence is scored, so it cannot be cut to fit
            _check_fits(len(ids[1]), ctx_len, rec.where, f"'{fields.get(role, role)}'")
            pairs.append(ids)
    scores = _score(model, pairs, batch_size, ctx_len, progress, "minimal pairs")
    values = [
        {"accuracy": float(scores[2 * i].logprob > scores[2 * i + 1].logprob)} for i in range(len(records))
    ]
    return _summary(data, values, "accuracy")


# ---------------------------------------------------------------------- generation


def generate_until(
    model,
    tokenizer,
    prompt: str,
    max_new_tokens: int = 64,
    stop: Sequence[str] = (),
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = 0,
    context: int | None = None,
    stop_ids: Sequence[int] = (),
) -> str:
    """Generate a continuation of `prompt`, cut before the first stop string (or end-of-text, or one of
    `stop_ids`: a chat template's end-of-turn token).

    The prompt is cut from the left so that prompt + max_new_tokens fit `context` positions (default:
    the model context; lm-eval's `max_length` where the harness sets one).
    """
    from minimoe.infer.generate import generate_tokens

    ctx = min(context or model_context(model), model_context(model))
    if not 1 <= max_new_tokens < ctx:
        raise MinimoeError(
            f"max new tokens ({max_new_tokens}) must be between 1 and the context - 1 ({ctx - 1})"
        )
    ids = tokenizer.encode(prompt)[-(ctx - max_new_tokens) :] if prompt else [tokenizer.eos_id]
    stop = [s for s in stop if s]
    produced: list[int] = []
    for t in generate_tokens(
        model, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        seed=seed, stop_ids=(tokenizer.eos_id, *stop_ids),
    ):  # fmt: skip
        produced.append(t)
        if stop:
            text = tokenizer.decode(produced)
            cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
            if cut >= 0:
                return text[:cut]
    return tokenizer.decode(produced)


def evaluate_generation(
    model,
    tokenizer,
    path: str | Path,
    fields: dict[str, str] | None = None,
    max_new_tokens: int = 64,
    stop: Sequence[str] = (),
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    limit: int | None = None,
    progress: bool = False,
    on_prediction: Callable[[Record, str], None] | None = None,
    chat: bool = False,
    context: int | None = None,
) -> dict:
    """Generate for each prompt and score against the references.

    Args:
        path: a .jsonl file of {"prompt": str, "reference": str or [str, ...]}, or a folder.
        fields: remapped names, e.g. {"prompt": "question", "reference": "answers"}.
        max_new_tokens, stop, temperature, top_k, top_p: generation options (temperature 0 = greedy);
            generation also stops at end-of-text.
        seed: example i samples with seed + i, so results do not depend on order.
        on_prediction: called with each record and its generated text (to save predictions).
        chat: send each prompt as a user turn in the tokenizer's chat template (the plain `role: content`
            lines without one), as `minimoe serve`'s chat completions do, and stop at the template's
            end-of-turn token too: how a chat-tuned run is asked.
        context: prompt + generated tokens at most (prompts are cut from the left; default: the model
            context, as `minimoe generate` reads).
    Returns:
        {"bleu", "bleu_brevity_penalty", "chrf", "rouge1", "rouge2", "rougeL", "rougeLsum", "f1",
        "exact_match", "n", "data_sha256"}, "answer_accuracy" when every reference has a "#### answer",
        plus "per_file" for a folder. The generated text is
        compared after stripping surrounding whitespace.
    """
    from tqdm.auto import tqdm

    from minimoe.eval.metrics import generation_metrics

    fields = fields or {}
    data = load_records(path, limit)
    records = data.records
    prompts, refs = [], []
    for rec in records:
        prompts.append(_text(rec, fields, "prompt", allow_empty=True))
        ref = _field(rec, fields, "reference")
        ref_list = [ref] if isinstance(ref, str) else ref
        if not isinstance(ref_list, list) or not ref_list or not all(isinstance(r, str) for r in ref_list):
            raise MinimoeError(
                f"{rec.where}: '{fields.get('reference', 'reference')}' must be a text or a list of texts"
            )
        refs.append(ref_list)
    turn_ends: tuple[int, ...] = ()
    if chat:
        from minimoe.data.chat_template import chat_renderer

        render, turn_ends = chat_renderer(tokenizer)
        prompts = [render([{"role": "user", "content": p}]) for p in prompts]
    hyps = []
    for i, (rec, prompt) in enumerate(
        tqdm(list(zip(records, prompts)), desc="generation", disable=not progress, leave=False)
    ):
        text = generate_until(
            model, tokenizer, prompt, max_new_tokens, stop, temperature, top_k, top_p, seed + i,
            context=context and _context(model, context), stop_ids=turn_ends,
        )  # fmt: skip
        hyps.append(text.strip())
        if on_prediction is not None:
            on_prediction(rec, text)
    out: dict[str, Any] = generation_metrics(hyps, refs)
    out["n"] = len(hyps)
    if data.folder:
        groups: dict[str, list[int]] = {}
        for i, rec in enumerate(records):
            groups.setdefault(rec.file, []).append(i)
        out["per_file"] = {
            f: {**generation_metrics([hyps[i] for i in idx], [refs[i] for i in idx]), "n": len(idx)}
            for f, idx in groups.items()
        }
    out["data_sha256"] = data.sha256
    return out
