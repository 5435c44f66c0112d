"""One evaluation of a trained run, as `minimoe eval` does it: load the checkpoint, run a task, and
return the results with what is needed to reproduce them (config, checkpoint step, data hash)."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import torch

from minimoe.errors import MinimoeError

TASKS = ("perplexity", "multiple-choice", "minimal-pairs", "generation")
# the record fields each task reads; `fields={"ROLE": "name"}` reads a role from another field
ROLES = {
    "perplexity": (),
    "multiple-choice": ("context", "choices", "label"),
    "minimal-pairs": ("sentence_good", "sentence_bad"),
    "generation": ("prompt", "reference"),
}
# options that only some tasks read (evaluate_run keyword -> tasks)
GENERATION = ("generation",)
TASK_OPTIONS: dict[str, tuple[str, ...]] = {
    "text_field": ("perplexity",), "window": ("perplexity",), "stride": ("perplexity",),
    "context": ("multiple-choice", "minimal-pairs", "generation"),
    "fields": ("multiple-choice", "minimal-pairs", "generation"), "delimiter": ("multiple-choice",),
    "max_new_tokens": GENERATION, "temperature": GENERATION, "top_k": GENERATION, "top_p": GENERATION,
    "seed": GENERATION, "stop": GENERATION, "on_prediction": GENERATION, "chat": GENERATION,
}  # fmt: skip


def check_options(task: str, options: dict[str, Any]) -> None:
    """MinimoeError naming the first option (not None) that `task` does not read."""
    for name, value in options.items():
        tasks = TASK_OPTIONS.get(name)
        if value is not None and tasks is not None and task not in tasks:
            raise MinimoeError(f"{name} applies only to the {' / '.join(tasks)} task, not {task}")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def run_root(checkpoint_path: str | Path) -> Path:
    """The run directory a checkpoint belongs to (the checkpoint itself if it stands alone)."""
    p = Path(checkpoint_path)
    return p.parent.parent if p.parent.name == "checkpoints" else p


def evaluate_run(
    run_dir: str | Path,
    task: str,
    data: str | Path,
    checkpoint: str = "best",
    device: str = "cpu",
    dtype: str = "float32",
    progress: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """Evaluate a run's checkpoint on one task.

    Args:
        run_dir: a run directory or a checkpoint directory.
        task: one of TASKS.
        data: the task data (a text source for perplexity, a .jsonl file or folder otherwise).
        checkpoint: "best" or "latest".
        device: "cpu", "cuda", ...
        dtype: float32, bfloat16 or float16 weights.
        progress: progress bars on stderr.
        options: passed to the task function (`evaluate_perplexity`, `evaluate_multiple_choice`,
            `evaluate_minimal_pairs`, `evaluate_generation`).
    Returns:
        The task's metrics at the top level, plus "task", "data" ({"path", "sha256"}),
        "checkpoint" ({"path", "step", "tokens"}), "settings", "config" (the run's RunConfig),
        "seconds".
    """
    from minimoe.eval import perplexity, tasks
    from minimoe.train.checkpoint import load_run

    if task not in TASKS:
        raise MinimoeError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    check_options(task, options)
    if dtype not in DTYPES:
        raise MinimoeError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise MinimoeError("--device cuda was given but no CUDA device is available")
    model, tok, cfg, meta = load_run(run_dir, checkpoint, device)
    model = model.to(DTYPES[dtype]).eval()
    t0 = time.perf_counter()
    opts = {k: v for k, v in options.items() if v is not None}
    # positions past the training length were never trained: by default no scoring task reads beyond it
    # (generation asks for its own length, and reads the model's context as `generate` does)
    trained = min(cfg.train.seq_len, cfg.model.max_position_embeddings)
    if task != "generation":
        opts.setdefault("window" if task == "perplexity" else "context", trained)
    if task == "perplexity":
        res = perplexity.evaluate_perplexity(model, tok, str(data), progress=progress, **opts)
        res["data_sha256"] = _source_hash(data, opts.get("text_field", "text"))
    elif task == "multiple-choice":
        res = tasks.evaluate_multiple_choice(model, tok, data, progress=progress, **opts)
    elif task == "minimal-pairs":
        res = tasks.evaluate_minimal_pairs(model, tok, data, progress=progress, **opts)
    else:
        res = tasks.evaluate_generation(model, tok, data, progress=progress, **opts)
    seconds = time.perf_counter() - t0
    sha = res.pop("data_sha256")
    settings = {k: v for k, v in opts.items() if not callable(v)}
    settings.update(dtype=dtype, device=str(device))
    for k in ("window", "stride"):
        if k in res:
            settings[k] = res.pop(k)
    return {
        "task": task,
        **res,
        "data": {"path": str(data), "sha256": sha},
        "checkpoint": {"path": meta["path"], "step": meta.get("step"), "tokens": meta.get("tokens")},
        "settings": settings,
        "config": cfg.to_dict(),
        "seconds": seconds,
    }


def _source_hash(data: str | Path, text_field: str) -> str:
    from minimoe.data.sources import open_source

    corpus = open_source(str(data), text_field=text_field)
    return corpus.content_hash()


def default_results_path(result: dict[str, Any]) -> Path:
    """RUN_DIR/eval/TASK-DATANAME-stepN-HASH.json for a result of `evaluate_run`: one file per task,
    data, checkpoint and settings, rewritten when the same evaluation runs again."""
    name = Path(result["data"]["path"].rstrip("/")).stem or "data"
    key = repr([result["task"], result["data"]["sha256"], sorted(result["settings"].items())])
    digest = hashlib.sha256(key.encode()).hexdigest()[:8]
    step = result["checkpoint"]["step"]
    return (
        run_root(result["checkpoint"]["path"]) / "eval" / f"{result['task']}-{name}-step{step}-{digest}.json"
    )
