"""An exponential moving average of a model's weights, which validation and the final model can use."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

__all__ = ["WeightAverage"]


class WeightAverage:
    """An exponential moving average of a model's floating-point parameters and buffers (BatchNorm statistics).

    The decay ramps up as ``min(decay, (1 + step) / (10 + step))`` so that the first steps' random weights fade
    quickly. Updated after each optimizer step; `swapped_in()` puts the average into the model for a while."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"optim.ema_decay must be between 0 and 1 (e.g. 0.995), got {decay}")
        self.model, self.decay = model, decay
        live = self._live()
        self._names = list(live)
        self.average = [t.detach().float().clone() for t in live.values()]

    def _live(self) -> dict[str, torch.Tensor]:
        """The model's floating-point tensors by their state-dict names (a checkpoint's average keeps the names
        of the model's layout). Looked up each time: moving the model to a device replaces its buffers."""
        return {name: t for name, t in self.model.state_dict(keep_vars=True).items() if t.is_floating_point()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        live = [t.detach().float() for t in self._live().values()]
        if self.average and self.average[0].device != live[0].device:
            self.average = [a.to(t.device) for a, t in zip(self.average, live, strict=True)]
        decay = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.average, live, 1.0 - decay)

    @contextlib.contextmanager
    def swapped_in(self):
        live = list(self._live().values())
        saved = [t.detach().clone() for t in live]
        with torch.no_grad():
            for tensor, average in zip(live, self.average, strict=True):
                tensor.copy_(average)
        try:
            yield
        finally:
            with torch.no_grad():
                for tensor, kept in zip(live, saved, strict=True):
                    tensor.copy_(kept)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(zip(self._names, self.average, strict=True))

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self._names) - set(state)
        if missing:
            raise ValueError(f"the checkpoint's weight average lacks {sorted(missing)[:3]}: resume with the "
                             "optim.ema_decay setting it was trained with")
        self.average = [state[name].float().clone() for name in self._names]
