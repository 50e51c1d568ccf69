"""paGating units: y = A(x) * (α·g(B(x)) + (1 - α)).

A = `value_proj`, B = `gate_proj` (nn.Linear each, as in the public paGating API). α = 1 gives the
standard gated unit (paGLU = GLU), α = 0 the value path alone. The class names and constructor
`paGLU(input_dim, output_dim, alpha=0.5)` follow the public paGating package so the units are
drop-in replacements.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pagating.alpha import Alpha
from pagating.config import PLAIN, is_plain  # noqa: F401  (re-exported: `plain` is a model.unit value)


class PaGatingBase(nn.Module):
    """Shared body of every unit; subclasses only define the gate nonlinearity g."""

    def __init__(self, input_dim: int, output_dim: int, alpha: float | str | Callable = 0.5,
                 bias: bool = True, fused: bool = False, max_steps: int = 1):
        super().__init__()
        self.input_dim, self.output_dim = input_dim, output_dim
        self.value_proj = nn.Linear(input_dim, output_dim, bias=bias)
        self.gate_proj = nn.Linear(input_dim, output_dim, bias=bias)
        self.alpha_module = Alpha(alpha, max_steps=max_steps)
        # fused: one matmul over [A; B] (reads x once, one GEMM). Off by default: bench/units.py measured
        # it 5-9% slower on CPU (the weight concat each step costs more than the saved launch).
        self.fused = fused

    # Public paGating API ------------------------------------------------------------------
    @property
    def alpha_param(self) -> nn.Parameter | None:
        return getattr(self.alpha_module, "alpha_param", None)

    def get_alpha(self, x: torch.Tensor | None = None) -> torch.Tensor:
        return self.alpha_module.get(x)

    def set_step(self, step: int) -> None:
        self.alpha_module.set_step(step)

    # Math ---------------------------------------------------------------------------------
    def gate_fn(self, b: torch.Tensor) -> torch.Tensor:  # g
        raise NotImplementedError

    def value_fn(self, a: torch.Tensor) -> torch.Tensor:  # the value path: A(x) itself, except in paGTU
        return a

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.fused:
            return self.value_proj(x), self.gate_proj(x)
        weight = torch.cat((self.value_proj.weight, self.gate_proj.weight), 0)
        bias = None
        if self.value_proj.bias is not None:
            bias = torch.cat((self.value_proj.bias, self.gate_proj.bias), 0)
        return F.linear(x, weight, bias).chunk(2, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.project(x)
        alpha = self.get_alpha(x)
        # α·g(B) + (1 - α) in one kernel (addcmul), then the product with A.
        return self.value_fn(a) * torch.addcmul(1 - alpha, alpha, self.gate_fn(b))

    def extra_repr(self) -> str:
        return f"{self.input_dim} -> {self.output_dim}, fused={self.fused}"


class paGLU(PaGatingBase):  # noqa: N801 - the public paGating names
    def gate_fn(self, b):
        return torch.sigmoid(b)


class paGTU(PaGatingBase):  # noqa: N801
    """tanh(A(x))·(α·σ(B(x)) + 1 − α): the gated tanh unit of the literature, tanh(A)·σ(B), at α = 1, and
    tanh(A) at α = 0.

    The public paGating code also puts tanh on the value path, but its gate is tanh in code (σ in its
    docstring); this unit follows the GTU it is named after, with σ.
    """

    def value_fn(self, a):
        return torch.tanh(a)

    def gate_fn(self, b):
        return torch.sigmoid(b)


class paSwishU(PaGatingBase):  # noqa: N801
    """g(B) = B·σ(βB). β is a parameter (learnable by default), so this is not paSiLU unless β = 1."""

    def __init__(self, input_dim, output_dim, alpha=0.5, beta: float = 1.0, learnable_beta: bool = True,
                 **kwargs):
        super().__init__(input_dim, output_dim, alpha=alpha, **kwargs)
        self.beta_init = float(beta)
        if learnable_beta:
            self.beta = nn.Parameter(torch.tensor(self.beta_init))
        else:
            self.register_buffer("beta", torch.tensor(self.beta_init))

    def gate_fn(self, b):
        return b * torch.sigmoid(self.beta * b)


class paReGLU(PaGatingBase):  # noqa: N801
    def gate_fn(self, b):
        return F.relu(b)


class paGELU(PaGatingBase):  # noqa: N801
    def gate_fn(self, b):
        return F.gelu(b)


class paMishU(PaGatingBase):  # noqa: N801
    def gate_fn(self, b):
        return F.mish(b)


class paSiLU(PaGatingBase):  # noqa: N801
    def gate_fn(self, b):
        return F.silu(b)


UNITS: dict[str, type[PaGatingBase]] = {
    cls.__name__: cls for cls in (paGLU, paGTU, paSwishU, paReGLU, paGELU, paMishU, paSiLU)
}


def get_unit(name: str) -> type[PaGatingBase]:
    """Look a unit up by name (case-insensitive); unknown names raise ValueError listing the choices."""
    for key, cls in UNITS.items():
        if key.lower() == str(name).lower():
            return cls
    raise ValueError(f"unknown unit {name!r}; valid units: {', '.join(UNITS)}, {PLAIN} (GPT-2's own MLP)")


def check_unit(name: str) -> None:
    """A valid `model.unit`: a paGating unit or `plain`; ValueError naming the choices otherwise."""
    if not is_plain(name):
        get_unit(name)
