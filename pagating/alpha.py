"""α modes, a registry like the units: one class per mode (`static_<a>`, `learnable`, `scheduler_cosine`).

A mode class holds everything the project knows about it: how it is spelt (`parse`), the value its
tensor starts at, its update per optimizer step, whether a run logs α per layer, the MLflow params
that describe it, and where the report orders it. Adding a mode = one `@register`ed class here
+ tests (CONTRIBUTING.md); nothing else in the package names a mode.

α always lives in a 0-dim tensor (a buffer, or sigmoid of a 0-dim parameter) that is updated in
place, so a torch.compile'd model sees the same tensor object every step and never recompiles
when α moves. A callable of x (the public paGating API) is accepted by `Alpha` directly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from pagating import names


class AlphaMode:
    """One α mode; an instance is a parsed `alpha_mode` (immutable)."""

    name: ClassVar[str]  # registry key and the `alpha.kind` param
    syntax: ClassVar[str]  # how it is spelt, for error messages and --help
    order: ClassVar[int]  # the report lists modes by this (`sort_key`)
    trainable: ClassVar[bool] = False  # True: α = sigmoid(θ), θ the parameter `alpha_param`; else the buffer `alpha`
    logged: ClassVar[bool] = False  # True: α changes during a run, so it is logged as alpha/layer_NN

    @classmethod
    def parse(cls, mode: str | float) -> AlphaMode | None:
        """This mode if `mode` spells it, else None (ValueError for a spelling of it with a bad value)."""
        return cls() if mode == cls.name else None

    def initial(self, max_steps: int) -> float:
        """The stored tensor's value before the first step (θ for a trainable mode)."""
        raise NotImplementedError

    def at_step(self, step: int, max_steps: int) -> float | None:
        """The buffer's value at an optimizer step, or None when α is not driven by the step."""
        return None

    def alpha(self, raw: torch.Tensor) -> torch.Tensor:
        """α from the stored tensor."""
        return torch.sigmoid(raw) if self.trainable else raw

    def params(self) -> dict[str, str]:
        """What the run's MLflow params say about α."""
        return {names.ALPHA_KIND: self.name}

    def sort_key(self) -> tuple[int, float]:
        return (self.order, 0.0)


MODES: dict[str, type[AlphaMode]] = {}


def register(cls: type[AlphaMode]) -> type[AlphaMode]:
    """Class decorator: make a mode known to parsing, validation, training and the report."""
    MODES[cls.name] = cls
    return cls


def choices(sep: str = ", ") -> str:
    return sep.join(cls.syntax for cls in MODES.values())


def _check_range(a: float) -> float:
    if not (0.0 <= a <= 1.0) or math.isnan(a):
        raise ValueError(f"alpha must be in [0, 1], got {a}; valid alpha modes: {choices()}")
    return float(a)


def cosine_alpha(step: int, max_steps: int) -> float:
    """Half cosine from α=0 at step 0 to α=1 at step max_steps - 1 (monotone increasing, clamped).

    `step` is the optimizer steps done before the one α is set for (the Trainer's global_step at step
    begin), so the last optimizer step (step = max_steps - 1) runs at exactly 1, and the last validation
    eval, the test eval and the saved model, which all come after it, share that α. One step: α = 1.
    """
    t = min(max(step / (max_steps - 1), 0.0), 1.0) if max_steps > 1 else 1.0
    return 0.5 * (1.0 - math.cos(math.pi * t))


@register
@dataclass(frozen=True)
class StaticAlpha(AlphaMode):
    """`static_<a>`: α fixed at a ∈ [0, 1]; a bare number means the same."""

    name: ClassVar[str] = "static"
    syntax: ClassVar[str] = "static_<a> with a in [0, 1]"
    order: ClassVar[int] = 0
    value: float = 0.5

    @classmethod
    def parse(cls, mode):
        if isinstance(mode, int | float) and not isinstance(mode, bool):
            return cls(_check_range(float(mode)))
        if isinstance(mode, str) and mode.startswith("static_"):
            try:
                a = float(mode[len("static_"):])
            except ValueError:
                return None
            return cls(_check_range(a))
        return None

    def initial(self, max_steps):
        return self.value

    def sort_key(self):
        return (self.order, self.value)


