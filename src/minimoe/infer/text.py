"""Tokens to text, as they arrive: the one incremental detokenizer that `generate` and `serve` share.

`TextStream` holds back an incomplete UTF-8 character and any tail that could be the start of a stop
string, and cuts the text where a stop string begins, so the pieces it hands out add up to the final,
trimmed text whenever decoding more tokens only appends to the text decoded before (minimoe's byte and
BPE tokenizers do; a decoder that rewrites earlier text, such as one that removes the space before
punctuation once the punctuation arrives, can make text already handed out differ from the final text).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

# prompt ids a stream decodes its first tokens after: enough for a decoder that looks back one word
# (SentencePiece's space, WordPiece's joins and clean-ups) even past a few special tokens it skips
CONTEXT_IDS = 8


def partial_stop_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of some stop string."""
    best = 0
    last = text[-1:]
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if s[k - 1] == last and text.endswith(s[:k]):  # the cheap test first: most k fail it
                best = k
                break
    return best


class TextStream:
    """Incremental detokenization with stop strings, for one sequence.

    Each push decodes a short window of the newest tokens, not the whole list, so a long sequence costs
    the same per token as a short one. The window starts one settled chunk back: the new text is what
    the window decodes to beyond that chunk's own text, so tokenizers such as SentencePiece's, which
    only give the right spaces in context, come out as the whole list would. A chunk settles when the
    text ends in a complete character and the chunk added to it (tokens that add nothing, such as
    special tokens the decoder skips, wait in the window for the next one); a decoder that rewrote the
    chunk's text (the window does not start with it) gets the whole list decoded instead.

    The first chunk is the prompt's last few ids (`context`), as vLLM and TGI detokenize: the text is
    what the prompt and the new ids decode to beyond the prompt's own text, so a SentencePiece or
    WordPiece decoder, which drops the space before the first token it decodes, gives the space between
    prompt and completion. A byte-level decoder's text is the same with or without it. A prompt whose
    text ends inside a character (U+FFFD), or a decode of prompt and ids that does not start with the
    prompt's text, leaves the new ids decoded alone, as without a context.

    Args:
        decode: token ids -> text (a tokenizer's `decode`).
        stop: strings that end the text (cut just before the first one that appears).
        context: the prompt's ids (only the last `CONTEXT_IDS` are decoded); empty: the text is the
            new ids' own (the text of a completion with no prompt).
    """

    def __init__(
        self, decode: Callable[[list[int]], str], stop: Sequence[str] = (), context: Sequence[int] = ()
    ) -> None:
        self._decode = decode
        self.stop = tuple(s for s in stop if s)
        self._longest = max((len(s) for s in self.stop), default=0)
        self.ids: list[int] = []
        self.text = ""  # the text so far (final once `stopped` or after `flush`)
        self.sent = 0  # characters of `text` already handed out
        self.stopped = False
        self._context = list(context[-CONTEXT_IDS:])
        self._context_text = decode(self._context) if self._context else ""
        if self._context_text.endswith("\ufffd"):  # the prompt ends inside a character: no use as context
            self._context, self._context_text = [], ""
        # the decode window over context + ids: [_prefix:_read] is the last settled chunk (its text alone
        # in `_prefix_text`, the context's at first), and `_settled` the text of ids up to _read
        self._prefix, self._read = 0, len(self._context)
        self._prefix_text, self._settled = self._context_text, ""

    def push(self, token: int) -> str:
        """Add a token; return the text that is now safe to show (maybe ""). No-op once stopped."""
        if self.stopped:
            return ""
        self.ids.append(token)
        self.text = self._extend()
        # U+FFFD at the end is usually the first bytes of a character still being generated: it is
        # neither shown nor matched against the stop strings until the character is complete
        stable = len(self.text.rstrip("\ufffd"))
        if self._cut(stable):
            return self._take(len(self.text))
        return self._take(stable - partial_stop_len(self.text[:stable], self.stop))

    def flush(self) -> str:
        """The sequence ended: return everything not handed out yet. A U+FFFD at the end is final now,
        so a stop string may end in it (then `stopped` is set)."""
        if not self.stopped:
            self._cut(len(self.text))
        return self._take(len(self.text))

    def _extend(self) -> str:
        """The text of every id, from a decode of the window (see the class docstring)."""
        window = self._decode(self._ids(self._prefix))
        if window.startswith(self._prefix_text):
            text = self._settled + window[len(self._prefix_text) :]
        else:
            text = self._whole()
        # ends in a whole character and adds to the text: the new tokens settle. Tokens that add
        # nothing (special tokens the decoder skips) stay in the window with the chunk before them,
        # which the next token's text depends on (a WordPiece "##" piece glues onto it)
        if not text.endswith("\ufffd") and text != self._settled:
            self._settled = text
            self._prefix, self._read = self._read, len(self._context) + len(self.ids)
            self._prefix_text = self._decode(self._ids(self._prefix, self._read))
        return text

    def _ids(self, start: int, end: int | None = None) -> list[int]:
        """(context + ids)[start:end], without copying the whole list."""
        n = len(self._context)
        end = n + len(self.ids) if end is None else end
        if start >= n:
            return self.ids[start - n : end - n]
        return self._context[start:end] + self.ids[: max(end - n, 0)]

    def _whole(self) -> str:
        """The text of every id from one decode of them all, after the context where it decodes as a
        prefix of the whole."""
        if self._context:
            whole = self._decode(self._context + self.ids)
            if whole.startswith(self._context_text):
                return whole[len(self._context_text) :]
        return self._decode(self.ids)

    def _cut(self, end: int) -> bool:
        """Cut the text before the first stop string that lies within text[:end]; True if one does."""
        if not self.stop:
            return False
        # a match cannot start inside text already sent (its start was held back), but look a
        # little earlier anyway in case decoding changed the tail
        start = max(0, self.sent - self._longest)
        hits = [i for s in self.stop if (i := self.text.find(s, start, end)) >= 0]
        if not hits:
            return False
        self.stopped = True
        self.text = self.text[: max(min(hits), self.sent)]
        return True

    def _take(self, end: int) -> str:
        if end <= self.sent:
            return ""
        out, self.sent = self.text[self.sent : end], end
        return out
