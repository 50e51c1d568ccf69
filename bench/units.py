"""Forward+backward time of the seven paGating units against a naive eager two-Linear version.

    .venv/bin/python bench/units.py [--quick] [--device auto|cpu|cuda] [--compile]
        [--batch 16] [--seq 128] [--dim 768] [--ffn 3072] [--repeats N] [--inner N]

At GPT-2-small MLP sizes (768 -> 3072 over 16 x 128 tokens), per unit, three versions with the same
weights, stepped round-robin after a warm-up (median over the repeats):

  unit      pagating.units.<unit>(fused=True): one matmul over [A; B], α·g(B) + (1-α) by addcmul
  unfused   the same class with fused=False: value_proj and gate_proj as two Linears
  naive     two nn.Linear, then the formula in plain separate ops: a * (alpha * g(b) + (1 - alpha))

One call = forward, then backward of a fixed output gradient (x requires grad, as inside a model).
On CUDA under bf16 autocast with torch.cuda.synchronize around each timed block; `--compile`
compiles all three versions. `ratio_vs_naive` = unit / naive and `fused_vs_unfused` = unit / unfused
(time ratios: below 1 means the pagating unit is faster). `max_abs_diff` checks the three agree.
Ends with one JSON line.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402  (puts the repo root on sys.path too)

ALPHA = 0.5


def naive_gate(name: str):
    """g of each unit written plainly (as a user would without pagating)."""
    import torch
    import torch.nn.functional as F

    return {
        "paGLU": torch.sigmoid,
        "paGTU": torch.sigmoid,  # its value path is tanh(A): see Naive
        "paSwishU": lambda b: b * torch.sigmoid(1.0 * b),  # β = 1 (the unit's initial β)
        "paReGLU": torch.relu,
        "paGELU": F.gelu,
        "paMishU": lambda b: b * torch.tanh(F.softplus(b)),
        "paSiLU": lambda b: b * torch.sigmoid(b),
    }[name]


class Naive:
    """Two nn.Linear and the formula in separate ops; weights copied from a unit."""

    def __init__(self, unit, name: str):
        import torch
        from torch import nn

        self.a = nn.Linear(unit.input_dim, unit.output_dim)
        self.b = nn.Linear(unit.input_dim, unit.output_dim)
        with torch.no_grad():
            for lin, src in ((self.a, unit.value_proj), (self.b, unit.gate_proj)):
                lin.weight.copy_(src.weight)
                lin.bias.copy_(src.bias)
        self.g = naive_gate(name)
        self.value = (lambda a: a.tanh()) if name == "paGTU" else (lambda a: a)  # the gated tanh unit
        self.params = [*self.a.parameters(), *self.b.parameters()]

    def to(self, device):
        self.a.to(device)
        self.b.to(device)
        return self

    def __call__(self, x):
        a = self.value(self.a(x))
        b = self.b(x)
        gate = ALPHA * self.g(b)
        gate = gate + (1 - ALPHA)
        return a * gate


def fwd_bwd(fn, params, x, grad_out, device: str):
    """One timed call: forward under the device's autocast, backward of a fixed output gradient."""
    def call():
        for q in params:
            q.grad = None
        x.grad = None
        with C.autocast(device):
            y = fn(x)
        y.backward(grad_out)

    return call


