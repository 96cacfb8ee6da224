"""Architecture configs as dataclasses, read from and written to plain JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any


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


def _config_dir() -> Path:
    return Path(str(resources.files("clipforge") / "configs" / "models"))


def canonical_name(name: str) -> str:
    """`ViT-B/32` -> `ViT-B-32`; `ViT-L/14@336px` -> `ViT-L-14-336`."""
    return name.replace("@336px", "-336").replace("/", "-")


def list_models() -> list[str]:
    """Names of the shipped architectures."""
    return sorted(p.stem for p in _config_dir().glob("*.json"))


def get_model_config(name: str) -> CLIPConfig:
    """The shipped config for `name`; a `-quickgelu` suffix forces QuickGELU on, `-gelu` forces it off."""
    base, quick_gelu = canonical_name(name), None
    for suffix, flag in (("-quickgelu", True), ("-gelu", False)):
        if base.endswith(suffix):
            base, quick_gelu = base[: -len(suffix)], flag
    path = _config_dir() / f"{base}.json"
    if not path.is_file():
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(list_models())}")
    cfg = CLIPConfig.from_dict(json.loads(path.read_text()))
    if quick_gelu is not None:
        cfg.quick_gelu = quick_gelu
    return cfg
