"""The model call as the schedules use it, and how it is counted.

An edit needs the model's estimate for many rows at once: the n mask noises under the query and the reference
text, the conditional and unconditional halves of classifier-free guidance, several targets that share one
inversion. ``eps_model`` wraps a network so it returns what its schedule steps with; ``denoiser.Denoiser`` stacks
rows into as few calls as ``max_batch`` allows; ``Rows`` and ``EvalCounter`` count what ran (batch rows and calls).
"""
from __future__ import annotations

from typing import Callable

import torch

from . import ddim
from .conditioning import Cond

EpsFn = Callable[[torch.Tensor, torch.Tensor, Cond], torch.Tensor]


def eps_model(unet: Callable, prediction_type: str, alpha_bar: torch.Tensor, dtype: torch.dtype | None = None) -> EpsFn:
    """Wrap the network so it returns what its schedule's denoiser steps with: eps for DDIM (v-prediction models are
    converted with alpha_bar_t), the velocity as it comes for a flow-matching model ("flow_prediction").

    ``dtype``: the network's dtype, if it differs from the latents' (a bf16 UNet under float32 latents): inputs
    are cast to it and the estimate back to the latents' dtype, so the schedule's arithmetic never runs in bf16."""
    if prediction_type not in ("epsilon", "v_prediction", "flow_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon', 'v_prediction' or 'flow_prediction', "
                         f"got {prediction_type!r}")

    def eps(x, t, context):
        if dtype is None or dtype == x.dtype:
            out = unet(x, t, context)
        else:
            out = unet(x.to(dtype), t, context.to(dtype)).to(x.dtype)
        if prediction_type != "v_prediction":
            return out
        ab = ddim.alpha_bar_at(t, alpha_bar).to(x.device, x.dtype).reshape(-1, 1, 1, 1)
        return ddim.v_to_eps(x, out, ab)

    return eps


class Rows:
    """Rows (batch entries; for a UNet, sample evaluations) and calls; ``on_rows(n)`` is told of every call."""

    def __init__(self, on_rows=None):
        self.rows = self.calls = 0
        self.on_rows = on_rows

    def add(self, x) -> None:
        self.rows += x.shape[0]
        self.calls += 1
        if self.on_rows is not None:
            self.on_rows(x.shape[0])

    @property
    def count(self) -> int:
        """Rows so far (for a UNet, sample evaluations)."""
        return self.rows

    @count.setter
    def count(self, value: int) -> None:
        self.rows = value

    def reset(self) -> None:
        self.rows = self.calls = 0

    def get(self) -> dict:
        return {"rows": self.rows, "calls": self.calls}


class EvalCounter(Rows):
    """Wraps an eps function; ``count`` = UNet sample evaluations (batch rows) run through it."""

    def __init__(self, eps, on_rows=None):
        super().__init__(on_rows)
        self.eps = eps

    def around(self, eps) -> "EvalCounter":
        """This counter, now around ``eps`` (an engine's ``wrap``: totals carry over from model to model)."""
        self.eps = eps
        return self

    def __call__(self, x, t, context):
        self.add(x)
        return self.eps(x, t, context)
