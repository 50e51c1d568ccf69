"""The paGating math, unit by unit, against formulas computed by hand from the same weights."""

import math

import pytest
import torch
import torch.nn.functional as F

from pagating.alpha import Alpha, cosine_alpha, parse_alpha_mode
from pagating.units import UNITS, get_unit, paSiLU, paSwishU

# The textbook gate of each unit, written independently of pagating.units.
TEXTBOOK = {
    "paGLU": torch.sigmoid,
    "paGTU": torch.sigmoid,  # gate σ; the value path is tanh(A) (VALUE below)
    "paSwishU": lambda b: b * torch.sigmoid(1.0 * b),  # β initialised to 1
    "paReGLU": F.relu,
    "paGELU": F.gelu,
    "paMishU": lambda b: b * torch.tanh(F.softplus(b)),
    "paSiLU": lambda b: b * torch.sigmoid(b),
}


# The value path: A(x), except the gated tanh unit's tanh(A(x)).
VALUE = {name: (torch.tanh if name == "paGTU" else (lambda a: a)) for name in UNITS}


def by_hand(unit, x, alpha):
    a = VALUE[type(unit).__name__](x @ unit.value_proj.weight.T + unit.value_proj.bias)
    b = x @ unit.gate_proj.weight.T + unit.gate_proj.bias
    return a, b, a * (alpha * TEXTBOOK[type(unit).__name__](b) + (1 - alpha))


@pytest.mark.parametrize("name", list(UNITS))
@pytest.mark.parametrize("fused", [True, False])
def test_alpha_one_zero_half(name, fused):
    torch.manual_seed(0)
    x = torch.randn(4, 7, 16, dtype=torch.float64)
    for alpha in (1.0, 0.0, 0.5, 0.3):
        unit = UNITS[name](16, 24, alpha=alpha, fused=fused).double()
        y = unit(x)
        a, b, expected = by_hand(unit, x, alpha)
        assert y.shape == (4, 7, 24)
        torch.testing.assert_close(y, expected)
        if alpha == 1.0:  # the standard gated unit, e.g. GLU = A * sigmoid(B)
            torch.testing.assert_close(y, a * TEXTBOOK[name](b))
        if alpha == 0.0:  # the value path alone
            torch.testing.assert_close(y, a)


@pytest.mark.parametrize("name", list(UNITS))
def test_two_dim_input_and_no_bias(name):
    unit = UNITS[name](8, 12, alpha=0.7, bias=False)
    x = torch.randn(5, 8)
    y = unit(x)
    assert y.shape == (5, 12)
    a, b = VALUE[name](x @ unit.value_proj.weight.T), x @ unit.gate_proj.weight.T
    torch.testing.assert_close(y, a * (0.7 * TEXTBOOK[name](b) + 0.3), rtol=1e-5, atol=1e-6)


def test_gtu_is_the_gated_tanh_unit():
    """paGTU at α = 1 is tanh(A)·σ(B), at α = 0 tanh(A), written out from the same weights."""
    torch.manual_seed(2)
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    for alpha, gate in ((1.0, True), (0.0, False)):
        unit = UNITS["paGTU"](8, 16, alpha=alpha).double()
        a = torch.tanh(F.linear(x, unit.value_proj.weight, unit.value_proj.bias))
        b = torch.sigmoid(F.linear(x, unit.gate_proj.weight, unit.gate_proj.bias))
        torch.testing.assert_close(unit(x), a * b if gate else a)


@pytest.mark.parametrize("name", list(UNITS))
@pytest.mark.parametrize("alpha", [0.4, "learnable"])
def test_gradcheck_float64(name, alpha):
    torch.manual_seed(1)
    unit = UNITS[name](6, 5, alpha=alpha).double()
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    params = tuple(p for p in unit.parameters())
    assert torch.autograd.gradcheck(lambda x, *ps: torch.func.functional_call(
        unit, dict(zip([n for n, _ in unit.named_parameters()], ps, strict=True)), (x,)),
        (x, *params), eps=1e-6, atol=1e-5)


def test_learnable_alpha_starts_at_half_and_gets_gradient():
    unit = get_unit("paglu")(8, 8, alpha="learnable")
    assert isinstance(unit.alpha_param, torch.nn.Parameter)
    assert unit.get_alpha().item() == 0.5
    unit(torch.randn(4, 8)).pow(2).sum().backward()
    assert unit.alpha_param.grad is not None and unit.alpha_param.grad.abs().item() > 0


def test_static_alpha_has_no_param_and_callable_alpha():
    unit = get_unit("paGTU")(8, 8, alpha=0.25)
    assert unit.alpha_param is None
    assert unit.get_alpha().dim() == 0 and unit.get_alpha().item() == 0.25
    cal = get_unit("paGTU")(8, 8, alpha=lambda x: x.abs().mean().clamp(0, 1))
    x = torch.randn(3, 8)
    a, b, expected = by_hand(cal, x, x.abs().mean().clamp(0, 1))
    torch.testing.assert_close(cal(x), expected)
    assert torch.is_tensor(cal.get_alpha(x))


def test_swishu_differs_from_silu_when_beta_not_one():
    torch.manual_seed(0)
    swish, silu = paSwishU(8, 8, alpha=1.0, beta=2.0), paSiLU(8, 8, alpha=1.0)
    silu.load_state_dict({k: v for k, v in swish.state_dict().items() if k != "beta"})
    x = torch.randn(4, 8)
    assert not torch.allclose(swish(x), silu(x))
    with torch.no_grad():
        swish.beta.fill_(1.0)
    torch.testing.assert_close(swish(x), silu(x))
    assert isinstance(swish.beta, torch.nn.Parameter)
    assert not isinstance(paSwishU(8, 8, learnable_beta=False).beta, torch.nn.Parameter)


def test_scheduler_cosine():
    alpha = Alpha("scheduler_cosine", max_steps=100)
    values = []
    for step in range(0, 101):
        alpha.set_step(step)
        values.append(alpha.get().item())
    assert values[0] == 0.0 and values[99] == values[100] == 1.0  # 1 at the last optimizer step (step 99)
    assert all(b >= a for a, b in zip(values, values[1:], strict=False))
    assert values[33] < 0.5 < values[66] and cosine_alpha(99, 199) == pytest.approx(0.5)
    buf = alpha.get()
    fresh = Alpha("scheduler_cosine", max_steps=100)
    fresh.set_step(37)  # resume restores the value
    assert fresh.get().item() == pytest.approx(cosine_alpha(37, 100)) == pytest.approx(values[37])
    alpha.set_step(10)
    assert alpha.get() is buf  # updated in place: a compiled graph keeps seeing the same tensor


@pytest.mark.parametrize("bad", [1.5, -0.1, "static_1.5", "static_x", "cosine", "learned"])
def test_bad_alpha_raises_naming_choices(bad):
    with pytest.raises(ValueError, match="learnable.*scheduler_cosine"):
        parse_alpha_mode(bad)
    with pytest.raises(ValueError):
        UNITS["paGLU"](4, 4, alpha=bad)


def test_unknown_unit_names_choices():
    with pytest.raises(ValueError, match="paGLU.*paSiLU"):
        get_unit("paFoo")


def test_static_parse():
    assert parse_alpha_mode("static_0.5").value == 0.5
    assert parse_alpha_mode("static_1.0").value == 1.0
    assert parse_alpha_mode("static_0").value == 0.0
    assert math.isclose(parse_alpha_mode(0.25).value, 0.25)
