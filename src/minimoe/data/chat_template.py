"""Chat templates: the one place that turns a list of messages into prompt text, for fine-tuning
(`minimoe.finetune.chat`), serving (`minimoe.serve`) and anything else that formats chats.

A tokenizer may carry a chat template (a Jinja string, as in Hugging Face `tokenizer_config.json`).
It is rendered as transformers renders `chat_template`: jinja2 in a sandbox with `trim_blocks` and
`lstrip_blocks`, `{% break %}` / `{% continue %}`, the `{% generation %}` block (rendered as its
body), a `tojson` that neither escapes HTML nor sorts keys, and the variables Hugging Face passes
(`messages`, `tools` and `documents` as none, `add_generation_prompt`, `bos_token`, `eos_token`,
`pad_token`, `raise_exception`, `strftime_now`).

OpenAI's `developer` role (the system message of newer OpenAI models) is rendered as `system` by a
template that never names it, as llama.cpp and vLLM's Responses API do: most templates know only
system, user and assistant, and some raise on any other role.

Two defaults, for tokenizers without a template:
- `PLAIN_CHAT_TEMPLATE` suits base models trained on raw text; one `role: content` line per message,
  then `assistant:` for the reply (no space: the model writes it). It is also rendered in pure
  Python (`render_plain`), so serving a model without a template does not need jinja2.
- `SFT_CHAT_TEMPLATE` is what `minimoe sft` stores with a fine-tuned run: `<|role|>` headers, and the
  end-of-text token closing every turn, so the tuned model stops at the end of its answer.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from datetime import datetime
from functools import lru_cache

from minimoe.errors import MinimoeError

PLAIN_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
SFT_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


class ChatTemplateError(MinimoeError):
    """The template refused the messages (its `raise_exception`) or failed while rendering them."""


def template_roles(template: str, messages: list[dict]) -> list[dict]:
    """`messages` with the `developer` role as `system` unless the template names it."""
    if "developer" in template or not any(m.get("role") == "developer" for m in messages):
        return messages
    return [{**m, "role": "system"} if m.get("role") == "developer" else m for m in messages]


def render_plain(messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """PLAIN_CHAT_TEMPLATE without jinja2."""
    messages = template_roles(PLAIN_CHAT_TEMPLATE, messages)
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    return text + ("assistant:" if add_generation_prompt else "")


@lru_cache(maxsize=8)
def compile_template(template: str):
    """The sandboxed jinja2 template; MinimoeError when jinja2 is missing or the template does not parse."""
    try:
        from jinja2 import TemplateError, nodes
        from jinja2.ext import Extension, loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise MinimoeError("rendering a chat template needs jinja2 (pip install jinja2)") from None

    class Generation(Extension):
        """`{% generation %}...{% endgeneration %}` (transformers marks assistant text with it): the body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body).set_lineno(lineno)

    def raise_exception(message: str):
        raise ChatTemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # transformers' filter: jinja2's own escapes HTML characters and sorts the keys
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except TemplateError as e:
        raise MinimoeError(f"the chat template does not parse ({e})") from None


def render(
    template: str,
    messages: list[dict],
    *,
    bos_token: str | None = None,
    eos_token: str | None = None,
    pad_token: str | None = None,
    add_generation_prompt: bool = False,
) -> str:
    """The template's text for `messages` (special tokens as strings, as transformers passes them).

    Raises:
        ChatTemplateError: the template rejected the messages or failed on them.
    """
    from jinja2 import TemplateError

    try:
        return compile_template(template).render(
            messages=template_roles(template, messages),
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token or "",
            eos_token=eos_token or "",
            pad_token=pad_token or "",
        )
    except ChatTemplateError:
        raise
    except (TemplateError, TypeError, ValueError, KeyError) as e:
        raise ChatTemplateError(f"the chat template failed on these messages ({e})") from None


def make_renderer(
    template: str | None,
    bos_token: str | None = None,
    eos_token: str | None = None,
    pad_token: str | None = None,
) -> Callable[[list[dict[str, str]]], str]:
    """A function messages -> prompt text with the generation prompt added, from a Jinja chat template
    or (None) the plain default. A template that does not parse, or jinja2 missing, raises
    MinimoeError here, at start-up, rather than on the first request."""
    if template is None:
        return render_plain
    compile_template(template)
    return lambda messages: render(
        template, messages, bos_token=bos_token, eos_token=eos_token, pad_token=pad_token,
        add_generation_prompt=True,
    )  # fmt: skip


def end_of_turn(
    template: str | None,
    special_tokens: Iterable[str],
    bos_token: str | None = None,
    eos_token: str | None = None,
    pad_token: str | None = None,
) -> str | None:
    """The special token a template closes an assistant turn with, when it is not EOS (ChatML's
    `<|im_end|>`, Llama 3's `<|eot_id|>`): a chat reply ends there, as transformers' generation config
    lists it among the EOS ids. None for the plain default, a turn closed by EOS, or no special token.
    Found by rendering a user turn and an assistant turn and reading what follows the reply."""
    if template is None:
        return None
    marker = "\u2063reply\u2063"  # text no template writes itself
    try:
        text = render(
            template,
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}],
            bos_token=bos_token, eos_token=eos_token, pad_token=pad_token,
        )  # fmt: skip
    except ChatTemplateError:  # a template that refuses this conversation names no end of turn
        return None
    if marker not in text:
        return None
    tail = text[text.rindex(marker) + len(marker) :]
    found = [t for t in special_tokens if t and tail.startswith(t)]
    token = max(found, key=len) if found else None
    return None if token is None or token == eos_token else token


def chat_renderer(tokenizer) -> tuple[Callable[[list[dict[str, str]]], str], tuple[int, ...]]:
    """For a Tokenizer: (messages -> prompt text with the generation prompt, from its chat template or
    the plain default; the token ids a reply also ends at: the template's end-of-turn token, if not EOS).
    What `minimoe serve`'s chat completions and `minimoe eval --chat` ask a model with."""
    specials = (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token)
    render = make_renderer(tokenizer.chat_template, *specials)
    eot = end_of_turn(tokenizer.chat_template, tokenizer.special_tokens, *specials)
    return render, ((tokenizer.special_tokens[eot],) if eot is not None else ())
