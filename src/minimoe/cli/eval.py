"""`minimoe eval RUN_DIR --task TASK --data PATH`: perplexity / bits per byte, multiple choice, minimal
pairs or generation metrics of a trained run; a table on stdout (or `--json`) and a JSON file."""

from __future__ import annotations

import contextlib
import json
import math
import os
import stat
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from minimoe.cli.args import add_checkpoint_arg, add_device_args, check_writable, integer, number, stop_string
from minimoe.errors import MinimoeError, describe_os_error, require
from minimoe.eval.runner import ROLES, TASK_OPTIONS, TASKS

# the CLI's options that only some tasks read (argparse dest -> tasks), from the library's table
ONLY_FOR = {
    **{dest: tasks for dest, tasks in TASK_OPTIONS.items() if dest not in ("fields", "on_prediction")},
    "field_good": ("minimal-pairs",),
    "field_bad": ("minimal-pairs",),
    "predictions": TASK_OPTIONS["on_prediction"],
}
SKIP_KEYS = {"task", "data", "checkpoint", "settings", "config", "seconds", "per_file", "skipped"}


def add_parser(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a trained run: perplexity, multiple choice, minimal pairs, generation",
        description="Evaluate a run's checkpoint on one task. Results are printed as a table (or one JSON "
        "object with --json) and written to --out (default RUN_DIR/eval/TASK-DATA-stepN-HASH.json).",
    )
    p.add_argument("run_dir", help="run directory or checkpoint directory")
    p.add_argument("--task", required=True, choices=TASKS, help="what to evaluate")
    p.add_argument(
        "--data",
        required=True,
        help="perplexity: a text file, folder, .jsonl/.parquet or hf:NAME; other tasks: a .jsonl file or a folder of them",
    )
    add_checkpoint_arg(p)
    add_device_args(p)
    p.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="weight dtype"
    )
    p.add_argument(
        "--batch-size", type=integer, default=None, help="sequences per forward pass (default 8 / 16)"
    )
    p.add_argument(
        "--limit", type=integer, default=None, help="only the first N documents / examples per file"
    )
    g = p.add_argument_group("perplexity")
    g.add_argument("--text-field", default=None, help="text field of JSONL/Parquet records (default: text)")
    g.add_argument(
        "--window", type=integer, default=None, help="tokens per window (default: the run's train.seq_len)"
    )
    g.add_argument(
        "--stride",
        type=integer,
        default=None,
        help="tokens between window starts (default: the window, no overlap)",
    )
    g = p.add_argument_group("JSONL tasks")
    g.add_argument(
        "--context",
        type=integer,
        default=None,
        help="tokens the model reads per example, prompt and answer together; longer contexts lose their "
        "start (default: the run's train.seq_len, past which no position was trained, for multiple choice "
        "and minimal pairs; the model's context for generation)",
    )
    g.add_argument(
        "--field",
        action="append",
        default=[],
        metavar="ROLE=NAME",
        help="read ROLE from field NAME, e.g. --field choices=endings (roles: context, choices, label; "
        "sentence_good, sentence_bad; prompt, reference)",
    )
    g.add_argument("--field-good", default=None, help="minimal pairs: field of the good sentence")
    g.add_argument("--field-bad", default=None, help="minimal pairs: field of the bad sentence")
    g.add_argument(
        "--delimiter", default=None, help="multiple choice: put between context and choice (default ' ')"
    )
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=integer, default=None, help="tokens to generate (default 64)")
    g.add_argument("--temperature", type=number, default=None, help="0 = greedy (the default)")
    g.add_argument("--top-k", type=integer, default=None, help="keep the k most likely tokens (0 = off)")
    g.add_argument("--top-p", type=number, default=None, help="nucleus sampling mass (1 = off)")
    g.add_argument("--seed", type=integer, default=None, help="sampling seed (example i uses seed + i)")
    g.add_argument(
        "--stop",
        action="append",
        default=None,
        type=stop_string,
        help="stop string (repeatable; \\n and \\t mean newline and tab); end-of-text always stops",
    )
    g.add_argument(
        "--chat",
        action="store_const",
        const=True,
        default=None,
        help="send each prompt as a user turn in the run's chat template, as serve's chat completions do "
        "(for a run tuned by `minimoe sft`)",
    )
    g.add_argument(
        "--predictions", default=None, help="write each prompt, reference and generation to this JSONL"
    )
    g = p.add_argument_group("output")
    g.add_argument("--json", action="store_true", help="print the results as one JSON object on stdout")
    g.add_argument("--out", default=None, help="results JSON file (default: under RUN_DIR/eval/)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def _fields(args) -> dict[str, str]:
    roles = ROLES[args.task]
    fields: dict[str, str] = {}
    for item in args.field:
        role, sep, name = item.partition("=")
        if not sep or not name:
            raise MinimoeError(f"--field takes ROLE=NAME, got {item!r}")
        if role not in roles:
            raise MinimoeError(
                f"--field role {role!r} does not apply to --task {args.task} (roles: {', '.join(roles) or 'none'})"
            )
        fields[role] = name
    if args.field_good:
        fields["sentence_good"] = args.field_good
    if args.field_bad:
        fields["sentence_bad"] = args.field_bad
    return fields


def _options(args) -> dict:
    from minimoe.dist.init import resolve_device

    for dest, tasks in ONLY_FOR.items():
        if getattr(args, dest) is not None and args.task not in tasks:
            flag = "--" + dest.replace("_", "-")
            raise MinimoeError(f"{flag} applies only to --task {' / '.join(tasks)}")
    for dest in ("batch_size", "window", "stride", "limit", "context"):
        value = getattr(args, dest)
        if value is not None and value <= 0:
            raise MinimoeError(f"--{dest.replace('_', '-')} must be positive, got {value}")
    resolve_device(args.device, what="--device")
    opts: dict = {"limit": args.limit}
    if args.task == "perplexity":
        opts.update(
            text_field=args.text_field,
            window=args.window,
            stride=args.stride,
            batch_size=args.batch_size or 8,
        )
        if args.field:
            raise MinimoeError("--field does not apply to --task perplexity (use --text-field)")
        return opts
    opts.update(fields=_fields(args), context=args.context)
    if args.task == "generation":
        if args.temperature is not None and not 0 <= args.temperature < math.inf:  # NaN too
            raise MinimoeError(f"--temperature must be >= 0, got {args.temperature}")
        if args.max_new_tokens is not None and args.max_new_tokens < 1:  # before any work starts
            raise MinimoeError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
        if args.top_k is not None and args.top_k < 0:
            raise MinimoeError(f"--top-k must be >= 0, got {args.top_k}")
        if args.top_p is not None and not 0 < args.top_p <= 1:
            raise MinimoeError(f"--top-p must be in (0, 1], got {args.top_p}")
        opts.update(
            max_new_tokens=args.max_new_tokens, stop=args.stop or None, temperature=args.temperature,
            top_k=args.top_k, top_p=args.top_p, seed=args.seed, chat=args.chat,
        )  # fmt: skip
    else:
        opts["batch_size"] = args.batch_size or 16
        if args.task == "multiple-choice":
            opts["delimiter"] = args.delimiter
    return opts


def _finite(obj):
    """NaN / inf -> None, so the file is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool) or isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:,.4f}" if abs(v) < 1e6 else f"{v:.4g}"
    return str(v)


def _print_table(res: dict, out_path: Path | None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    t = Table(title=f"{res['task']} · step {res['checkpoint']['step']} · {Path(res['data']['path']).name}")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in res.items():
        if k not in SKIP_KEYS and not isinstance(v, dict | list):
            t.add_row(k, _fmt(v))
    console.print(t)
    per_file = res.get("per_file")
    if per_file:
        cols = [k for k, v in next(iter(per_file.values())).items() if not isinstance(v, dict | list)]
        if res["task"] == "perplexity":
            cols = [c for c in ("loss", "perplexity", "bits_per_byte", "tokens", "n") if c in cols]
        elif res["task"] == "generation":
            cols = [c for c in ("bleu", "rougeL", "f1", "exact_match", "n") if c in cols]
        pt = Table(title="per file")
        pt.add_column("file")
        for c in cols:
            pt.add_column(c, justify="right")
        for f, row in per_file.items():
            pt.add_row(f, *(_fmt(row.get(c)) for c in cols))
        console.print(pt)
    if res.get("skipped"):
        console.print(f"skipped {len(res['skipped'])} binary or non-UTF-8 files")
    console.print(
        f"data {res['data']['path']} (sha256 {res['data']['sha256'][:12]}) · {res['seconds']:.1f} s"
    )
    if out_path is not None:
        console.print(f"results written to {out_path}")


def _check_predictions_path(predictions: str, data: str) -> None:
    """Refuse a --predictions file that is the --data file or lies inside the --data folder: writing it
    would replace the examples being evaluated (or add a file to the task)."""
    source = Path(data).expanduser()
    if not source.exists():
        return  # the evaluation names the missing data
    source, target = source.resolve(), Path(os.path.realpath(predictions))
    if target == source:
        raise MinimoeError(f"--predictions {predictions} is the --data file itself; choose another file")
    if source.is_dir() and target.is_relative_to(source):
        raise MinimoeError(
            f"--predictions {predictions} is inside the --data folder {data}; choose a file outside it"
        )


@contextlib.contextmanager
def _predictions_writer(path: str | None) -> Iterator[Callable[[Any, str], None] | None]:
    """A function writing one prediction row, or None without `path`.

    Rows go to a temporary file beside `path` (where a symbolic link points), which replaces `path` only
    when the block ends without an error and is removed otherwise: a failed or interrupted evaluation
    leaves the previous predictions as they were. A `path` that exists and is not a regular file
    (/dev/stdout, /dev/fd/N, a FIFO) is written directly: a rename would replace it by a regular file.
    The file is opened on entry, so a path that cannot be written is reported before the model loads.
    """
    if path is None:
        yield None
        return
    dest = Path(os.path.realpath(path))  # os.path: a symbolic link loop is a path, not an error
    if dest.is_dir():
        raise MinimoeError(f"cannot write predictions ({path} is a directory); choose another --predictions")
    try:
        direct = not stat.S_ISREG(os.stat(path).st_mode)  # /dev/fd/N resolves to no path: stat `path`
    except OSError:
        direct = False  # a new file (or one the open below reports)
    tmp = None if direct else dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    try:
        f = open(path if direct else tmp, "w", encoding="utf-8")  # noqa: SIM115 - closed below
    except OSError as e:
        raise _cannot_write_predictions(e, path) from None

    def save(rec, text: str) -> None:
        try:
            f.write(json.dumps({"file": rec.file, "line": rec.line, **rec.data, "generation": text}) + "\n")
        except OSError as e:
            raise _cannot_write_predictions(e, path) from None

    try:
        yield save
        try:
            f.flush()
            if tmp is not None:
                os.fsync(f.fileno())  # the rows reach the disk before the rename makes them the file
                f.close()
                os.replace(tmp, dest)
        except OSError as e:
            raise _cannot_write_predictions(e, path) from None
    finally:
        # after a failed write, close() fails to flush the same rows again: the error is reported already
        with contextlib.suppress(OSError):
            f.close()
        if tmp is not None:
            tmp.unlink(missing_ok=True)  # gone already once renamed


def _cannot_write_predictions(e: OSError, path: str) -> MinimoeError:
    """The error of a failed write, naming the user's path rather than the temporary file beside it."""
    reason = describe_os_error(OSError(e.errno, e.strerror, path)) or e.strerror
    return MinimoeError(f"cannot write predictions ({reason})")


def run(args) -> int:
    from minimoe.eval.runner import default_results_path, evaluate_run

    opts = _options(args)
    if args.task == "generation":  # found out now, not after generating every answer
        require("--task generation (BLEU, chrF, ROUGE)", "sacrebleu", "rouge_score")
    if args.out:  # found out now, not after the evaluation
        check_writable(args.out, "--out", "results")
    predictions = args.predictions if args.task == "generation" else None
    if predictions:
        _check_predictions_path(predictions, args.data)
    with _predictions_writer(predictions) as save:
        if save is not None:
            opts["on_prediction"] = save
        res = evaluate_run(
            args.run_dir, args.task, args.data, checkpoint=args.checkpoint, device=args.device,
            dtype=args.dtype, progress=not args.no_progress, **opts,
        )  # fmt: skip
    res = _finite(res)
    out_path = Path(args.out) if args.out else default_results_path(res)
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    except OSError as e:
        raise MinimoeError(
            f"cannot write results ({describe_os_error(e) or e.strerror}); choose another --out"
        ) from None
    if args.json:
        sys.stdout.write(json.dumps(res) + "\n")
        sys.stderr.write(f"results written to {out_path}\n")
    else:
        _print_table(res, out_path)
    return 0