@register
@dataclass(frozen=True)
class LearnableAlpha(AlphaMode):
    """`learnable`: α = sigmoid(θ), one θ per layer, θ = 0 so α starts at exactly 0.5."""

    name: ClassVar[str] = "learnable"
    syntax: ClassVar[str] = "learnable"
    order: ClassVar[int] = 1
    trainable: ClassVar[bool] = True
    logged: ClassVar[bool] = True

    def initial(self, max_steps):
        return 0.0


@register
@dataclass(frozen=True)
class CosineSchedulerAlpha(AlphaMode):
    """`scheduler_cosine`: α follows a half cosine from 0 at the first optimizer step to 1 at the last."""

    name: ClassVar[str] = "scheduler_cosine"
    syntax: ClassVar[str] = "scheduler_cosine"
    order: ClassVar[int] = 2
    logged: ClassVar[bool] = True

    def initial(self, max_steps):
        return cosine_alpha(0, max_steps)

    def at_step(self, step, max_steps):
        return cosine_alpha(step, max_steps)

    def params(self):
        return {names.ALPHA_KIND: self.name,
                "alpha.schedule": "half cosine, alpha 0 at the first optimizer step -> 1 at the last (train.max_steps)"}


def parse_alpha_mode(mode: str | float | int) -> AlphaMode:
    """The registered mode `mode` spells; anything else raises ValueError naming the choices."""
    for cls in MODES.values():
        spec = cls.parse(mode)
        if spec is not None:
            return spec
    raise ValueError(f"unknown alpha mode {mode!r}; valid alpha modes: {choices()}")


def sort_key(mode: str) -> tuple:
    """Where the report puts an alpha_mode: by mode, then value; other labels (e.g. `plain`) after all modes."""
    try:
        return (*parse_alpha_mode(mode).sort_key(), mode)
    except ValueError:
        return (max((cls.order for cls in MODES.values()), default=0) + 1, 0.0, mode)


class Alpha(nn.Module):
    """The α of one unit. `get(x)` returns a 0-dim tensor (or whatever a callable returns)."""

    def __init__(self, alpha: float | str | Callable | AlphaMode = 0.5, max_steps: int = 1):
        super().__init__()
        self.fn: Callable | None = None
        self.mode: AlphaMode | None = None
        self.max_steps = int(max_steps)
        if callable(alpha) and not isinstance(alpha, AlphaMode):
            self.kind = "callable"
            self.fn = alpha
            return
        self.mode = alpha if isinstance(alpha, AlphaMode) else parse_alpha_mode(alpha)
        self.kind = self.mode.name
        start = torch.tensor(float(self.mode.initial(self.max_steps)))
        if self.mode.trainable:
            self.alpha_param = nn.Parameter(start)
        else:
            self.register_buffer("alpha", start)

    @property
    def raw(self) -> torch.Tensor:
        """The stored tensor (θ or α) a mode initialises."""
        return self.alpha_param if self.mode.trainable else self.alpha

    def set_step(self, step: int) -> None:
        """Drive a scheduled α by the optimizer step (also the way to restore it on resume)."""
        value = self.mode.at_step(step, self.max_steps) if self.mode is not None else None
        if value is not None:
            with torch.no_grad():
                self.alpha.fill_(value)

    def get(self, x: torch.Tensor | None = None) -> torch.Tensor:
        if self.fn is not None:
            value = self.fn(x)
            if not torch.is_tensor(value):
                value = torch.tensor(float(value), device=x.device if x is not None else None)
            return value
        return self.mode.alpha(self.raw)

    def extra_repr(self) -> str:
        return f"kind={self.kind}" + (f", mode={self.mode}" if self.mode is not None else "")
