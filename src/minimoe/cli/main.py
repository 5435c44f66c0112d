"""minimoe: train, study, evaluate and serve DeepSeek-V3-style Mixture-of-Experts language models.

Start with `minimoe train` (the tiny preset on the built-in corpus, at most 8 minutes on a laptop
CPU), then `minimoe generate runs/tiny --prompt "def main("`. `minimoe COMMAND --help` shows a
command's options, their defaults and an example.

A mistake in what you typed is one sentence on stderr and exit code 2; an unexpected error is one
line and exit code 1 (add --debug for the traceback)."""

from __future__ import annotations

import argparse
import ctypes
import importlib
import os
import sys
import time
from typing import NoReturn

from minimoe.errors import MinimoeError, describe_os_error, missing_package, one_line


def _others_load(samples: int = 5, interval_s: float = 0.01) -> float:
    """How many cores other processes keep busy now: the median over a few samples of the running
    processes besides this one (Linux `/proc/stat`), else the 1-minute load average. The average would
    lag both ways: a job started seconds ago barely shows, one that just ended still does."""
    counts = []
    try:
        for i in range(samples):
            with open("/proc/stat", encoding="ascii") as f:
                counts.append(
                    next(int(line.split()[1]) for line in f if line.startswith("procs_running")) - 1
                )
            if i + 1 < samples:
                time.sleep(interval_s)
    except (OSError, StopIteration, ValueError):
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return float(sorted(counts)[len(counts) // 2])


def wait_policy(others_load: float, command: str = "") -> str | None:
    """OpenMP wait policy for a process about to use every core (torch's default thread count); None
    leaves it to the OpenMP runtime (libgomp: spin a while, then sleep).

    Spinning idle threads (ACTIVE) is faster while the cores are otherwise idle, and ruinous when other
    processes need them; sleeping (PASSIVE) costs a wake-up per parallel region. So spin only when the
    others leave every core free (numbers in BENCHMARKS.md, "OpenMP wait policy"). `serve` on idle cores
    gets the runtime's default instead of ACTIVE: a server waits between requests, and ACTIVE workers
    would keep a core busy all that time, while the default's spin covers the gaps between the kernels
    of one decode step (BENCHMARKS.md, "Against transformers' continuous batching").
    """
    if others_load >= 0.5:
        return "PASSIVE"
    return None if command == "serve" else "ACTIVE"


def keep_freed_memory(command: str = "") -> bool:
    """Have glibc keep freed memory for reuse instead of handing it back to the kernel; True if set.

    By default glibc serves a block of more than its (adaptive) mmap threshold with a fresh mapping and
    trims the heap's free top, so each training step's activations and gradients, freed and allocated
    again every step, come back as new zero-filled pages: 6,000-10,000 page faults and 13-17 ms of
    system CPU time per `tiny` training step on 2 cores, a few dozen and 1-3 ms with this setting, same
    peak memory (BENCHMARKS.md, "glibc malloc"). jemalloc and tcmalloc keep freed memory by default.
    Process-wide, for whatever imports this module. Left alone for `serve` (a server should give back
    what a burst of requests took), where the user tuned glibc (a MALLOC_* variable or glibc.malloc
    tunables), preloads another allocator or sets MINIMOE_KEEP_FREED_MEMORY=0, and off glibc.
    """
    env = os.environ
    if command == "serve" or env.get("MINIMOE_KEEP_FREED_MEMORY", "1") == "0" or "LD_PRELOAD" in env:
        return False
    if any(k.startswith("MALLOC_") for k in env) or "glibc.malloc." in env.get("GLIBC_TUNABLES", ""):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl has no libc.so.6)
        return False
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # glibc's <malloc.h>
    settings = ((M_MMAP_THRESHOLD, 32 << 20), (M_TRIM_THRESHOLD, 1 << 30), (M_TOP_PAD, 64 << 20))
    return all([mallopt(param, value) == 1 for param, value in settings])  # a list: set every one


# name -> (module, one line, an example). `minimoe --help` reads only this table: a command's module
# (and torch behind it) is imported only when that command runs or shows its own help.
COMMANDS_TABLE: dict[str, tuple[str, str, str]] = {
    "train": ("minimoe.cli.train", "train a model from raw text",
              "minimoe train --preset tiny --data notes.txt --out runs/notes train.max_minutes=10"),
    "generate": ("minimoe.cli.generate", "generate text from a trained run",
                 'minimoe generate runs/tiny --prompt "def main(" --max-new-tokens 100 --temperature 0.8'),
    "params": ("minimoe.cli.params", "count total and activated parameters, KV-cache and training memory",
               "minimoe params deepseek-v3 --memory"),
    "export": ("minimoe.cli.export", "export a run to a Hugging Face folder (transformers, vLLM)",
               "minimoe export runs/tiny --out hf/tiny"),
    "import": ("minimoe.cli.import_", "import a Hugging Face MoE checkpoint folder as a run",
               "minimoe import hf/tiny --out runs/imported"),
    "upcycle": ("minimoe.cli.upcycle", "initialise an MoE from a dense Llama-family checkpoint",
                "minimoe upcycle path/to/llama --experts 8 --top-k 2 --out runs/upcycled"),
    "sft": ("minimoe.cli.sft", "supervised fine-tuning on chat JSONL",
            "minimoe sft runs/tiny --data chats.jsonl --out runs/tiny-sft"),
    "lora": ("minimoe.cli.lora", "LoRA / QLoRA fine-tuning on chat JSONL (PEFT)",
             "minimoe lora runs/tiny --data chats.jsonl --out runs/tiny-lora --rank 8"),
    "eval": ("minimoe.cli.eval", "evaluate a run: perplexity, multiple choice, minimal pairs, generation",
             "minimoe eval runs/tiny --task perplexity --data valid.txt"),
    "serve": ("minimoe.cli.serve", "serve a trained run over an OpenAI-compatible HTTP API",
              "minimoe serve runs/tiny --port 8000"),
    "quantize": ("minimoe.cli.quantize", "quantize a run's weights to int8 or int4 and check perplexity",
                 "minimoe quantize runs/tiny --bits 8 --out runs/tiny-int8"),
    "compare": ("minimoe.cli.compare", "train variants of a config at equal tokens or FLOPs; write a report",
                "minimoe compare experiments/2a_balancing.yaml --out runs/balancing"),
    "plot": ("minimoe.cli.plot", "draw loss, learning-rate, MaxVio and expert-load figures to PNG",
             "minimoe plot runs/tiny --out plots/tiny"),
    "inspect": ("minimoe.cli.inspect", "show which experts each token goes to, or routing statistics",
                'minimoe inspect runs/tiny --text "def main():"'),
    "bench": ("minimoe.cli.bench", "measure training and decode speed and MFU, optionally against HF",
              "minimoe bench --preset tiny"),
}  # fmt: skip
COMMANDS = {name: module for name, (module, _, _) in COMMANDS_TABLE.items()}


def _refuse(prog: str, message: str) -> NoReturn:
    """A bad command line as one sentence naming the help to read, exit 2 (`prog`: "minimoe COMMAND" once
    the command is known, as every other error of that command is prefixed)."""
    sys.stderr.write(f"{prog}: error: {message} (see '{prog} --help')\n")
    sys.exit(2)


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad argument as one sentence (exit 2) instead of usage + error."""

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        _refuse(self.prog, message)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and examples as written; each option's default shown, unless it is empty or the help
    text already gives it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            not action.option_strings
            or default is argparse.SUPPRESS
            or default is None
            or default is False
            or default in ([], "")
            or "default" in text.lower()
        ):
            return text
        return f"{text} (default: {default})"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("minimoe")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "(not installed)"


def build_parser(commands: list[str] | None = None) -> ArgumentParser:
    """The `minimoe` parser. Only the subcommands in `commands` (default: all) get their options, so
    `minimoe --help` imports no command module and `minimoe train ...` imports one; the others are
    listed by name and summary."""
    parser = ArgumentParser(
        prog="minimoe",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands have the same flag for the same thing: --checkpoint best|latest, --device, --out.",
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    parser.add_argument("--version", action="version", version=f"minimoe {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    for name, (module, summary, example) in COMMANDS_TABLE.items():
        if commands is None or name in commands:
            importlib.import_module(module).add_parser(sub)
        else:
            sub.add_parser(name, help=summary)
        p = sub.choices[name]
        p.formatter_class = HelpFormatter
        p.description = p.description or summary[0].upper() + summary[1:] + "."
        p.epilog = f"example:\n  {example}" + (f"\n\n{p.epilog}" if p.epilog else "")
    for p in sub.choices.values():  # `minimoe train --debug ...` too; SUPPRESS keeps the top-level value
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def _command_in(argv: list[str]) -> str | None:
    """The subcommand named on the command line (the first word that is one), if any."""
    return next((a for a in argv if a in COMMANDS_TABLE), None)


# Before any command imports torch, which loads OpenMP (it reads the policy once); a value the user
# set wins.
_COMMAND = _command_in(sys.argv[1:]) or ""
if "OMP_WAIT_POLICY" not in os.environ:
    _policy = wait_policy(_others_load(), _COMMAND)
    if _policy is not None:
        os.environ["OMP_WAIT_POLICY"] = _policy
KEEPS_FREED_MEMORY = keep_freed_memory(_COMMAND)  # what this process got


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()  # the command's start: train.max_minutes counts from here
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    command = _command_in(argv)
    parser = build_parser([command] if command else [])
    try:
        # dotted `key=value` overrides may sit anywhere on the line, between options too
        args, extra = parser.parse_known_args(argv)
        overrides = [a for a in extra if "=" in a and not a.startswith("-")]
        unknown = [a for a in extra if a not in overrides]
        if unknown or (overrides and not hasattr(args, "overrides")):
            # the command's own help, which lists what it takes
            prog = f"{parser.prog} {args.command}" if args.command else parser.prog
            _refuse(prog, f"unrecognized arguments: {' '.join(unknown or overrides)}")
        if overrides:
            args.overrides = list(args.overrides) + overrides
    except SystemExit as e:  # --help, or a bad argument already reported in one line
        return int(e.code or 0)
    if args.command is None:
        parser.print_help()
        return 2
    args.started = started
    try:
        return importlib.import_module(COMMANDS[args.command]).run(args) or 0
    except MinimoeError as e:
        if args.debug:
            raise
        sys.stderr.write(f"minimoe {args.command}: error: {one_line(e)}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("minimoe: interrupted\n")
        return 130
    except (
        BrokenPipeError
    ):  # the reader of stdout left (`minimoe ... | head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit flush cannot fail too
        return 128 + 13  # SIGPIPE
    except Exception as e:  # noqa: BLE001 - the CLI boundary
        if args.debug:
            raise
        package = missing_package(e.name) if isinstance(e, ModuleNotFoundError) else None
        if package is not None:  # an optional integration that is not installed
            sys.stderr.write(f"minimoe {args.command}: error: this needs {package}\n")
            return 2
        reason = describe_os_error(e) if isinstance(e, OSError) else None
        if reason is not None:  # the file system refused a path the user gave: theirs to fix
            sys.stderr.write(f"minimoe {args.command}: error: {reason}\n")
            return 2
        sys.stderr.write(
            f"minimoe {args.command}: internal error: {type(e).__name__}: {one_line(e)} "
            "(rerun with --debug for the traceback)\n"
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
