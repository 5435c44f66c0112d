"""OpenAI-compatible serving: `build_app(model, tokenizer, name)` gives a FastAPI app; `minimoe serve`
runs it with uvicorn (`run_server`). Needs the `serve` extra (fastapi, uvicorn); jinja2 for tokenizer
chat templates. `minimoe.serve.limits` reads without the extra (the CLI uses it for its flags)."""

from __future__ import annotations

_EXPORTS = {
    "build_app": "minimoe.serve.app",
    "app_from_run": "minimoe.serve.app",
    "run_server": "minimoe.serve.app",
    "Engine": "minimoe.serve.engine",
    "Job": "minimoe.serve.engine",
    "JobParams": "minimoe.serve.engine",
    "Limits": "minimoe.serve.limits",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    # imported on first use, so that `minimoe.serve.limits` works without fastapi installed
    if name not in _EXPORTS:
        raise AttributeError(f"module 'minimoe.serve' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)
