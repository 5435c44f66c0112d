"""`minimoe serve RUN_DIR --host 127.0.0.1 --port 8000`: an OpenAI-compatible HTTP API (uvicorn)."""

from __future__ import annotations

import errno
import socket
from pathlib import Path

from minimoe.errors import MinimoeError


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve a trained run over an OpenAI-compatible HTTP API")
    p.add_argument("run_dir", help="run directory or checkpoint directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port, printed at startup)")
    p.add_argument(
        "--checkpoint", choices=["best", "latest"], default="best", help="which checkpoint to load"
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument(
        "--model-name", default=None, help="the model id clients ask for (default: the run's name)"
    )
    p.add_argument(
        "--max-active", type=int, default=64, help="requests generated at the same time; more wait in a queue"
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


def run(args) -> int:
    if args.max_active < 1:
        raise MinimoeError(f"--max-active must be >= 1, got {args.max_active}")
    try:
        import uvicorn

        from minimoe.serve import build_app
    except ImportError as e:
        raise MinimoeError(
            f"serving needs the serve extra ({e.name} is missing): pip install 'minimoe[serve]'"
        ) from None
    from minimoe.train.checkpoint import load_run

    if not Path(args.run_dir).exists():
        raise MinimoeError(f"run directory {args.run_dir} does not exist")
    # bind first: a busy port is reported before the model is loaded, and nothing can take the port
    # between the check and uvicorn's start
    sock = listen(args.host, args.port)
    try:
        model, tokenizer, _, meta = load_run(args.run_dir, args.checkpoint, args.device)
        name = args.model_name or Path(args.run_dir).resolve().name
        app = build_app(model, tokenizer, name, max_active=args.max_active)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        print(f"serving {name} from {meta['path']} on http://{shown}:{port}/v1", flush=True)
        config = uvicorn.Config(app, log_level=args.log_level, lifespan="on")
        try:
            uvicorn.Server(config).run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn shuts down gracefully on Ctrl-C, then re-raises it
            print("server stopped", flush=True)
    finally:
        sock.close()
    return 0
