"""`load`: any checkpoint or registered name -> (model in eval mode, preprocess, tokenizer)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..model import CLIP, CLIPConfig, PreprocessConfig, canonical_precision, get_model_config, list_models
from ..model.config import split_activation
from ..tokenizer import Tokenizer
from ..transforms import image_transform
from . import hf
from .folder import save_folder, save_torch, write_weights_folder
from .formats import CheckpointError, RawCheckpoint, read_checkpoint
from .infer import infer_config
from .pretrained import download_pretrained, get_pretrained, hf_hub_hints, list_pretrained, resolve_hf_hub


def load(
    source: str | Path,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    pretrained: str | None = None,
    arch: str | None = None,
    quick_gelu: bool | None = None,
    fast_preprocess: bool = False,
):
    """Load a CLIP model with its preprocessing and tokenizer.

    `source` is a path (a clipforge folder, an HF transformers CLIP folder, an OpenAI `.pt` state dict or
    TorchScript archive, an OpenCLIP `.pt`/`.bin`/`.safetensors`), an architecture name with `pretrained=TAG`
    (see `list_pretrained()`), or `hf-hub:ORG/NAME`. The architecture is read from the checkpoint's config or
    inferred from its weights; `arch` names it explicitly and `quick_gelu` sets the activation where the
    weights cannot tell (OpenCLIP files). `precision` is `fp32`, `bf16` or `fp16`: inputs and returned
    embeddings stay fp32 whatever it is. Returns `(model, preprocess, tokenizer)` with the model in eval mode.
    """
    precision = canonical_precision(precision)  # checked before any file is read
    path, hints = _resolve_source(source, pretrained)
    raw = read_checkpoint(path)
    cfg, preprocess_cfg, tokenizer_cfg = checkpoint_configs(
        raw, arch or hints.get("arch"), _first(quick_gelu, hints.get("quick_gelu"), raw.quick_gelu))
    if hints.get("preprocess"):
        preprocess_cfg = PreprocessConfig.from_dict(hints["preprocess"])
    model = build_from_state_dict(raw.state_dict, cfg, str(raw.path))
    model.preprocess_config = preprocess_cfg
    # What the folder says about its history first; where it was loaded from now wins over an older "source".
    model.provenance = {**(raw.config or {}).get("provenance", {}), "source": str(source), "format": raw.kind,
                        **({"pretrained": pretrained} if pretrained else {})}
    model.set_precision(precision).to(device).eval()
    tokenizer = Tokenizer.from_config(tokenizer_cfg or model.tokenizer_config())
    return model, image_transform(preprocess_cfg, fast=fast_preprocess), tokenizer


def build_from_state_dict(state_dict: dict[str, torch.Tensor], cfg: CLIPConfig, source: str) -> CLIP:
    """A CLIP with these weights (fp32), or a CheckpointError naming the mismatch."""
    with torch.device("meta"):  # no random init of weights that are about to be replaced (0.7 s -> ms)
        model = CLIP(cfg)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{source}: weights do not fit the {_describe(cfg)} architecture: "
                              f"missing {missing[:4]}{'...' if len(missing) > 4 else ''}, "
                              f"unexpected {unexpected[:4]}{'...' if len(unexpected) > 4 else ''}")
    for key, tensor in state_dict.items():
        if tensor.shape != expected[key].shape:
            raise CheckpointError(f"{source}: '{key}' has shape {tuple(tensor.shape)}, the {_describe(cfg)} "
                                  f"architecture expects {tuple(expected[key].shape)}")
    # assign=True adopts the tensors (contiguous fp32 copies, so the caller's dict is never aliased).
    model.load_state_dict({k: (v.float() if v.is_floating_point() else v).clone().contiguous()
                           for k, v in state_dict.items()}, assign=True)
    return model.eval()


def save_model(model: CLIP, directory: str | Path, provenance: dict[str, Any] | None = None,
               preprocess_cfg: PreprocessConfig | None = None) -> Path:
    """Save `model` (fp32 weights) in clipforge's folder format, with its preprocessing and tokenizer config.

    Preprocessing: `preprocess_cfg`, else the model's own (`model.preprocess_config`). `provenance` is merged into
    the model's."""
    preprocess = preprocess_cfg or model.preprocess_config
    state = {k: v.float() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    merged = {**model.provenance, **(provenance or {})}
    return save_folder(directory, state, model.config.to_dict(), preprocess.to_dict(), model.tokenizer_config(),
                       merged)


def convert(source: str | Path, destination: str | Path, to: str = "clipforge", arch: str | None = None,
            quick_gelu: bool | None = None) -> Path:
    """Rewrite a checkpoint in another layout, keeping every tensor bit-exact (dtypes included).

    `to` is `clipforge` (folder), `hf` (an HF transformers CLIP folder; ViT image towers only) or `openai`
    (a `.pt` state dict in OpenAI's names, readable with `torch.load(weights_only=True)`)."""
    raw = read_checkpoint(source)
    cfg, preprocess_cfg, tokenizer_cfg = checkpoint_configs(raw, arch, _first(quick_gelu, raw.quick_gelu))
    model = build_from_state_dict(raw.state_dict, cfg, str(raw.path))  # validates names and shapes
    destination = Path(destination)
    if to == "clipforge":
        provenance = {"converted_from": str(source), "source_format": raw.kind}
        return save_folder(destination, raw.state_dict, cfg.to_dict(), preprocess_cfg.to_dict(),
                           tokenizer_cfg or model.tokenizer_config(), provenance)
    if to == "hf":
        return write_weights_folder(destination, hf.openai_state_dict_to_hf(raw.state_dict, cfg),
                                    hf.clip_config_to_hf_config(cfg))
    if to == "openai":
        return save_torch(dict(raw.state_dict), destination)
    raise ValueError(f"unknown target format {to!r}; choose clipforge, hf or openai")


def checkpoint_configs(raw: RawCheckpoint, arch: str | None = None,
                       quick_gelu: bool | None = None) -> tuple[CLIPConfig, PreprocessConfig, dict[str, Any] | None]:
    """(model config, preprocess config, tokenizer config or None) for a checkpoint: what its own config says,
    else the architecture `arch` names, else the one its weights' shapes give (`quick_gelu` where the weights
    cannot tell the activation)."""
    if raw.config is not None:  # a clipforge folder says everything itself
        cfg = CLIPConfig.from_dict(raw.config["model"])
        return cfg, PreprocessConfig.from_dict(raw.config["preprocess"]), raw.config.get("tokenizer")
    if arch is not None:
        cfg = get_model_config(arch)
        if quick_gelu is not None:
            cfg.quick_gelu = quick_gelu
    elif "clip_config" in raw.extras:
        cfg = raw.extras["clip_config"]
    else:
        cfg = infer_config(raw.state_dict, quick_gelu=True if quick_gelu is None else quick_gelu, source=str(raw.path))
    return cfg, PreprocessConfig(image_size=cfg.vision.image_size), None


def _resolve_source(source: str | Path, pretrained: str | None) -> tuple[Path, dict[str, Any]]:
    """A local path for `source`, and what a registry entry says about it (arch, activation, preprocessing)."""
    if pretrained is not None:
        entry = get_pretrained(str(source), pretrained)
        return Path(download_pretrained(entry)), {"arch": entry.arch, "quick_gelu": entry.quick_gelu,
                                                  "preprocess": entry.preprocess}
    text = str(source)
    if text.startswith("hf-hub:"):
        path = Path(resolve_hf_hub(text))
        return path, hf_hub_hints(path)
    path = Path(text).expanduser()
    if path.exists():
        return path, {}
    base, _ = split_activation(text)
    if base in list_models():
        tags = [tag for name, tag in list_pretrained() if split_activation(name)[0] == base]
        hint = f"pass pretrained= one of {tags}" if tags else "no pretrained weights are registered for it"
        raise CheckpointError(f"{text!r} is an architecture, not weights: {hint}, or use "
                              f"clipforge.create_model({text!r}) for a randomly initialised model")
    raise CheckpointError(f"{text}: no such file or folder, and not a registered model name")


def _first(*values):
    return next((v for v in values if v is not None), None)


def _describe(cfg: CLIPConfig) -> str:
    v = cfg.vision
    tower = f"ResNet{v.layers}x{v.width}" if v.is_resnet else f"ViT w{v.width} L{v.layers} p{v.patch_size}"
    return f"{tower} @{v.image_size}px / text w{cfg.text.width} L{cfg.text.layers} ctx{cfg.text.context_length}"


__all__ = ["build_from_state_dict", "checkpoint_configs", "convert", "load", "save_model"]
