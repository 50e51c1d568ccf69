"""α modes of the seed: `static_<a>`, `learnable`, `scheduler_cosine`, and a callable of x.

α always lives in a 0-dim tensor (a buffer, or sigmoid of a 0-dim parameter) that is updated in
place, so a torch.compile'd model sees the same tensor object every step and never recompiles
when α moves.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

ALPHA_MODES = ("static_<a> with a in [0, 1]", "learnable", "scheduler_cosine")


@dataclass(frozen=True)
class AlphaSpec:
    kind: str  # "static" | "learnable" | "scheduler_cosine"
    value: float | None = None  # static value


def _check_range(a: float) -> float:
    if not (0.0 <= a <= 1.0) or math.isnan(a):
        raise ValueError(f"alpha must be in [0, 1], got {a}; valid alpha modes: {', '.join(ALPHA_MODES)}")
    return float(a)


def parse_alpha_mode(mode: str | float | int) -> AlphaSpec:
    """Parse the seed's alpha_mode spelling; anything else raises ValueError naming the choices."""
    if isinstance(mode, bool):
        raise ValueError(f"unknown alpha mode {mode!r}; valid alpha modes: {', '.join(ALPHA_MODES)}")
    if isinstance(mode, int | float):
        return AlphaSpec("static", _check_range(float(mode)))
    if mode == "learnable":
        return AlphaSpec("learnable")
    if mode == "scheduler_cosine":
        return AlphaSpec("scheduler_cosine")
    if isinstance(mode, str) and mode.startswith("static_"):
        try:
            value = float(mode[len("static_"):])
        except ValueError:
            value = None
        if value is not None:
            return AlphaSpec("static", _check_range(value))
    raise ValueError(f"unknown alpha mode {mode!r}; valid alpha modes: {', '.join(ALPHA_MODES)}")


def cosine_alpha(step: int, max_steps: int) -> float:
    """Half cosine from α=0 at step 0 to α=1 at max_steps (monotone increasing, clamped)."""
    t = min(max(step / max(max_steps, 1), 0.0), 1.0)
    return 0.5 * (1.0 - math.cos(math.pi * t))


class Alpha(nn.Module):
    """The α of one unit. `get(x)` returns a 0-dim tensor (or whatever a callable returns)."""

    def __init__(self, alpha: float | str | Callable | AlphaSpec = 0.5, max_steps: int = 1):
        super().__init__()
        self.fn: Callable | None = None
        self.max_steps = int(max_steps)
        if callable(alpha) and not isinstance(alpha, AlphaSpec):
            self.kind = "callable"
            self.fn = alpha
            return
        spec = alpha if isinstance(alpha, AlphaSpec) else parse_alpha_mode(alpha)
        self.kind = spec.kind
        self.static_value = spec.value
        if self.kind == "learnable":
            # α = sigmoid(θ); θ = 0 gives exactly 0.5.
            self.alpha_param = nn.Parameter(torch.zeros(()))
        else:
            start = spec.value if self.kind == "static" else cosine_alpha(0, self.max_steps)
            self.register_buffer("alpha", torch.tensor(float(start)))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            if self.kind == "learnable":
                self.alpha_param.zero_()
            elif self.kind == "static":
                self.alpha.fill_(self.static_value)
            elif self.kind == "scheduler_cosine":
                self.alpha.fill_(cosine_alpha(0, self.max_steps))

    def set_step(self, step: int) -> None:
        """Drive a scheduled α by the optimizer step (also the way to restore it on resume)."""
        if self.kind == "scheduler_cosine":
            with torch.no_grad():
                self.alpha.fill_(cosine_alpha(step, self.max_steps))

    def get(self, x: torch.Tensor | None = None) -> torch.Tensor:
        if self.kind == "callable":
            value = self.fn(x)
            if not torch.is_tensor(value):
                value = torch.tensor(float(value), device=x.device if x is not None else None)
            return value
        if self.kind == "learnable":
            return torch.sigmoid(self.alpha_param)
        return self.alpha

    def extra_repr(self) -> str:
        return f"kind={self.kind}" + (f", value={self.static_value}" if self.kind == "static" else "")
