"""Pretrained tokenizers by name (`gpt2`, `smollm2`, `deepseek-moe`) or Hugging Face repo id
(`hf:ORG/NAME`), found on this machine: nothing is downloaded.

A name is looked up, in order, in `$MINIMOE_TOKENIZERS/NAME/`, in `MINIMOE_CACHE/tokenizers/NAME/`
(default `~/.cache/minimoe/tokenizers/NAME/`), and in the Hugging Face hub cache (`HF_HUB_CACHE`,
`HF_HOME/hub` or `~/.cache/huggingface/hub`) under each repo the name stands for. The folder found
holds `tokenizer.json`, and `tokenizer_config.json` when the source had one (it names the EOS token).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from minimoe.errors import MinimoeError

ENV_DIR = "MINIMOE_TOKENIZERS"


@dataclass(frozen=True)
class NamedTokenizer:
    title: str  # what the error message calls it
    repos: tuple[str, ...]  # Hugging Face repos that ship it, the canonical one first


KNOWN: dict[str, NamedTokenizer] = {
    "gpt2": NamedTokenizer("GPT-2's 50257-token BPE", ("openai-community/gpt2", "gpt2")),
    "smollm2": NamedTokenizer(
        "SmolLM2's 49152-token BPE",
        ("HuggingFaceTB/SmolLM2-135M", "HuggingFaceTB/SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-360M"),
    ),
    "deepseek-moe": NamedTokenizer(
        "DeepSeek's 100K BPE",
        ("deepseek-ai/deepseek-moe-16b-base", "deepseek-ai/deepseek-moe-16b-chat"),
    ),
}


def is_named(spec: str) -> bool:
    """Whether `spec` names a pretrained tokenizer (a known name or `hf:ORG/NAME`)."""
    return spec in KNOWN or spec.startswith("hf:")


def minimoe_tokenizer_dir(name: str) -> Path:
    """Where minimoe's own cache keeps the named tokenizer (the place error messages point to)."""
    root = Path(os.environ.get("MINIMOE_CACHE") or Path.home() / ".cache" / "minimoe")
    return root / "tokenizers" / name


def hf_hub_dirs() -> list[Path]:
    """The Hugging Face hub cache folders to search, as huggingface_hub resolves them."""
    hub = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")  # the latter: older name
    if hub:
        return [Path(hub)]
    home = Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface")
    return [home / "hub"]


def _in_hf_cache(repo: str) -> Path | None:
    """The snapshot folder of `repo` holding tokenizer.json: the one refs/main points to, else the
    newest snapshot that has it."""
    for hub in hf_hub_dirs():
        base = hub / ("models--" + repo.replace("/", "--"))
        ref = base / "refs" / "main"
        if ref.is_file():
            snap = base / "snapshots" / ref.read_text(encoding="utf-8").strip()
            if (snap / "tokenizer.json").is_file():
                return snap
        snaps = [p.parent for p in (base / "snapshots").glob("*/tokenizer.json")]
        if snaps:
            return max(snaps, key=lambda p: p.stat().st_mtime)
    return None


def find_named_tokenizer(spec: str) -> Path | None:
    """The local folder holding the tokenizer `spec` names, or None when it is not on this machine."""
    if spec.startswith("hf:"):
        return _in_hf_cache(spec[3:])
    candidates = []
    if os.environ.get(ENV_DIR):
        candidates.append(Path(os.environ[ENV_DIR]).expanduser() / spec)
    candidates.append(minimoe_tokenizer_dir(spec))
    for folder in candidates:
        if (folder / "tokenizer.json").is_file():
            return folder
    for repo in KNOWN[spec].repos:
        found = _in_hf_cache(repo)
        if found is not None:
            return found
    return None


def named_tokenizer_path(spec: str) -> Path:
    """`find_named_tokenizer`, or a MinimoeError saying in one sentence where to put the files."""
    found = find_named_tokenizer(spec)
    if found is not None:
        return found
    if spec.startswith("hf:"):
        raise MinimoeError(
            f"tokenizer {spec!r} is not in the Hugging Face cache ({hf_hub_dirs()[0]}) and nothing is "
            "downloaded; fetch it there first, or pass --tokenizer PATH to a folder holding its tokenizer.json"
        )
    info = KNOWN[spec]
    raise MinimoeError(
        f"tokenizer {spec!r} ({info.title}) was not found and nothing is downloaded: put its tokenizer.json "
        f"in {minimoe_tokenizer_dir(spec)}/ (or in ${ENV_DIR}/{spec}/), keep {info.repos[0]} in the "
        "Hugging Face cache, or pass --tokenizer PATH"
    )
