"""OpenAI-compatible serving: `build_app(model, tokenizer, name)` gives a FastAPI app; `minimoe serve`
runs it with uvicorn. Needs the `serve` extra (fastapi, uvicorn); jinja2 for tokenizer chat templates."""

from minimoe.serve.app import app_from_run, build_app
from minimoe.serve.chat import DEFAULT_CHAT_TEMPLATE, make_renderer
from minimoe.serve.engine import Engine, JobParams, TextStream

__all__ = [
    "DEFAULT_CHAT_TEMPLATE",
    "Engine",
    "JobParams",
    "TextStream",
    "app_from_run",
    "build_app",
    "make_renderer",
]
