"""What a model is, as plain data: architecture configs, the preprocessing its image tower expects, the shipped
architectures and their names. Read from and written to JSON (a saved model's config.json, configs/models/).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

OPENAI_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
INTERPOLATIONS = ("bicubic", "bilinear")
RESIZE_MODES = ("shortest", "squash")


@dataclass
class VisionConfig:
    """Image tower. `layers` as an int builds a ViT; as four ints, a ModifiedResNet."""

    image_size: int = 224
    layers: int | list[int] = 12
    width: int = 768
    head_width: int = 64
    patch_size: int = 32
    mlp_ratio: float = 4.0

    @property
    def is_resnet(self) -> bool:
        return isinstance(self.layers, (list, tuple))

    @property
    def heads(self) -> int:
        # OpenAI: ViT heads = width / 64; ResNet attention-pool heads = width * 32 / 64.
        return (self.width * 32 if self.is_resnet else self.width) // self.head_width


@dataclass
class TextConfig:
    """Causal text Transformer pooled at the end-of-text token."""

    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0


@dataclass
class CLIPConfig:
    embed_dim: int = 512
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    quick_gelu: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CLIPConfig:
        """Build from a dict; also accepts open_clip's `vision_cfg`/`text_cfg` keys."""
        data = dict(data)
        vision = data.pop("vision", None) or data.pop("vision_cfg", None) or {}
        text = data.pop("text", None) or data.pop("text_cfg", None) or {}
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown model config keys {sorted(unknown)}")
        return cls(vision=_pick(VisionConfig, vision), text=_pick(TextConfig, text), **data)


def _pick(kind: type, data: dict[str, Any]) -> Any:
    """Dataclass from a dict, ignoring keys open_clip has and we do not (e.g. `heads` for vision)."""
    names = {f.name for f in fields(kind)}
    values = {k: v for k, v in data.items() if k in names}
    if isinstance(values.get("layers"), tuple):
        values["layers"] = list(values["layers"])
    return kind(**values)


@dataclass
class PreprocessConfig:
    """How images become model input; saved in a model folder's config.json under "preprocess"."""

    image_size: int = 224
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    interpolation: str = "bicubic"  # "bicubic" | "bilinear"
    resize_mode: str = "shortest"  # "shortest" (resize shortest side, centre crop) | "squash"

    def __post_init__(self) -> None:
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size < 1:
            raise ValueError(f"PreprocessConfig.image_size must be a positive int, got {self.image_size!r}")
        self.mean = _three_floats("mean", self.mean)
        self.std = _three_floats("std", self.std)
        if min(self.std) <= 0:
            raise ValueError(f"PreprocessConfig.std must be positive, got {self.std}")
        # isinstance first: an unhashable value (a list from a bad JSON file) must give this error, not TypeError.
        if not isinstance(self.interpolation, str) or self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"PreprocessConfig.interpolation must be one of {sorted(INTERPOLATIONS)}, "
                             f"got {self.interpolation!r}")
        if not isinstance(self.resize_mode, str) or self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"PreprocessConfig.resize_mode must be one of {list(RESIZE_MODES)}, "
                             f"got {self.resize_mode!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessConfig:
        """Inverse of ``to_dict``; unknown keys are an error (a typo must not silently change preprocessing)."""
        if not isinstance(d, dict):
            raise ValueError(f"preprocess config must be a dict (JSON object), got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown preprocess config key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**d)


def _three_floats(name: str, value: Any) -> tuple[float, float, float]:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"PreprocessConfig.{name} must be 3 numbers, got {value!r}") from None
    if len(out) != 3 or not all(math.isfinite(v) for v in out):
        raise ValueError(f"PreprocessConfig.{name} must be 3 finite numbers, got {value!r}")
    return out  # type: ignore[return-value]


# ------------------------------------------------------------------------------------ shipped architectures

_ACTIVATION_SUFFIXES = (("-quickgelu", True), ("-gelu", False))
_RESOLUTION = re.compile(r"@(\d+)(?:px)?")


def _config_dir() -> Path:
    return Path(str(resources.files("clipforge") / "configs" / "models"))


def canonical_name(name: str) -> str:
    """`ViT-B/32` -> `ViT-B-32`; `ViT-L/14@336px` and `ViT-L/14@336` -> `ViT-L-14-336`. An activation suffix
    (`-quickgelu`, `-gelu`) is kept; see `split_activation`."""
    return _RESOLUTION.sub(r"-\1", name.strip().replace("/", "-"))


def split_activation(name: str) -> tuple[str, bool | None]:
    """(canonical name without its activation suffix, the activation it asks for): `ViT-B/32-quickgelu` ->
    (`ViT-B-32`, True), `RN50-gelu` -> (`RN50`, False), `ViT-B-32` -> (`ViT-B-32`, None). Suffixes in any case."""
    base = canonical_name(name)
    for suffix, quick_gelu in _ACTIVATION_SUFFIXES:
        if base.lower().endswith(suffix):
            return base[: -len(suffix)], quick_gelu
    return base, None


def list_models() -> list[str]:
    """Names of the shipped architectures."""
    return sorted(p.stem for p in _config_dir().glob("*.json"))


def get_model_config(name: str) -> CLIPConfig:
    """The shipped config for `name`; a `-quickgelu` suffix forces QuickGELU on, `-gelu` forces it off."""
    base, quick_gelu = split_activation(name)
    path = _config_dir() / f"{base}.json"
    if not path.is_file():
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(list_models())}")
    cfg = CLIPConfig.from_dict(json.loads(path.read_text()))
    if quick_gelu is not None:
        cfg.quick_gelu = quick_gelu
    return cfg
