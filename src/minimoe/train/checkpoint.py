"""Run directories and atomic checkpoints.

RUN_DIR/
  config.yaml                 resolved RunConfig
  metrics.jsonl               one JSON object per logged step
  checkpoints/step_00000100/  model.safetensors, state.pt (optimizer, schedule, RNG, data position),
                              config.yaml, tokenizer/, meta.json (written last)
  checkpoints/latest, best    one line naming a step directory, replaced atomically

A checkpoint is written into a temporary directory, fsynced, then renamed into place; the `latest`
pointer moves only after that. A crash at any moment leaves the previous checkpoint loadable (tested
by SIGKILLing a saving process at random moments, tests/test_reliability.py), and the next save
removes what the crash left (`.tmp-*` directories, pointer temp files). A write that fails (a full
disk) removes its temporary directory and raises a MinimoeError that says the previous checkpoint is
intact.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import re
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from minimoe.errors import MinimoeError
from minimoe.files import as_umask_allows, fsync_dir, fsync_tree, read_json_object
from minimoe.provenance import code_version

if TYPE_CHECKING:
    from minimoe.config import RunConfig

CKPT = "checkpoints"
# where the MTP module reads the main model's hidden state, recorded in every checkpoint's meta.json
MTP_INPUT = "after_final_norm"
log = logging.getLogger("minimoe.train")


def atomic_write_text(path: Path, text: str) -> None:
    """Replace `path` with `text` so that a reader sees the old or the new content, never a part."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


# what a crash mid-save leaves in checkpoints/: never trusted, removed by the next save
_LEFTOVER = re.compile(r"^\.tmp-.+|^\.(latest|best)\.tmp\d+$")
# errors of a write that failed for lack of room or a broken disk, as safetensors and torch word them
_WRITE_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EACCES)


def _remove_leftovers(root: Path) -> None:
    for p in root.iterdir():
        if _LEFTOVER.match(p.name):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def _write_failure(e: BaseException) -> str | None:
    """Why a write failed (e.g. "No space left on device"); None when `e` is a bug, not a failed write."""
    if isinstance(e, OSError):
        return e.strerror or str(e)
    text = str(e)
    for code in _WRITE_ERRNOS:
        if os.strerror(code) in text:
            return os.strerror(code)
    if "write failed" in text or "os error" in text:  # torch's zip writer; Rust's io::Error
        return text.splitlines()[0]
    return None


def _failed(what: str, root: Path, reason: str) -> MinimoeError:
    prev = _read_pointer(root, "latest")
    kept = f"the previous checkpoint {prev.name} is intact" if prev else "no earlier checkpoint exists"
    return MinimoeError(f"could not write {what} in {root} ({reason}); {kept}")


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
    `weights_metadata` as the safetensors header metadata. A step directory that already exists is
    replaced. A write that fails (no space left, file too large, ...) raises MinimoeError; the
    temporary files are removed and `latest` still names the previous checkpoint.

    Returns:
        The checkpoint directory, RUN_DIR/checkpoints/step_NNNNNNNN.
    """
    from safetensors import SafetensorError

    root = Path(run_dir) / CKPT
    root.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(root)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    meta = {**meta, "mtp_input": MTP_INPUT, "code": code_version()}
    try:
        _write_dir(tmp, model, state, meta, config_text, tokenizer, weights_metadata)
    except (OSError, RuntimeError, SafetensorError) as e:
        shutil.rmtree(tmp, ignore_errors=True)  # frees the room a full disk needs
        reason = _write_failure(e)
        if reason is None:
            raise
        raise _failed(f"checkpoint {final.name}", root, reason) from None
    old = None
    if final.exists():
        # An earlier save of this step: what a run killed between this rename and moving `latest`
        # left behind. The resumed run's own step replaces it (after a crash between these two renames,
        # `latest` names no directory and find_checkpoint falls back to the newest complete one).
        old = root / f".tmp-old-{final.name}-{os.getpid()}"
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_dir(root)
    try:
        atomic_write_text(root / "latest", final.name + "\n")
        if is_best:
            atomic_write_text(root / "best", final.name + "\n")
    except OSError as e:
        raise _failed(f"the pointer to checkpoint {final.name}", root, e.strerror or str(e)) from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    _prune(root, keep_last)
    return final


def _write_dir(tmp: Path, model, state: dict, meta: dict, config_text: str, tokenizer, metadata) -> None:
    """Every file of a checkpoint into the new directory `tmp`, fsynced; meta.json last."""
    from safetensors.torch import save_file, save_model

    tmp.mkdir()
    if isinstance(model, nn.Module):
        save_model(model, str(tmp / "model.safetensors"))
    else:
        weights = {k: v.contiguous() for k, v in model.items()}
        save_file(weights, str(tmp / "model.safetensors"), metadata=metadata)
    as_umask_allows(tmp / "model.safetensors")
    torch.save(state, tmp / "state.pt")
    (tmp / "config.yaml").write_text(config_text, encoding="utf-8")
    if tokenizer is not None:
        tokenizer.save(tmp / "tokenizer")
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    fsync_tree(tmp)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The complete checkpoint `latest` names in a run directory, or None before the first save."""
    return _read_pointer(Path(run_dir) / CKPT, "latest")


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
            # renamed first: a crash mid-delete must not leave a step directory with meta.json but
            # without some of its files
            doomed = root / f".tmp-pruned-{d.name}-{os.getpid()}"
            os.rename(d, doomed)
            shutil.rmtree(doomed, ignore_errors=True)


