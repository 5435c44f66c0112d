"""`minimoe serve RUN_DIR --host 127.0.0.1 --port 8000`: an OpenAI-compatible HTTP API (uvicorn)."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import ipaddress
import os
import socket
import sys
from pathlib import Path

from minimoe.cli.args import add_checkpoint_arg, add_device_args, integer, set_threads
from minimoe.errors import MinimoeError
from minimoe.serve.limits import Limits

API_KEY_ENV = "MINIMOE_API_KEY"


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve a trained run over an OpenAI-compatible HTTP API")
    p.add_argument("run_dir", help="run directory or checkpoint directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument(
        "--port", type=integer, default=8000, help="TCP port (0: any free port, printed at startup)"
    )
    add_checkpoint_arg(p)
    add_device_args(p, threads=True)
    p.add_argument(
        "--model-name", default=None, help="the model id clients ask for (default: the run's name)"
    )
    p.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on every endpoint but /health (default: the "
        f"{API_KEY_ENV} environment variable, which keeps the key out of the process list)",
    )
    p.add_argument(
        "--speculative",
        action="store_true",
        help="self-speculative decoding: every sequence drafts with the MTP module and the drafts of the "
        "whole batch are verified in one forward (needs a run trained with model.mtp_depth >= 1)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="decode with fixed-shape steps (a bucket of slots, a bucket of the context, masked) compiled "
        "by torch.compile at start-up; with --speculative the verify and draft steps too; see "
        "BENCHMARKS.md for when it pays",
    )
    d = Limits()
    limits = [
        ("--max-active", integer, "cache slots: sequences decoded together in one batch; each holds a "
         "context-sized cache row allocated at start-up"),
        ("--max-queued", integer, "choices waiting for a slot; a request that would go past it gets 429"),
        ("--max-queued-per-client", integer, "of those, the most from one client address (default: half)"),
        ("--max-active-per-client", integer, "of the cache slots, the most one client address holds at once "
         "(default: all but an eighth, kept free for other clients)"),
        ("--max-choices", integer, "prompts x n in one request; more is a 400"),
        ("--max-request-tokens", integer, "prompt + completion tokens summed over a request's choices; more is a 400"),
        ("--max-tokens", integer, "the most completion tokens one choice may ask for; more is a 400"),
        ("--max-prompt-tokens", integer, "the longest prompt in tokens; longer is a 400 (default: what fits the context)"),
        ("--max-body-bytes", integer, "larger request bodies get a 413"),
        ("--header-timeout", float, "seconds a connection may take to send its request head"),
        ("--body-timeout", float, "seconds a request may take to send its body (then 408)"),
        ("--write-timeout", float, "seconds a client may read nothing of its answer while the server waits "
         "to write it; then its connection is closed and its request cancelled"),
        ("--prefill-chunk", integer, "prompt tokens prefilled per step, between decode steps"),
    ]  # fmt: skip
    for flag, kind, text in limits:
        default = getattr(d, flag[2:].replace("-", "_"))
        shown = f" (default {default})" if default is not None and "default:" not in text else ""
        p.add_argument(flag, type=kind, default=default, help=text + shown)
    p.add_argument(
        "--max-tokens-limit",
        type=integer,
        dest="max_tokens",
        default=argparse.SUPPRESS,
        help=argparse.SUPPRESS,
    )  # the old name of --max-tokens
    p.add_argument(
        "--forwarded-allow-ips",
        type=proxy_list,
        default=None,
        metavar="ADDRS",
        help="comma-separated addresses or networks (10.0.0.0/8; * for any) of reverse proxies whose "
        "X-Forwarded-For header names the client that the per-client limits count (default: none; "
        "clients are told apart by the address that connects)",
    )
    p.add_argument(
        "--log-level",
        choices=["critical", "error", "warning", "info", "debug"],
        default="info",
        help="uvicorn's log level (info logs every request)",
    )


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port, or a MinimoeError saying why there cannot be one."""
    if not 0 <= port <= 65535:
        raise MinimoeError(f"--port must be between 0 and 65535, got {port}")
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as e:
        raise MinimoeError(f"cannot resolve --host {host!r} ({e.strerror})") from None
    sock = socket.socket(family, kind, proto)
    # as uvicorn does: lets a restarted server reuse a port whose old connections are in TIME_WAIT
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(128)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise MinimoeError(
                f"port {port} on {host} is already in use; stop that server or pick another --port"
            ) from None
        raise MinimoeError(f"cannot listen on {host}:{port} ({e.strerror})") from None
    return sock


