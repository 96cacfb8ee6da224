"""Which parameters a training run updates and how: AdamW's weight-decay groups, locking towers (LiT), and the
optimizer state that follows each parameter by name across a resume."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..model import CLIP
from .config import ModelConfig

__all__ = ["group_names", "lock_towers", "match_optimizer_state", "param_groups"]


def param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices (linear, conv, attention, projections, token embedding) only;
    never on gains, biases, positional embeddings, the class token or the temperature. Frozen weights are left
    out."""
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim >= 2 and "positional_embedding" not in name:
            decay.append(param)
        else:
            no_decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _set_trainable(groups: list[list[nn.Module | nn.Parameter]], unlocked: int) -> list[nn.Module]:
    """Freeze all groups but the last `unlocked`; return the frozen modules (to keep them in eval mode)."""
    frozen_modules = []
    for index, group in enumerate(groups):
        trainable = index >= len(groups) - unlocked
        for item in group:
            params = [item] if isinstance(item, nn.Parameter) else list(item.parameters())
            for param in params:
                param.requires_grad_(trainable)
            if not trainable and isinstance(item, nn.Module):
                frozen_modules.append(item)
    return frozen_modules


def lock_towers(model: CLIP, cfg: ModelConfig) -> list[nn.Module]:
    """Apply lock_image / lock_text (with their unlocked last groups); return the modules to keep in eval mode
    (frozen BatchNorm statistics, for LiT with a ResNet image tower)."""
    frozen: list[nn.Module] = []
    if cfg.lock_image:
        modules = _set_trainable(model.visual.lock_groups(), cfg.lock_image_unlocked_groups)
        if cfg.lock_image_freeze_bn_stats:
            frozen += modules
    if cfg.lock_text:
        _set_trainable(model.text.lock_groups(), cfg.lock_text_unlocked_layers)
    return frozen


# ---------------------------------------------------------------------------------------- optimizer state


def group_names(module: nn.Module, groups: list[dict[str, Any]]) -> list[list[str]]:
    """The state-dict names of each group's parameters, in the optimizer's order."""
    names = {id(tensor): name for name, tensor in module.state_dict(keep_vars=True).items()}
    return [[names[id(param)] for param in group["params"]] for group in groups]


def match_optimizer_state(state: dict[str, Any], saved: list[list[str]], current: list[list[str]]) -> None:
    """Renumber a saved optimizer state dict (torch's: per-parameter state keyed by position across the groups) so
    that each parameter gets its own state back where the module now lists its parameters in another order (a new
    clipforge version, say): PyTorch matches optimizer state by position, and a mismatch would hand a tensor the
    moments of another one. `saved` and `current` name each group's parameters, in order. A ValueError when the
    two cover different parameters (another model, or other locked towers)."""
    if saved == current:
        return
    if [sorted(g) for g in saved] != [sorted(g) for g in current]:
        raise ValueError("cannot resume: the checkpoint's optimizer state is for other parameters than this run "
                         "trains (a different model, tower locking or loss); resume with the settings it was "
                         "written with")
    position = {name: i for i, name in enumerate(name for group in saved for name in group)}
    flat = [name for group in current for name in group]
    old = state["state"]
    state["state"] = {i: old[position[name]] for i, name in enumerate(flat) if position[name] in old}
    start = 0
    for group, names in zip(state["param_groups"], current, strict=True):
        group["params"] = list(range(start, start + len(names)))
        start += len(names)
