"""Measuring tools shared by the sweep, the benchmark scripts and the tests (torch-only; no diffusers)."""
from __future__ import annotations


class EvalCounter:
    """Wraps an eps function; ``count`` = UNet sample evaluations (batch rows) run through it."""

    def __init__(self, eps, on_rows=None):
        self.eps, self.count, self.on_rows = eps, 0, on_rows

    def __call__(self, x, t, context):
        self.count += x.shape[0]
        if self.on_rows is not None:
            self.on_rows(x.shape[0])
        return self.eps(x, t, context)
