"""Training run configuration: YAML files mapped onto dataclasses, with dotted-key overrides.

A run file has up to five sections, each a dataclass below; keys left out keep their defaults::

    model: {arch: ViT-Nano-8, vision_layers: 6}
    data:  {train: train.csv, val: dev.csv, workers: 2}
    optim: {epochs: 10, batch_size: 128, lr: 1.0e-3}
    loss:  {kind: clip}
    run:   {output: runs/flickr, precision: auto}

`load_config(path, overrides)` reads one, applies `["optim.lr=1e-3", ...]` overrides (values parsed as YAML)
and checks every key and type, naming the bad key. `save_config` writes the resolved config back.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..util import atomic_write_text, one_line

__all__ = ["DataConfig", "LossConfig", "ModelConfig", "OptimConfig", "RunConfig", "TrainConfig", "apply_overrides",
           "config_from_dict", "load_config", "save_config"]


@dataclass
class ModelConfig:
    """The model: a named architecture with optional overrides, or a checkpoint to fine-tune."""

    arch: str = "ViT-Nano-8"
    init: str | None = None  # fine-tune from anything clipforge.load reads; NAME:TAG for registered weights
    embed_dim: int | None = None
    image_size: int | None = None
    vision_width: int | None = None
    vision_layers: int | list[int] | None = None
    patch_size: int | None = None
    text_width: int | None = None
    text_layers: int | None = None
    text_heads: int | None = None
    context_length: int | None = None
    quick_gelu: bool | None = None
    grad_checkpointing: bool = False
    lock_image: bool = False  # LiT: a frozen image tower
    lock_image_unlocked_groups: int = 0  # ... except its last N groups (blocks; the head counts as one)
    lock_image_freeze_bn_stats: bool = True
    lock_text: bool = False
    lock_text_unlocked_layers: int = 0


@dataclass
class DataConfig:
    """Where the pairs come from and how they become batches."""

    train: str | None = None  # caption table, image folder, or WebDataset shards ("shards-{000..009}.tar")
    val: str | None = None  # caption table (or image folder) for the retrieval validation pass
    kind: str = "auto"  # auto | table | folder | wds
    image_col: str = "image_path"
    caption_col: str = "caption"
    templates: list[str] = field(default_factory=lambda: ["a photo of a {}."])  # image folders: class -> caption
    sample_captions: bool = False  # tables: one item per image, a random caption of it each time
    captions_per_image: int = 1  # with sample_captions: k captions per image per step, loss averaged over them
    word_dropout: float = 0.0  # leave each word of a training caption out with this probability (e.g. 0.1)
    augment: bool = True  # random resized crop for training (scale 0.9-1.0), else the eval transform
    crop_scale: list[float] = field(default_factory=lambda: [0.9, 1.0])  # augment: share of the area kept
    hflip: bool = False  # augment: flip images left-right half the time (fine unless captions say left/right)
    color_jitter: float = 0.0  # augment: scale brightness, contrast and saturation by up to this fraction (not hue)
    workers: int = 2
    train_num_samples: int | None = None  # WebDataset: samples per epoch (required for shards)
    shuffle_buffer: int = 1000  # WebDataset sample shuffle buffer
    resampled: bool = False  # WebDataset: draw shards with replacement (each epoch a fresh random stream)
    max_bad_fraction: float = 0.05  # stop with an error when more than this fraction of items fails
    val_batch_size: int = 256
    val_max_images: int | None = None


@dataclass
class OptimConfig:
    """AdamW with per-step linear warmup then cosine decay."""

    epochs: int = 10
    batch_size: int = 64  # per device, per micro-batch
    accum_freq: int = 1  # micro-batches per step; negatives span all of them (features are cached)
    lr: float = 5e-4
    warmup: int = 100  # steps
    wd: float = 0.2
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    grad_clip: float | None = 1.0
    max_steps: int | None = None  # stop (and end the schedule) after this many steps
    max_minutes: float | None = None  # stop after this much wall time; the cosine schedule follows the clock
    min_lr_ratio: float = 0.0
    ema_decay: float | None = None  # keep an exponential moving average of the weights (e.g. 0.995); validation
    # and the final model use it


@dataclass
class LossConfig:
    kind: str = "clip"  # clip (InfoNCE) | siglip
    local_loss: bool = False
    gather_with_grad: bool = True
    label_smoothing: float = 0.0  # clip: soften the one-hot targets (a regulariser for small data sets)
    caption_contrast: float = 0.0  # with captions_per_image >= 2: weight of the same loss between each image's captions
    init_logit_scale: float | None = None  # start the learnt exp(logit_scale) here (CLIP: 1/0.07 = 14.3); None keeps
    # the model's (or the --init checkpoint's)


@dataclass
class RunConfig:
    """Where the run writes and how Lightning runs it."""

    output: str = "runs/clip"
    precision: str = "auto"  # auto | 32-true | bf16-mixed | 16-mixed
    accelerator: str = "auto"
    devices: int | str = 1
    num_nodes: int = 1
    strategy: str = "auto"  # auto | ddp | fsdp | ...
    seed: int = 0
    threads: int | str | None = None  # torch CPU threads; None: torch's default; "auto": 1 on a busy machine
    checkpoint_every_steps: int = 500
    keep_epoch_checkpoints: int = 1
    log_every_steps: int = 10
    val_every_epochs: int = 1
    progress: bool = True
    tensorboard: bool = True  # also log to TensorBoard when it is installed


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTIONS = {f.name: f.type for f in dataclasses.fields(TrainConfig)}


def config_from_dict(data: dict[str, Any] | None, source: str = "config") -> TrainConfig:
    """A TrainConfig from nested dicts; an unknown section or key, or a wrong type, is a ValueError naming it."""
    data = data or {}
    if not isinstance(data, dict):
        raise ValueError(f"{source}: a run config must be a mapping of sections, got {type(data).__name__}")
    unknown = sorted(set(data) - set(_SECTIONS))
    if unknown:
        raise ValueError(f"{source}: unknown section(s) {unknown}; known: {sorted(_SECTIONS)}")
    sections = {}
    hints = typing.get_type_hints(TrainConfig)
    for name, cls in hints.items():
        values = data.get(name) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{source}: section '{name}' must be a mapping, got {values!r}")
        sections[name] = _section(cls, values, f"{source}: {name}")
    return TrainConfig(**sections)


def _section(cls: type, values: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(hints)}")
    return cls(**{key: _coerce(value, hints[key], f"{where}.{key}") for key, value in values.items()})


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """`value` checked against a type hint (int, float, str, bool, list[...], unions with None)."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
        else (hint,)
    for option in options:
        ok, converted = _try(value, option)
        if ok:
            return converted
    names = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise ValueError(f"{where} must be {names}, got {value!r}")


