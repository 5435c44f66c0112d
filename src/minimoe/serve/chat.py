"""Chat prompts: render a list of messages into one prompt string.

A tokenizer may carry a chat template (a Jinja string, as in Hugging Face `tokenizer_config.json`).
It is rendered with jinja2 in a sandbox, with the variables Hugging Face passes (`messages`,
`add_generation_prompt`, `bos_token`, `eos_token`, `raise_exception`, `strftime_now`).

Without one, minimoe uses a plain default that suits base models trained on raw text:

    system: You are terse.
    user: Hello!
    assistant:

one `role: content` line per message, then `assistant:` for the reply (no space: the model writes
it). `DEFAULT_CHAT_TEMPLATE` is the same format as a Jinja string; it is rendered in pure Python,
so serving a model without a template does not need jinja2.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from functools import lru_cache

from minimoe.errors import MinimoeError

ROLES = ("system", "developer", "user", "assistant", "tool")

DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


class ChatTemplateError(MinimoeError):
    """The template refused the messages (its `raise_exception`) or failed while rendering."""


def render_default(messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """The default chat format (`role: content` lines, then `assistant:`), without jinja2."""
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    return text + ("assistant:" if add_generation_prompt else "")


@lru_cache(maxsize=8)
def _compile(template: str):
    """A sandboxed jinja2 template, configured as Hugging Face renders chat templates."""
    try:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise MinimoeError(
            "this tokenizer has a chat template, and rendering it needs jinja2 (pip install jinja2)"
        ) from None

    def raise_exception(message: str):
        raise ChatTemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except TemplateError as e:
        raise MinimoeError(f"the tokenizer's chat template does not parse ({e})") from None


def make_renderer(
    template: str | None, bos_token: str | None = None, eos_token: str | None = None
) -> Callable[[list[dict[str, str]]], str]:
    """A function messages -> prompt text, from a Jinja chat template or the default format.

    Args:
        template: the tokenizer's `chat_template`, or None for the default format.
        bos_token, eos_token: the strings templates may insert (`{{ bos_token }}`).
    Returns:
        render(messages) -> str, with the generation prompt added. It raises ChatTemplateError
        when the template rejects the messages. A template that does not parse, or jinja2
        missing, raises MinimoeError here, at startup, rather than on the first request.
    """
    if template is None:
        return render_default
    compiled = _compile(template)

    def render(messages: list[dict[str, str]]) -> str:
        from jinja2 import TemplateError

        try:
            return compiled.render(
                messages=messages,
                add_generation_prompt=True,
                bos_token=bos_token or "",
                eos_token=eos_token or "",
            )
        except ChatTemplateError:
            raise
        except (TemplateError, TypeError, ValueError, KeyError) as e:
            raise ChatTemplateError(f"the chat template failed on these messages ({e})") from None

    return render