def proxy_list(text: str) -> list[str]:
    """`--forwarded-allow-ips` (as uvicorn and gunicorn name it): comma-separated IP addresses or networks, or `*`."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected addresses or networks separated by commas, got nothing")
    if "*" in items:  # uvicorn reads * as "any" only alone
        return ["*"]
    for item in items:
        try:
            ipaddress.ip_network(item)  # strict, as uvicorn parses it: 10.0.0.1/8 would match nothing
        except ValueError:
            try:
                net = ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise argparse.ArgumentTypeError(
                    f"{item!r} is not an IP address or network (10.0.0.1, 10.0.0.0/8, ::1, or * for any)"
                ) from None
            raise argparse.ArgumentTypeError(f"{item!r} has host bits set; the network is {net}") from None
    return items


def resolve_api_key(flag: str | None, environ=os.environ) -> str | None:
    """The API key: --api-key if given, else $MINIMOE_API_KEY; None (no key) when neither is set."""
    if flag is not None:
        if not flag.strip():
            raise MinimoeError("--api-key must not be empty")
        return flag.strip()
    return environ.get(API_KEY_ENV, "").strip() or None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def limits_from_args(args) -> Limits:
    """The Limits the flags give, checked (a MinimoeError names the first bad flag)."""
    names = [f.name for f in dataclasses.fields(Limits)]
    return Limits(**{name: getattr(args, name) for name in names}).validate()


def run(args) -> int:
    limits = limits_from_args(args)
    set_threads(args.threads)
    api_key = resolve_api_key(args.api_key)
    try:
        from minimoe.serve.app import build_app, run_server
    except ImportError as e:
        raise MinimoeError(
            f"serving needs {e.name}, which minimoe installs; reinstall it: pip install -e ."
        ) from None
    from minimoe.dist.init import resolve_device
    from minimoe.train.checkpoint import load_run

    resolve_device(args.device, what="--device")
    if not Path(args.run_dir).exists():
        raise MinimoeError(f"run directory {args.run_dir} does not exist")
    if args.model_name is not None and not args.model_name.strip():
        raise MinimoeError("--model-name must not be empty (clients send it as `model`)")
    # bind first: a busy port is reported before the model is loaded, and nothing can take the port
    # between the check and uvicorn's start
    sock = listen(args.host, args.port)
    try:
        model, tokenizer, _, meta = load_run(args.run_dir, args.checkpoint, args.device)
        name = args.model_name or Path(args.run_dir).resolve().name
        if args.speculative and not len(model.mtp):
            raise MinimoeError("--speculative needs a run trained with MTP modules (model.mtp_depth >= 1)")
        app = build_app(
            model, tokenizer, name, api_key=api_key, limits=limits, speculative=args.speculative,
            compile=args.compile,
        )  # fmt: skip
        engine = app.state.service.engine
        pool = engine.pool
        if args.compile:
            print(f"compiling the decode step ({pool.slots} slots x {pool.max_len} tokens)...", flush=True)
            print(f"compiled in {engine.warm_up():.1f} s", flush=True)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        print(f"serving {name} from {meta['path']} on http://{shown}:{port}/v1", flush=True)
        print(
            f"cache: {pool.slots} slots x {pool.max_len} tokens, {pool.nbytes() / 2**20:.1f} MiB allocated",
            flush=True,
        )
        if api_key is None and not _is_loopback(args.host):
            print(
                f"warning: listening on {args.host} without an API key; anyone who can reach this port "
                f"can use the model (set {API_KEY_ENV} or --api-key)",
                file=sys.stderr,
                flush=True,
            )
        try:
            run_server(app, sock, args.log_level, args.forwarded_allow_ips)
        except KeyboardInterrupt:  # uvicorn shuts down gracefully on Ctrl-C, then re-raises it
            pass
        print("server stopped", flush=True)
    finally:
        sock.close()
    return 0