def _hint(p: Path) -> str:
    """What to do with a folder that is not a run but something minimoe writes or reads beside runs."""
    if (p / "config.json").is_file():
        return f"; it looks like a Hugging Face folder: make it a run with `minimoe import {p} --out NEW_RUN`"
    for adapter in (p, p / "adapter"):
        if (adapter / "minimoe_base.json").is_file():  # the adapter of `minimoe lora` without --merge
            try:
                base = json.loads((adapter / "minimoe_base.json").read_text(encoding="utf-8"))["base_run"]
            except (OSError, ValueError, KeyError, TypeError):
                base = "BASE_RUN"
            return (
                f"; it holds a LoRA adapter ({adapter}): merge it into a run with "
                f"`minimoe lora {base} --adapter {adapter} --merge --out NEW_RUN`"
            )
    return ""


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
            raise MinimoeError(
                f"{p} holds no complete checkpoint (expected {CKPT}/step_*/meta.json){_hint(p)}"
            )
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
        # weights_only: a state file is data; anything that would run code on load is refused. torch
        # warns about a bare (non-zip) pickle before refusing it; the refusal below says it in one line.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise MinimoeError(
            f"checkpoint {f} holds objects other than tensors and plain values; refusing to load it"
        ) from None
    except Exception as e:  # noqa: BLE001 - any other unpickling failure means a damaged file
        raise MinimoeError(f"checkpoint {f} is corrupt or truncated ({type(e).__name__})") from None


def check_finite(model: torch.nn.Module, ckpt: Path) -> None:
    """Raise MinimoeError naming the first weight that holds NaN or inf (a diverged or damaged run),
    instead of failing later inside sampling."""
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise MinimoeError(
                f"checkpoint {ckpt}: weight {name} holds NaN or infinite values (the run diverged or the "
                "file is damaged); load an earlier checkpoint"
            )


def read_config(ckpt: Path) -> RunConfig:
    """The validated RunConfig a checkpoint directory was written with."""
    from minimoe.config import RunConfig
    from minimoe.config_yaml import dataclass_from_dict, load_yaml

    return dataclass_from_dict(RunConfig, load_yaml(ckpt / "config.yaml")).validate()


def record_val_loss(ckpt: Path, val_loss: float) -> None:
    """Write the validation loss of a checkpoint evaluated after it was saved (a stop asked for saves
    first) into its meta.json, replaced whole."""
    meta = read_meta(ckpt)
    meta["val_loss"] = val_loss
    atomic_write_text(ckpt / "meta.json", json.dumps(meta, indent=2))


def read_meta(ckpt: Path) -> dict:
    """A checkpoint's meta.json, or one sentence saying it is damaged."""
    try:
        return read_json_object(ckpt / "meta.json")
    except MinimoeError as e:
        raise MinimoeError(
            f"checkpoint {ckpt} is damaged: {e}; to resume from or load an earlier checkpoint of the run "
            "instead, write its folder name (step_...) into the run's checkpoints/latest"
        ) from None


