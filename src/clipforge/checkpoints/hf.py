"""Translate between HF transformers' `CLIPModel` layout and our OpenAI layout.

Pure functions on config dicts and state dicts; transformers itself is never imported. Reading and
writing files (config.json, model.safetensors, shards) is the caller's business.

Layout facts used here (HF `CLIPModel`, per tower `text_model.` / `vision_model.`):
- attention: separate `q_proj`, `k_proj`, `v_proj` Linears; ours concatenates them (q, k, v order) into
  `in_proj_weight` / `in_proj_bias`. `out_proj` is the same on both sides.
- MLP `fc1` / `fc2` are our `c_fc` / `c_proj`; `layer_norm1` / `layer_norm2` are `ln_1` / `ln_2`.
- vision: `embeddings.patch_embedding` (conv, no bias) is `conv1`; `embeddings.class_embedding`;
  `embeddings.position_embedding.weight` is `positional_embedding`; `pre_layrnorm` (HF's spelling) is
  `ln_pre`; `post_layernorm` is `ln_post`.
- text: `embeddings.token_embedding`, `embeddings.position_embedding.weight`, `final_layer_norm`.
- `visual_projection` / `text_projection` are bias-free Linears whose weight is our matrix transposed.
- `*.embeddings.position_ids` are index buffers (saved by older transformers): ignored on read.

Text pooling: HF pools at the end-of-text token. Configs with `eos_token_id == 2` (OpenAI's HF uploads,
written before transformers fixed the id) pool at `argmax(input_ids)`; newer ones at the first
`input_ids == eos_token_id`. Ours pools at argmax, which is the same thing when the EOT id is the largest
id in the vocabulary (49407 in OpenAI's tokenizer). So we accept `eos_token_id` 2 or `vocab_size - 1`, and
write `eos_token_id = vocab_size - 1`, `bos_token_id = vocab_size - 2` (49407 / 49406, OpenAI's layout)
and `pad_token_id = 1` (what OpenAI's HF configs and transformers' defaults hold; the text model's forward
never reads it, and our tokenizer pads with 0 anyway).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..model import CLIP, CLIPConfig, TextConfig, VisionConfig

# transformers' defaults for keys a config.json may leave out (CLIPTextConfig / CLIPVisionConfig).
_HF_TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
    "num_attention_heads": 8, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5, "eos_token_id": 49407,
}
_HF_VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
    "num_channels": 3, "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}
_HF_PROJECTION_DIM_DEFAULT = 512
_LOGIT_SCALE_INIT = 2.6592  # ln(1 / 0.07), transformers' default
_LAYER_NORM_EPS = 1e-5  # our LayerNorm's eps
_ACTIVATIONS = {"quick_gelu": True, "gelu": False}  # HF hidden_act -> our quick_gelu flag
_IGNORED_HF_KEYS = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")
_OPTIONAL_PREFIXES = ("clip.", "model.")


# ---------------------------------------------------------------------------------------------- configs

def hf_config_to_clip_config(hf_config: dict[str, Any]) -> CLIPConfig:
    """Our `CLIPConfig` from the parsed `config.json` of an HF `CLIPModel` folder.

    Keys the file leaves out take transformers' defaults; `text_config_dict` / `vision_config_dict`
    (older files) override `text_config` / `vision_config` as they do in transformers. Raises ValueError
    for anything our model cannot represent (other model types, different activations per tower,
    non-default LayerNorm eps, non-square images, an EOS id that argmax pooling would not find)."""
    model_type = hf_config.get("model_type")
    if model_type != "clip":
        raise ValueError(f"HF config: model_type is {model_type!r}, expected 'clip' (a full CLIPModel with "
                         "text and vision towers); other architectures cannot be loaded as CLIP")
    text = _merged_tower(hf_config, "text", _HF_TEXT_DEFAULTS)
    vision = _merged_tower(hf_config, "vision", _HF_VISION_DEFAULTS)
    acts = {text["hidden_act"], vision["hidden_act"]}
    if len(acts) != 1 or not acts <= set(_ACTIVATIONS):
        raise ValueError(f"HF config: hidden_act is {text['hidden_act']!r} (text) / "
                         f"{vision['hidden_act']!r} (vision); we support the same activation in both towers, "
                         f"one of {sorted(_ACTIVATIONS)}")
    for tower, values in (("text", text), ("vision", vision)):
        if not math.isclose(float(values["layer_norm_eps"]), _LAYER_NORM_EPS, rel_tol=1e-6):
            raise ValueError(f"HF config: {tower}_config.layer_norm_eps is {values['layer_norm_eps']}, "
                             f"we support only {_LAYER_NORM_EPS}")
    if vision["num_channels"] != 3:
        raise ValueError(f"HF config: vision_config.num_channels is {vision['num_channels']}, "
                         "expected 3 (RGB)")
    _check_eos(text)
    width, heads = vision["hidden_size"], vision["num_attention_heads"]
    _check_heads("vision", width, heads)
    _check_heads("text", text["hidden_size"], text["num_attention_heads"])
    return CLIPConfig(
        embed_dim=int(hf_config.get("projection_dim", _HF_PROJECTION_DIM_DEFAULT)),
        vision=VisionConfig(
            image_size=_square("image_size", vision["image_size"]),
            layers=int(vision["num_hidden_layers"]),
            width=int(width),
            head_width=int(width) // int(heads),
            patch_size=_square("patch_size", vision["patch_size"]),
            mlp_ratio=_mlp_ratio("vision", width, vision["intermediate_size"]),
        ),
        text=TextConfig(
            context_length=int(text["max_position_embeddings"]),
            vocab_size=int(text["vocab_size"]),
            width=int(text["hidden_size"]),
            heads=int(text["num_attention_heads"]),
            layers=int(text["num_hidden_layers"]),
            mlp_ratio=_mlp_ratio("text", text["hidden_size"], text["intermediate_size"]),
        ),
        quick_gelu=_ACTIVATIONS[text["hidden_act"]],
    )


def clip_config_to_hf_config(cfg: CLIPConfig) -> dict[str, Any]:
    """A `config.json` dict that `transformers.CLIPModel.from_pretrained` accepts for `cfg`.

    Only ViT image towers exist in HF CLIP: a ModifiedResNet config raises ValueError."""
    if cfg.vision.is_resnet:
        raise ValueError(f"HF CLIP has no ModifiedResNet image tower (vision layers {cfg.vision.layers}); "
                         "only ViT models can be written in the HF layout")
    vision, text = cfg.vision, cfg.text
    if vision.width % vision.head_width:
        raise ValueError(f"vision width {vision.width} is not a multiple of head_width {vision.head_width}")
    act = "quick_gelu" if cfg.quick_gelu else "gelu"
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": cfg.embed_dim,
        "logit_scale_init_value": _LOGIT_SCALE_INIT,
        "initializer_factor": 1.0,
        "text_config": {
            "model_type": "clip_text_model",
            "vocab_size": text.vocab_size,
            "hidden_size": text.width,
            "intermediate_size": _hidden_size(text.width, text.mlp_ratio),
            "num_hidden_layers": text.layers,
            "num_attention_heads": text.heads,
            "max_position_embeddings": text.context_length,
            "hidden_act": act,
            "layer_norm_eps": _LAYER_NORM_EPS,
            "projection_dim": cfg.embed_dim,
            # See the module docstring: EOT must be the largest id for argmax pooling to agree.
            "bos_token_id": text.vocab_size - 2,
            "eos_token_id": text.vocab_size - 1,
            "pad_token_id": 1,
        },
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": vision.width,
            "intermediate_size": _hidden_size(vision.width, vision.mlp_ratio),
            "num_hidden_layers": vision.layers,
            "num_attention_heads": vision.heads,
            "num_channels": 3,
            "image_size": vision.image_size,
            "patch_size": vision.patch_size,
            "hidden_act": act,
            "layer_norm_eps": _LAYER_NORM_EPS,
            "projection_dim": cfg.embed_dim,
        },
    }


def _merged_tower(hf_config: dict[str, Any], tower: str, defaults: dict[str, Any]) -> dict[str, Any]:
    merged = dict(defaults)
    for key in (f"{tower}_config", f"{tower}_config_dict"):
        values = hf_config.get(key) or {}
        if not isinstance(values, dict):
            raise ValueError(f"HF config: {key} must be an object, got {type(values).__name__}")
        merged.update(values)
    return merged


def _check_eos(text: dict[str, Any]) -> None:
    eos, vocab = text["eos_token_id"], int(text["vocab_size"])
    if isinstance(eos, list) and len(eos) == 1:
        eos = eos[0]
    if eos not in (2, vocab - 1):
        raise ValueError(f"HF config: text_config.eos_token_id is {eos!r}; our text tower pools at the "
                         f"largest token id, which matches HF only for eos_token_id 2 (legacy) or "
                         f"{vocab - 1}")


def _check_heads(tower: str, width: int, heads: int) -> None:
    if heads <= 0 or width % heads:
        raise ValueError(f"HF config: {tower}_config.hidden_size {width} is not a multiple of "
                         f"num_attention_heads {heads}")


def _square(name: str, value: int | list[int]) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"HF config: vision_config.{name} is {value}; only square sizes are supported")
        value = value[0]
    return int(value)


def _mlp_ratio(tower: str, width: int, hidden: int) -> float:
    ratio = hidden / width
    if _hidden_size(width, ratio) != hidden:  # our MLP builds int(width * mlp_ratio) units
        raise ValueError(f"HF config: {tower}_config.intermediate_size {hidden} cannot be expressed as "
                         f"int(hidden_size {width} * mlp_ratio)")
    return ratio


def _hidden_size(width: int, mlp_ratio: float) -> int:
    return int(width * mlp_ratio)


# ----------------------------------------------------------------------------------------- state dicts

@dataclass(frozen=True)
class _Rule:
    """One of our tensors and the HF tensor(s) it is made of.

    kind: "copy" (same tensor), "transpose" (HF Linear weight = our matrix transposed),
    "qkv" (our in_proj_* = concatenation of HF's q, k, v along dim 0)."""

    ours: str
    hf: tuple[str, ...]
    kind: str = "copy"


def hf_state_dict_to_openai(sd: dict[str, torch.Tensor], cfg: CLIPConfig, *,
                            source: str = "HF state dict") -> dict[str, torch.Tensor]:
    """Our (OpenAI-layout) state dict from an HF `CLIPModel` state dict, for `CLIP(cfg)` strict loading.

    A `clip.` or `model.` prefix on every key is stripped; `*.embeddings.position_ids` buffers are
    ignored. Missing keys, unexpected keys or wrong shapes raise ValueError naming `source`. Tensors that
    need no change are shared with `sd`; dtypes are kept."""
    rules, shapes = _rules(cfg), _our_shapes(cfg)
    hf = _strip_prefix(sd)
    hf = {k: v for k, v in hf.items() if k not in _IGNORED_HF_KEYS}
    expected = {name: shape for rule in rules for name, shape in _hf_shapes(rule, shapes[rule.ours]).items()}
    _check_keys_and_shapes(hf, expected, source, "an HF CLIPModel")
    out: dict[str, torch.Tensor] = {}
    for rule in rules:
        parts = [hf[name] for name in rule.hf]
        if rule.kind == "qkv":
            out[rule.ours] = torch.cat(parts, dim=0)
        elif rule.kind == "transpose":
            out[rule.ours] = parts[0].t().contiguous()
        else:
            out[rule.ours] = parts[0]
    return out


def openai_state_dict_to_hf(sd: dict[str, torch.Tensor], cfg: CLIPConfig, *,
                            source: str = "state dict") -> dict[str, torch.Tensor]:
    """An HF `CLIPModel` state dict from ours (the keys of `CLIP(cfg).state_dict()`, nothing else).

    Missing keys, unexpected keys or wrong shapes raise ValueError naming `source`. Split and transposed
    tensors are fresh contiguous copies (safetensors refuses shared storage); the rest is shared with
    `sd`; dtypes are kept. `position_ids` buffers are not written (transformers rebuilds them)."""
    rules, shapes = _rules(cfg), _our_shapes(cfg)
    _check_keys_and_shapes(sd, shapes, source, "a clipforge CLIP")
    out: dict[str, torch.Tensor] = {}
    for rule in rules:
        tensor = sd[rule.ours]
        if rule.kind == "qkv":
            for name, part in zip(rule.hf, tensor.chunk(3, dim=0), strict=True):
                out[name] = part.clone()
        elif rule.kind == "transpose":
            out[rule.hf[0]] = tensor.t().contiguous()
        else:
            out[rule.hf[0]] = tensor
    return out


def _rules(cfg: CLIPConfig) -> list[_Rule]:
    if cfg.vision.is_resnet:
        raise ValueError(f"HF CLIP has no ModifiedResNet image tower (vision layers {cfg.vision.layers}); "
                         "only ViT models can be translated to or from the HF layout")
    rules = [
        _Rule("positional_embedding", ("text_model.embeddings.position_embedding.weight",)),
        _Rule("text_projection", ("text_projection.weight",), "transpose"),
        _Rule("logit_scale", ("logit_scale",)),
        _Rule("token_embedding.weight", ("text_model.embeddings.token_embedding.weight",)),
    ]
    rules += _block_rules("transformer", "text_model.encoder", cfg.text.layers)
    rules += _norm_rules("ln_final", "text_model.final_layer_norm")
    rules += [
        _Rule("visual.class_embedding", ("vision_model.embeddings.class_embedding",)),
        _Rule("visual.positional_embedding", ("vision_model.embeddings.position_embedding.weight",)),
        _Rule("visual.proj", ("visual_projection.weight",), "transpose"),
        _Rule("visual.conv1.weight", ("vision_model.embeddings.patch_embedding.weight",)),
    ]
    rules += _norm_rules("visual.ln_pre", "vision_model.pre_layrnorm")
    rules += _block_rules("visual.transformer", "vision_model.encoder", cfg.vision.layers)
    rules += _norm_rules("visual.ln_post", "vision_model.post_layernorm")
    return rules


def _block_rules(ours: str, hf: str, layers: int) -> list[_Rule]:
    rules = []
    for i in range(layers):
        o, h = f"{ours}.resblocks.{i}", f"{hf}.layers.{i}"
        rules += _norm_rules(f"{o}.ln_1", f"{h}.layer_norm1")
        for kind in ("weight", "bias"):
            qkv = tuple(f"{h}.self_attn.{p}_proj.{kind}" for p in "qkv")
            rules.append(_Rule(f"{o}.attn.in_proj_{kind}", qkv, "qkv"))
        rules += _linear_rules(f"{o}.attn.out_proj", f"{h}.self_attn.out_proj")
        rules += _norm_rules(f"{o}.ln_2", f"{h}.layer_norm2")
        rules += _linear_rules(f"{o}.mlp.c_fc", f"{h}.mlp.fc1")
        rules += _linear_rules(f"{o}.mlp.c_proj", f"{h}.mlp.fc2")
    return rules


def _linear_rules(ours: str, hf: str) -> list[_Rule]:
    return [_Rule(f"{ours}.{p}", (f"{hf}.{p}",)) for p in ("weight", "bias")]


_norm_rules = _linear_rules  # LayerNorm has the same two parameter names


def _our_shapes(cfg: CLIPConfig) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of `CLIP(cfg)`, built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        model = CLIP(cfg)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _hf_shapes(rule: _Rule, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    if rule.kind == "qkv":
        part = (shape[0] // 3, *shape[1:])
        return dict.fromkeys(rule.hf, part)
    if rule.kind == "transpose":
        return {rule.hf[0]: shape[::-1]}
    return {rule.hf[0]: shape}


def _strip_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop a wrapper prefix (`clip.`, `model.`) when every key carries it."""
    for prefix in _OPTIONAL_PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            return {k[len(prefix):]: v for k, v in sd.items()}
    return dict(sd)


def _check_keys_and_shapes(sd: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]],
                           source: str, layout: str) -> None:
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s) {_few(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s) {_few(unexpected)}")
    if problems:
        raise ValueError(f"{source}: not {layout} state dict for this architecture: {'; '.join(problems)}")
    wrong = [f"{k} is {tuple(sd[k].shape)}, expected {shape}"
             for k, shape in expected.items() if tuple(sd[k].shape) != shape]
    if wrong:
        raise ValueError(f"{source}: {len(wrong)} tensor(s) with the wrong shape for this architecture: "
                         f"{'; '.join(wrong[:3])}{' ...' if len(wrong) > 3 else ''}")


def _few(keys: list[str], limit: int = 4) -> str:
    shown = ", ".join(keys[:limit])
    return f"[{shown}{', ...' if len(keys) > limit else ''}]"
