"""The serving engine's self-speculative decode step (DeepSeek-V3 MTP, as in `minimoe.infer.speculative`),
part of `minimoe.serve.engine.Engine`: every sequence carries a draft of its next-but-one token from the
model's first MTP module, and one forward over [last token, draft] per row verifies all drafts at once;
each row keeps the draft and a bonus token when its draft is accepted, else the corrected token.
Acceptance is per row: greedy rows accept when the draft is the main model's argmax (so they generate
exactly what plain greedy does), sampled rows use speculative sampling's rule (`verify_draft`), which
keeps the main model's distribution. The MTP module then runs over the same positions, batched, to draft
the next step.
"""

from __future__ import annotations

import torch

from minimoe.infer.common import decode_threads
from minimoe.infer.speculative import next_drafts, verify_rows
from minimoe.serve.rows import quarantine


class SpeculativeStep:
    """`Engine`'s `_decode_speculative` (it uses the engine's pool, running sequences and helpers)."""

    def _decode_speculative(self) -> None:
        """One verify forward over [next token, draft] of every row, then one batched MTP step. When
        every row is greedy, acceptance is decided between them on the device (`speculate`: one call,
        one compiled graph with the static step); a row that samples accepts on the host, between
        `forward` and `draft`."""
        running = self._running
        device = self.pool.cache.layers[0].a.device
        tokens = torch.tensor([[s.next_token, s.draft] for s in running], device=device)  # (n, 2)
        try:
            with decode_threads(self.model, 2 * len(running)):
                step = self.static or self.pool
                if all(s.sampling.greedy for s in running):
                    spec = step.speculate(tokens)
                    logits, draft_logits = spec.logits, spec.draft_logits  # (n, 2, V), (n, V)
                    broken = quarantine((logits, draft_logits), running)  # the next drafts come from these
                    new = verify_rows(logits, spec.best, running)
                else:
                    logits, hidden = step.forward(tokens)  # (n, 2, V), (n, 2, D)
                    broken = quarantine(logits, running)
                    new = verify_rows(logits, logits.argmax(-1), running)
                    # MTP input per row: the committed positions' next tokens; a rejected row's second
                    # position is masked padding (its length advances by one)
                    next_ids = torch.tensor([t if len(t) == 2 else t * 2 for t in new], device=device)
                    take = torch.tensor([len(t) - 1 for t in new], device=device)
                    draft_logits = step.draft(hidden, next_ids, take)
                    broken = quarantine(draft_logits, running, broken)
                accepted = [len(toks) == 2 for toks in new]
                infos = self._logprobs(logits, new, running)  # token j of a row: from its logits at j
                self.pool.advance([len(toks) for toks in new])
        except Exception:  # noqa: BLE001 - the batch failed; its sequences cannot continue
            self._fail_running(self._caught("a decode step"), 500)
            return
        self.drafted += len(running)
        self.accepted += sum(accepted)
        done = []
        for i, (seq, toks, info) in enumerate(zip(running, new, infos)):
            if i in broken:
                done.append(i)
                continue
            for tok, lp in zip(toks, info):
                if self._emit(seq, tok, lp):
                    done.append(i)
                    break
        next_drafts(draft_logits, running)
        for i in reversed(done):
            self._remove(i)