def _try(value: Any, option: Any) -> tuple[bool, Any]:
    if option is type(None):
        return value is None, None
    if typing.get_origin(option) is list:
        (item,) = typing.get_args(option)
        if not isinstance(value, list):
            return False, None
        converted = [_try(v, item) for v in value]
        return all(ok for ok, _ in converted), [v for _, v in converted]
    if option is bool:
        return isinstance(value, bool), value
    if option is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if option is float:
        return isinstance(value, int | float) and not isinstance(value, bool), float(value) \
            if isinstance(value, int | float) else None
    if option is str:
        return isinstance(value, str), value
    return False, None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings (value parsed as YAML: `1e-3`, `true`, `[1, 2]`, `null`) to nested dicts."""
    data = {k: dict(v or {}) for k, v in (data or {}).items()}
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) != 2 or not all(parts):
            raise ValueError(f"override {item!r} must look like section.key=value (e.g. optim.lr=1e-3)")
        section, name = parts
        data.setdefault(section, {})[name] = _parse_value(raw)
    return data


def _parse_value(raw: str) -> Any:
    return _fix_numbers(yaml.safe_load(raw)) if raw.strip() else None


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: config file not found") from None
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({one_line(err, whole=True)})") from None
    return _fix_numbers(data or {})


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def _fix_numbers(data: Any) -> Any:
    """YAML 1.1 reads `1e-3` (no dot) as a string; users mean a number."""
    if isinstance(data, dict):
        return {k: _fix_numbers(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_fix_numbers(v) for v in data]
    if isinstance(data, str) and _NUMBER.fullmatch(data.strip()):
        return float(data)
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """The config in `path` (or the defaults) with `overrides` applied."""
    data = read_config_file(path) if path is not None else {}
    return config_from_dict(apply_overrides(data, overrides or []), str(path or "config"))


def save_config(cfg: TrainConfig, path: str | Path) -> Path:
    """Write the resolved config as YAML (atomically: temp file + rename)."""
    return atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