def main(argv: list[str] | None = None) -> int:
    p = C.base_parser(__doc__, "fewer tokens and repeats (same dims)")
    p.add_argument("--compile", action="store_true", help="torch.compile every version (meant for CUDA)")
    p.add_argument("--batch", type=int, help="default 16 (4 with --quick on CPU)")
    p.add_argument("--seq", type=int, help="default 128 (32 with --quick on CPU)")
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--ffn", type=int, default=3072)
    p.add_argument("--units", default="", help="comma list (default: all seven)")
    p.add_argument("--repeats", type=int, help="timed rounds (default 15 CUDA, 3 CPU, 2 --quick)")
    p.add_argument("--inner", type=int, help="calls per timed block (default 20 CUDA, 1 CPU)")
    args = p.parse_args(argv)

    import torch

    from pagating.units import UNITS

    device = C.pick_device(args.device)
    C.setup_device(device, args.threads)
    cuda = device == "cuda"
    small = args.quick and not cuda  # the quick CPU path only checks that everything runs
    batch, seq = args.batch or (4 if small else 16), args.seq or (32 if small else 128)
    repeats = args.repeats or (15 if cuda else 2 if args.quick else 3)
    inner = args.inner or (20 if cuda else 1)
    names = [u for u in args.units.split(",") if u] or list(UNITS)
    unknown = [u for u in names if u not in UNITS]
    if unknown:
        p.error(f"unknown unit(s) {unknown}; valid: {', '.join(UNITS)}")
    tokens = batch * seq
    print(f"units: device {C.device_name(device)}, {args.dim} -> {args.ffn}, {batch} x {seq} tokens, "
          f"{'bf16 autocast' if cuda else 'fp32'}, compile {args.compile}, median of {repeats} x {inner}; "
          f"{C.load_note()}", flush=True)

    torch.manual_seed(0)
    x = torch.randn(batch, seq, args.dim, device=device, requires_grad=True)
    # the output's dtype under autocast (bf16 on CUDA), so backward gets the gradient as training would
    grad_out = torch.randn(batch, seq, args.ffn, device=device, dtype=torch.bfloat16 if cuda else torch.float32)
    results: dict[str, dict] = {}
    rows = []
    for name in names:
        unit = UNITS[name](args.dim, args.ffn, alpha=ALPHA, fused=True).to(device)
        unfused = UNITS[name](args.dim, args.ffn, alpha=ALPHA, fused=False).to(device)
        unfused.load_state_dict(unit.state_dict())
        naive = Naive(unit, name).to(device)
        versions = {"unit": unit, "unfused": unfused, "naive": naive}
        params = {"unit": list(unit.parameters()), "unfused": list(unfused.parameters()), "naive": naive.params}

        with torch.no_grad(), C.autocast(device):
            outs = {k: v(x).float() for k, v in versions.items()}
        diff = max(float((outs[k] - outs["naive"]).abs().max()) for k in ("unit", "unfused"))
        del outs

        calls = {k: fwd_bwd(torch.compile(v) if args.compile else v, params[k], x, grad_out, device)
                 for k, v in versions.items()}
        wall, _ = C.interleaved(calls, device, warmup=3 if cuda else 1,
                                repeats=repeats, inner=inner)
        ms = {k: C.median(v) * 1e3 for k, v in wall.items()}
        results[name] = {"ms": C.rnd(ms["unit"]), "unfused_ms": C.rnd(ms["unfused"]), "naive_ms": C.rnd(ms["naive"]),
                         "ratio_vs_naive": C.rnd(ms["unit"] / ms["naive"]),
                         "fused_vs_unfused": C.rnd(ms["unit"] / ms["unfused"]),
                         "max_abs_diff": C.rnd(diff, 3)}
        r = results[name]
        rows.append([name, r["ms"], r["unfused_ms"], r["naive_ms"], r["ratio_vs_naive"], r["fused_vs_unfused"],
                     f"{diff:.1e}"])
        print(f"  {name}: {r['ms']:.3f} ms (unfused {r['unfused_ms']:.3f}, naive {r['naive_ms']:.3f})", flush=True)
    print()
    C.print_table(rows, ["unit", "ms", "unfused ms", "naive ms", "unit/naive", "fused/unfused", "max|diff|"])
    flop = 3 * 2 * 2 * tokens * args.dim * args.ffn  # two d x d_ff matmuls, forward + 2x backward
    best = min(results.values(), key=lambda r: r["ms"])["ms"]
    print(f"\nmatmul FLOPs per call {flop / 1e9:.1f} G -> fastest unit {flop / (best / 1e3) / 1e12:.3f} TFLOP/s")
    ratios = [r["ratio_vs_naive"] for r in results.values()]
    C.emit({"bench": "units", "device": device, "gpu": C.device_name(device) if cuda else None,
            "dtype": "bf16-autocast" if cuda else "fp32", "compile": args.compile, "quick": args.quick,
            "dim": args.dim, "ffn": args.ffn, "tokens": tokens, "batch": batch, "seq": seq,
            "repeats": repeats, "inner": inner, "alpha": ALPHA, "threads": torch.get_num_threads(),
            "load_avg": C.rnd(C.os.getloadavg()[0], 3),
            "median_ratio_vs_naive": C.rnd(sorted(ratios)[len(ratios) // 2]),
            "units": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
