"""Run directories and atomic checkpoints.

RUN_DIR/
  config.yaml                 resolved RunConfig
  metrics.jsonl               one JSON object per logged step
  checkpoints/step_00000100/  model.safetensors, state.pt (optimizer, schedule, RNG, data position),
                              config.yaml, tokenizer/, meta.json (written last)
  checkpoints/latest, best    one line naming a step directory, replaced atomically

A checkpoint is written into a temporary directory, fsynced, then renamed into place; the `latest`
pointer moves only after that. A crash at any moment leaves the previous checkpoint loadable.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from minimoe.errors import MinimoeError

CKPT = "checkpoints"


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: nn.Module | dict[str, torch.Tensor],
    state: dict[str, Any],
    meta: dict[str, Any],
    config_text: str,
    tokenizer=None,
    keep_last: int = 2,
    is_best: bool = False,
    weights_metadata: dict[str, str] | None = None,
) -> Path:
    """Write checkpoint `step` atomically, point `latest` (and `best`) at it, prune old ones.

    `model` is a module, or its full state dict (what a distributed run gathers on rank 0), written with
    `weights_metadata` as the safetensors header metadata.
    """
    from safetensors.torch import save_file, save_model

    root = Path(run_dir) / CKPT
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # left by a crash mid-write; never trusted
        shutil.rmtree(stale, ignore_errors=True)
    final = root / step_dir_name(step)
    if not (final / "meta.json").exists():
        tmp = root / f".tmp-{step_dir_name(step)}-{os.getpid()}"
        tmp.mkdir()
        if isinstance(model, nn.Module):
            save_model(model, str(tmp / "model.safetensors"))
        else:
            weights = {k: v.contiguous() for k, v in model.items()}
            save_file(weights, str(tmp / "model.safetensors"), metadata=weights_metadata)
        torch.save(state, tmp / "state.pt")
        (tmp / "config.yaml").write_text(config_text, encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save(tmp / "tokenizer")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
        for f in tmp.rglob("*"):
            if f.is_file():
                _fsync_file(f)
        _fsync_dir(tmp)
        if final.exists():  # a directory without meta.json is an incomplete leftover
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
    atomic_write_text(root / "latest", final.name + "\n")
    if is_best:
        atomic_write_text(root / "best", final.name + "\n")
    _prune(root, keep_last)
    return final


def _read_pointer(root: Path, name: str) -> Path | None:
    p = root / name
    if not p.exists():
        return None
    target = root / p.read_text(encoding="utf-8").strip()
    return target if (target / "meta.json").exists() else None


def _prune(root: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    steps = sorted(d for d in root.glob("step_*") if (d / "meta.json").exists())
    protect = {_read_pointer(root, "latest"), _read_pointer(root, "best")}
    for d in steps[:-keep_last]:
        if d not in protect:
            shutil.rmtree(d, ignore_errors=True)


def find_checkpoint(path: str | Path, which: str = "latest") -> Path:
    """Resolve a run directory (its `which` checkpoint, falling back to latest) or a checkpoint directory."""
    p = Path(path)
    if not p.exists():
        raise MinimoeError(f"{p} does not exist")
    if not p.is_dir():
        raise MinimoeError(f"{p} is not a run or checkpoint directory")
    if (p / "meta.json").exists() and (p / "model.safetensors").exists():
        return p
    root = p / CKPT
    found = _read_pointer(root, which) or _read_pointer(root, "latest")
    if found is None:
        steps = sorted(d for d in root.glob("step_*") if (d / "meta.json").exists()) if root.exists() else []
        if not steps:
            raise MinimoeError(f"{p} holds no complete checkpoint (expected {CKPT}/step_*/meta.json)")
        found = steps[-1]
    return found


def read_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """model.safetensors of a checkpoint as a CPU state dict, with one clear sentence for a corrupt file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    f = ckpt / "model.safetensors"
    if not f.exists():
        raise MinimoeError(f"checkpoint {ckpt} has no model.safetensors")
    try:
        return load_file(str(f))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise MinimoeError(f"checkpoint {f} is corrupt or truncated ({str(e).splitlines()[0]})") from None


def load_weights(model: nn.Module, ckpt: Path) -> None:
    """Load model.safetensors into `model`, with one clear sentence for a corrupt or mismatched file."""
    sd = read_weights(ckpt)
    check_weights(sd, model, ckpt)
    model.load_state_dict(sd, strict=False)


def check_weights(sd: dict[str, torch.Tensor], model: nn.Module, ckpt: Path) -> None:
    """Raise MinimoeError unless `sd` has exactly `model`'s tensors (names and shapes); `model` may live
    on the meta device."""
    own = model.state_dict()
    # tied weights are stored once by safetensors' save_model
    missing = [k for k in own if k not in sd and not _is_tied_alias(model, k)]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise MinimoeError(f"checkpoint {ckpt} was written for a different model config ({what})")
    for k, v in sd.items():
        if own[k].shape != v.shape:
            raise MinimoeError(
                f"checkpoint {ckpt} was written for a different model config "
                f"({k}: {tuple(v.shape)} in the file, {tuple(own[k].shape)} in the model)"
            )


def _is_tied_alias(model: nn.Module, key: str) -> bool:
    return (
        key == "lm_head.weight" and getattr(model, "cfg", None) is not None and model.cfg.tie_word_embeddings
    )


def load_state(ckpt: Path) -> dict[str, Any]:
    f = ckpt / "state.pt"
    if not f.exists():
        raise MinimoeError(f"checkpoint {ckpt} has no state.pt, so it cannot be resumed")
    try:
        # weights_only: a state file is data; anything that would run code on load is refused
        return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise MinimoeError(
            f"checkpoint {f} holds objects other than tensors and plain values; refusing to load it"
        ) from None
    except Exception as e:  # noqa: BLE001 - any other unpickling failure means a damaged file
        raise MinimoeError(f"checkpoint {f} is corrupt or truncated ({type(e).__name__})") from None


def load_run(path: str | Path, which: str = "best", device: str | torch.device = "cpu"):
    """Load a model, its tokenizer and config from a run or checkpoint directory. A checkpoint written
    by `minimoe quantize` (meta.json has `quantization`) comes back with its int8/int4 weights.

    Returns:
        (model in eval mode, tokenizer, RunConfig, checkpoint meta dict)
    """
    from minimoe.config import RunConfig, dataclass_from_dict, load_yaml
    from minimoe.data import Tokenizer
    from minimoe.model.transformer import Transformer

    ckpt = find_checkpoint(path, which)
    cfg = dataclass_from_dict(RunConfig, load_yaml(ckpt / "config.yaml")).validate()
    model = Transformer(cfg.model)
    meta = json.loads((ckpt / "meta.json").read_text(encoding="utf-8"))
    if meta.get("quantization"):  # written by `minimoe quantize`: integer weights and scales
        from minimoe.infer.quantize import quantize_model

        quantize_model(model, **meta["quantization"])
    load_weights(model, ckpt)
    tok_dir = ckpt / "tokenizer"
    if not tok_dir.exists():
        raise MinimoeError(f"checkpoint {ckpt} has no tokenizer/ directory")
    tokenizer = Tokenizer.load(tok_dir)
    meta["path"] = str(ckpt)
    return model.to(device).eval(), tokenizer, cfg, meta