def load_run(path: str | Path, which: str = "best", device: str | torch.device = "cpu", model_cfg=None):
    """Load a model, its tokenizer and config from a run or checkpoint directory. A checkpoint written
    by `minimoe quantize` (meta.json has `quantization`) comes back with its int8/int4 weights.
    `model_cfg` builds the model from another ModelConfig than the checkpoint's own (one whose changes
    hold no weight, as `train --init` allows); the weights must fit it.

    Returns:
        (model in eval mode, tokenizer, RunConfig, checkpoint meta dict)
    """
    from minimoe.data import Tokenizer
    from minimoe.model.transformer import Transformer

    ckpt = find_checkpoint(path, which)
    cfg = read_config(ckpt)
    from minimoe.memory import SKIP_ENV, check_fits
    from minimoe.params import count_params

    model_cfg = model_cfg or cfg.model
    rep = count_params(model_cfg)
    check_fits(4 * (rep.total + rep.mtp_total), "cpu", f"loading {ckpt} (fp32 weights)", f"set {SKIP_ENV}=1")
    model = Transformer(model_cfg)
    meta = read_meta(ckpt)
    if meta.get("quantization"):  # written by `minimoe quantize`: integer weights and scales
        from minimoe.infer.quantize import quantize_model

        quantize_model(model, **meta["quantization"])
    load_weights(model, ckpt)
    check_finite(model, ckpt)
    tok_dir = ckpt / "tokenizer"
    if not tok_dir.exists():
        raise MinimoeError(f"checkpoint {ckpt} has no tokenizer/ directory")
    tokenizer = Tokenizer.load(tok_dir)
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise MinimoeError(
            f"checkpoint {ckpt}: the tokenizer has {tokenizer.vocab_size} tokens but the model only "
            f"{model_cfg.vocab_size} embeddings (model.vocab_size)"
        )
    meta["path"] = str(ckpt)
    warn_if_old_mtp(model_cfg, meta, ckpt)
    return model.to(device).eval(), tokenizer, cfg, meta


def warn_if_old_mtp(cfg, meta: dict, path) -> None:
    """A one-line warning for a checkpoint whose MTP module was trained reading the main model's hidden
    state before its final norm (written before `mtp_input` was recorded): minimoe now feeds it the
    state after the norm (model/mtp.py), so its drafts are accepted less often until it is trained again."""
    if cfg.mtp_depth and meta.get("mtp_input") != MTP_INPUT:
        log.warning(
            "%s: its MTP module was trained on the hidden state before the final norm (an older minimoe); "
            "speculative drafts will be accepted less often until the run is trained again",
            path,
        )


def check_not_quantized(model, meta: dict, what: str = "fine-tuned") -> None:
    """MinimoeError for a run written by `minimoe quantize`: its integer weights take no gradient and
    are no nn.Linear for LoRA, and a run saved from them would not load."""
    if getattr(model, "quantization", None):
        source = meta.get("quantized_from", "the run it was quantized from")
        raise MinimoeError(
            f"{meta['path']} holds the int8/int4 weights of `minimoe quantize`, which cannot be {what}; "
            f"use {source} instead"
        )


def refuse_quantized_resume(run_dir: Path) -> None:
    """MinimoeError before any data work when the folder to resume was written by `minimoe quantize`
    (the meta.json beside its config.yaml, or its latest checkpoint's, has `quantization`): integer
    weights do not train."""
    ckpt = latest_checkpoint(run_dir) if not (Path(run_dir) / "meta.json").is_file() else Path(run_dir)
    if ckpt is None or not (ckpt / "meta.json").is_file():
        return
    meta = read_meta(ckpt)
    if meta.get("quantization"):
        source = meta.get("quantized_from", "the run it was quantized from")
        raise MinimoeError(
            f"{run_dir} holds the int8/int4 weights of `minimoe quantize`, which cannot be trained further; "
            f"resume {source} instead"
        )


def write_run(out: Path, model, tokenizer, info: dict, run_cfg: RunConfig | None = None) -> Path:
    """Write `model` as step 0 of a new run directory (Hugging Face import, upcycling, adapter merging).

    Checkpoints already in `out` are replaced (the callers ask for --force first).

    Args:
        out: the run directory.
        model: a minimoe Transformer.
        tokenizer: saved in RUN/tokenizer and in the checkpoint.
        info: extra checkpoint metadata (source, format, ...).
        run_cfg: train/data settings to record; default TrainConfig with seq_len <= max_position_embeddings.
    Returns:
        The checkpoint directory.
    """
    import yaml

    from minimoe.config import DataConfig, RunConfig, TrainConfig

    cfg = model.cfg
    if run_cfg is None:
        train = TrainConfig(seq_len=min(TrainConfig.seq_len, cfg.max_position_embeddings))
        # config.yaml names the tokenizer the run holds (RUN/tokenizer), not the byte default
        spec = "byte" if tokenizer.kind == "byte" else str((out / "tokenizer").resolve())
        run_cfg = RunConfig(model=cfg, train=train, data=DataConfig(tokenizer=spec))
    run_cfg.model = cfg
    text = yaml.safe_dump(run_cfg.validate().to_dict(), sort_keys=False)
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / CKPT, ignore_errors=True)  # save_checkpoint would keep an existing step_00000000
    (out / "config.yaml").write_text(text, encoding="utf-8")
    tokenizer.save(out / "tokenizer")
    meta = {"step": 0, "tokens": 0, "val_loss": None, **info}
    return save_checkpoint(out, 0, model, {"step": 0}, meta, text, tokenizer, is_best=True)
