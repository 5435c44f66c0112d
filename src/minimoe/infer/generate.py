"""Autoregressive generation with the KV cache (MLA models decode from the latent cache)."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from minimoe.infer.sampling import sample_next


@torch.no_grad()
def generate_tokens(
    model,
    prompt_ids: list[int],
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop_ids: tuple[int, ...] = (),
) -> Iterator[int]:
    """Yield new token ids one at a time for a single prompt (streaming)."""
    device = model.embed_tokens.weight.device
    max_len = model.cfg.max_seq_len
    ids = list(prompt_ids)[-(max_len - 1) :] or [0]
    budget = min(max_new_tokens, max_len - len(ids))
    gen = torch.Generator(device=device)
    gen.manual_seed(seed if seed is not None else torch.seed())
    cache = model.make_cache(1, len(ids) + budget)
    logits = model(torch.tensor([ids], device=device), cache=cache, num_logits_to_keep=1).logits
    for _ in range(budget):
        nxt = sample_next(logits[:, -1], temperature, top_k, top_p, gen)
        tok = int(nxt.item())  # host sync per token: the caller streams it
        if tok in stop_ids:
            return
        yield tok
        logits = model(nxt.view(1, 1), cache=cache, num_logits_to_keep=1).logits


def generate_text(model, tokenizer, prompt: str, **kw) -> str:
    """Generate a continuation of `prompt` and return it decoded (without the prompt)."""
    ids = tokenizer.encode(prompt) if prompt else [tokenizer.eos_id]
    kw.setdefault("stop_ids", (tokenizer.eos_id,))
    return tokenizer.decode(list(generate_tokens(model, ids, **kw)))
