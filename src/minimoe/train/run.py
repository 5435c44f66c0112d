"""From a config to a finished run: resolve the config, prepare (or reuse) the tokenized data,
train, and sample from the result. Shared by `minimoe train` and the Python API."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

from minimoe.config_yaml import build_run_config, load_yaml, parse_overrides
from minimoe.data.corpus import checked_path
from minimoe.dist.init import barrier, init_distributed, main_first, shutdown
from minimoe.errors import MinimoeError
from minimoe.presets import NOTES, SEED_PRESETS, TOKENIZER_FALLBACKS, TRAIN_DEFAULTS
from minimoe.train.checkpoint import refuse_quantized_resume
from minimoe.train.metrics import check_loggers
from minimoe.train.trainer import Trainer, TrainResult

log = logging.getLogger(__name__)
SAMPLE_RESERVE_S = 10.0  # most a time budget keeps back for the end-of-run sample


def data_cache_dir(cfg_data, val_source: str | None) -> Path:
    """Where prepared shards for this source + tokenizer live; the same inputs map to the same folder,
    so a second run reuses them (prepare() itself checks the content hash)."""
    root = Path(cfg_data.cache_dir or os.environ.get("MINIMOE_CACHE") or Path.home() / ".cache" / "minimoe")
    src = (
        str(Path(cfg_data.path).resolve())
        if cfg_data.path and not cfg_data.path.startswith("hf:")
        else cfg_data.path
    )
    val = str(Path(val_source).resolve()) if val_source else None
    key = json.dumps(
        [src, val, cfg_data.tokenizer, cfg_data.text_field, cfg_data.glob, cfg_data.val_fraction],
        sort_keys=True,
    )
    name = Path(src).name if src else "builtin"
    return root / "prepared" / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _explicit(key: str, config_path: str | None, overrides: list[str]) -> bool:
    if any(k == key for k, _ in parse_overrides(overrides)):
        return True
    if config_path:
        section, name = key.split(".")
        return name in (load_yaml(config_path).get(section) or {})
    return False


def _seed_preset(preset: str | None, config_path: str | None, overrides: list[str], cfg) -> str | None:
    """The seed preset this run trains, if any: log where it departs from its seed document and, unless
    the user chose the tokenizer, swap in the preset's stated fallback when the seed's own tokenizer is
    not on this machine."""
    from minimoe.data.pretrained import find_named_tokenizer, is_named, minimoe_tokenizer_dir

    if config_path is not None:  # a `preset:` key in the YAML file wins over --preset
        preset = load_yaml(config_path).get("preset", preset)
    if preset not in SEED_PRESETS:
        return None
    for note in NOTES.get(preset, []):
        log.info("preset %s: %s", preset, note)
    spec, fallback = cfg.data.tokenizer, TOKENIZER_FALLBACKS.get(preset)
    chosen = _explicit("data.tokenizer", config_path, overrides)
    if fallback and not chosen and is_named(spec) and find_named_tokenizer(spec) is None:
        log.warning(
            "tokenizer %r (the %s seed's) was not found, so a %s tokenizer is trained on the data instead; "
            "for the seed's own, put its tokenizer.json in %s/ or pass --tokenizer PATH",
            spec, preset, fallback, minimoe_tokenizer_dir(spec),
        )  # fmt: skip
        cfg.data.tokenizer = fallback
    return preset


def _keeps_vocab(seed: str | None, cfg, tokenizer) -> bool:
    """A seed preset keeps its vocabulary (the model `minimoe params` reports) when it trains with its
    own tokenizer: the recipe's, its stated fallback, or one that fills the vocabulary up to padding
    (the seed's tokenizer given as a path)."""
    if seed is None:
        return False
    if cfg.data.tokenizer in (TRAIN_DEFAULTS[seed]["data.tokenizer"], TOKENIZER_FALLBACKS.get(seed)):
        return True
    return cfg.model.vocab_size - 64 < tokenizer.vocab_size <= cfg.model.vocab_size


def _check_resume_keeps(run_dir: Path, cfg) -> None:
    """A resume trains on with the tokenizer saved in RUN_DIR/tokenizer and the data order and random
    streams its checkpoint holds, whatever data.tokenizer or train.seed say: an override of either would
    be ignored, and config.yaml would then name a tokenizer or seed the run never used."""
    saved = build_run_config(config_path=str(run_dir / "config.yaml"))
    if cfg.data.tokenizer != saved.data.tokenizer:
        raise MinimoeError(
            f"{run_dir} was trained with data.tokenizer={saved.data.tokenizer}, not {cfg.data.tokenizer}; a "
            "resume keeps the run's tokenizer (drop --tokenizer/data.tokenizer, or start a new run for another one)"
        )
    if cfg.train.seed != saved.train.seed:
        raise MinimoeError(
            f"{run_dir} was trained with train.seed={saved.train.seed}, not {cfg.train.seed}; a resume continues "
            "the run's data order and random streams (drop train.seed, or start a new run for another seed)"
        )


def _init_source(init_from: str, overrides: list[str]):
    """A new run's starting point from the latest checkpoint of `init_from` (a run of train, upcycle,
    import, sft or a merged lora): its config with the overrides on top, its tokenizer, and its weights
    in a model built from that config (model.* overrides may change only what holds no weight).
    Returns (cfg, tokenizer, model, run_info)."""
    import torch

    from minimoe.model.transformer import Transformer
    from minimoe.train.checkpoint import find_checkpoint, load_run, read_config

    ckpt = find_checkpoint(checked_path(init_from, "--init"), "latest")
    refuse_quantized_resume(ckpt)
    keys = [k for k, _ in parse_overrides(overrides)]
    for key in keys:
        if key in ("data.tokenizer", "model.vocab_size"):
            raise MinimoeError(
                f"--init trains on with the tokenizer of {init_from} (its weights' rows are that tokenizer's "
                f"ids); drop {key}"
            )
    # the checkpoint's own settings (its data path, its training recipe), then the overrides
    cfg = build_run_config(config_path=str(ckpt / "config.yaml"), overrides=overrides)
    cfg.data.tokenizer = str((ckpt / "tokenizer").resolve())
    # the shapes of both models on the meta device, before load_run allocates the new one (its memory check
    # would otherwise refuse an override that changes a shape for the wrong reason); this refusal names it
    with torch.device("meta"):
        wanted, saved = (Transformer(c).state_dict() for c in (cfg.model, read_config(ckpt).model))
    if {k: v.shape for k, v in wanted.items()} != {k: v.shape for k, v in saved.items()}:
        changed = [k for k in keys if k.startswith("model.")]
        raise MinimoeError(
            f"the model of {init_from} does not fit the one {', '.join(changed) or 'the config'} asks for (its "
            "weights' shapes differ); --init keeps the run's architecture"
        )
    model, tokenizer, _, meta = load_run(ckpt, device="cpu", model_cfg=cfg.model)
    return cfg, tokenizer, model.train(), {"init_from": str(ckpt.resolve()), "init_step": meta.get("step")}


def train_from_config(
    preset: str | None = None,
    config_path: str | None = None,
    overrides: list[str] | None = None,
    run_dir: str | Path = "runs/tiny",
    resume: bool = False,
    val_source: str | None = None,
    progress: bool = True,
    sample: bool = True,
    clock_start: float | None = None,
    memory_check: bool = True,
    init_from: str | None = None,
) -> TrainResult:
    """Train a model and return its TrainResult (with a generated sample when `sample`).

    Unless model.vocab_size is set explicitly, it is fitted to the tokenizer (rounded up to 64).
    train.max_minutes counts from `clock_start` (a time.perf_counter() value; default: this call), and
    covers data preparation, the final evaluation and checkpoint and the sample. `init_from` starts a
    new run from another run's latest weights, config and tokenizer (fresh optimizer, schedule and data
    position; the overrides on top): pre-training an upcycled or imported model further.
    """
    from minimoe.data import Tokenizer, prepare

    if clock_start is None:
        clock_start = time.perf_counter()
    overrides = list(overrides or [])
    run_dir = Path(run_dir)
    init_model, run_info = None, None
    if resume and init_from is not None:
        raise MinimoeError(
            "--resume continues a run and --init starts a new one from a run's weights; give one"
        )
    if resume:
        if not (run_dir / "config.yaml").exists():
            raise MinimoeError(f"{run_dir} is not a run directory (no config.yaml); nothing to resume")
        refuse_quantized_resume(run_dir)
        # a checkpoint holds a config.yaml too, but resuming "it" would write a run inside the checkpoint
        if (run_dir / "meta.json").is_file():
            holder = f" (--resume {run_dir.parent.parent})" if run_dir.parent.name == "checkpoints" else ""
            raise MinimoeError(
                f"{run_dir} is a checkpoint, not a run directory; resume the run that holds it{holder}, "
                "which continues from its latest checkpoint"
            )
        cfg = build_run_config(config_path=str(run_dir / "config.yaml"), overrides=overrides)
        _check_resume_keeps(run_dir, cfg)
        tokenizer, seed = Tokenizer.load(run_dir / "tokenizer"), None
    else:
        # only a complete checkpoint holds a run: what a crash in the first save left (.tmp-* directories)
        # cannot be resumed, and the first save removes it
        if any((d / "meta.json").is_file() for d in (run_dir / "checkpoints").glob("step_*")):
            raise MinimoeError(
                f"{run_dir} already holds a run; continue it with --resume {run_dir} or choose another --out"
            )
        if init_from is not None:
            if preset is not None or config_path is not None:
                raise MinimoeError(
                    "--init takes its model and config from the run it starts from; drop --preset/--config"
                )
            cfg, tokenizer, init_model, run_info = _init_source(init_from, overrides)
            seed = None
        else:
            if preset is None and config_path is None:
                preset = "tiny"
            cfg = build_run_config(preset, config_path, overrides)
            seed = _seed_preset(preset, config_path, overrides, cfg)
            tokenizer = cfg.data.tokenizer
    check_loggers(cfg.train)  # a missing tensorboard / wandb is named before data preparation
    if val_source is not None:  # kept in config.yaml, so a resumed run validates on the same data
        cfg.data.val_path = val_source
    # config.yaml keeps absolute paths: --resume works from any working directory
    for key in ("path", "val_path"):
        spec = getattr(cfg.data, key)
        if spec is not None and not spec.startswith("hf:"):
            setattr(
                cfg.data, key, str(checked_path(spec, "--val-data" if key == "val_path" else "data path"))
            )
    val_source = cfg.data.val_path
    # Under torchrun: join the process group; rank 0 tokenizes first, the others then reuse its shards.
    ctx = init_distributed(cfg.train.device)
    if not resume and cfg.train.precision == "fp16" and ctx.device.type != "cuda":
        if not _explicit("train.precision", config_path, overrides):  # a preset's recipe asked for it
            log.warning("train.precision=fp16 needs a CUDA GPU; training in bf16 autocast on %s", ctx.device)
            cfg.train.precision = "bf16"
    try:
        data = main_first(
            lambda: prepare(
                cfg.data.path,
                tokenizer,
                data_cache_dir(cfg.data, val_source),
                val_fraction=cfg.data.val_fraction,
                workers=cfg.data.workers,
                val_source=val_source,
                text_field=cfg.data.text_field,
                glob=cfg.data.glob,
                progress=progress and ctx.is_main,
            ),
            ctx,
        )
        if not resume and init_from is None:
            tokenizer = data.tokenizer()
            if not _explicit("model.vocab_size", config_path, overrides) and not _keeps_vocab(
                seed, cfg, tokenizer
            ):
                cfg.model.vocab_size = -(-tokenizer.vocab_size // 64) * 64
            cfg.validate()
        sampling = sample and cfg.train.sample_tokens > 0
        # a share of a time budget for the sample, which is cut short when the budget runs out
        reserve = min(SAMPLE_RESERVE_S, 0.03 * cfg.train.max_minutes * 60) if cfg.train.max_minutes else 0
        if init_model is not None:
            init_model.gradient_checkpointing = cfg.train.activation_checkpointing
        trainer = Trainer(
            cfg, run_dir, data, tokenizer, resume=resume, progress=progress, ctx=ctx,
            clock_start=clock_start, reserve_s=reserve if sampling else 0.0, memory_check=memory_check,
            model=init_model, run_info=run_info,
        )  # fmt: skip
        result = trainer.fit()
        barrier(ctx)
    finally:
        shutdown(ctx)
    if sampling and result.is_main:
        from minimoe.infer.generate import stream_text

        model = trainer.model
        if ctx.distributed:  # this rank holds a part of the model: sample from the full checkpoint
            from minimoe.train.checkpoint import load_run

            model = load_run(result.checkpoint, device=ctx.device)[0] if result.checkpoint else None
        if model is not None:
            deadline = trainer.deadline  # the end of train.max_minutes, if set
            pieces = []
            for piece in stream_text(
                model.eval(), tokenizer, cfg.train.sample_prompt,
                max_new_tokens=cfg.train.sample_tokens, temperature=0.8, top_k=50, seed=cfg.train.seed,
            ):  # fmt: skip
                pieces.append(piece)
                if deadline is not None and time.perf_counter() >= deadline and pieces:
                    break
            result.sample = "".join(pieces)
    return result
