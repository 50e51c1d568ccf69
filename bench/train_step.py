"""Training-step speed: pagating GPT-2 (paGLU) against plain GPT-2 and the upstream paGating structure.

    .venv/bin/python bench/train_step.py [--quick] [--device auto|cpu|cuda] [--compile]
        [--configs tiny,gpt2-small] [--models pagating,plain,upstream] [--batch-size B] [--block-size T]
        [--warmup W] [--steps N]

One step = forward, loss, backward, grad-norm clip (1.0), AdamW step, zero_grad: what the Trainer does
per optimizer step. On CUDA: bf16 autocast, TF32, fused AdamW, torch.cuda.synchronize around each
timed step; `--compile` wraps each model in torch.compile (the warm-up steps absorb the compile).
The models of a config are built side by side and stepped round-robin (a, b, c, a, b, c, ...) after
the warm-up; each figure is the median over the timed steps.

  (a) pagating   pagating.model.PaGatingGPT2LMHeadModel, unit paGLU, α static 0.5, param-matched as the
                 profiles default (d_ff = 2/3 of 3072 = 2048, so parameters match (b)); --unmatched: d_ff 3072
  (b) plain      transformers GPT2LMHeadModel of the same dims (GELU MLP, d_ff 3072)
  (c) upstream   the structure paGating's own GPT-2 patch builds: c_fc (d -> 3072), then separate
                 3072x3072 value and gate Linears and the paGLU formula, then c_proj (this file only)

Prints a table per config and ends with one JSON line; for the GPT-2-small config (or the last config
run) its top level holds `step_time_ratio_vs_plain` (a/b s/step, lower is better) and
`speedup_vs_upstream` (a/c tokens/s, higher is better). MFU = flops_per_token · tokens/s / peak, with
pagating.tracking's FLOP count and GPU peak table (None where the peak is unknown, e.g. on CPU; set
PAGATING_PEAK_TFLOPS to give one).
"""

from __future__ import annotations

import gc
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402  (puts the repo root on sys.path too)

MODELS = ("pagating", "plain", "upstream")
GOALS = {"step_time_ratio_vs_plain_max": 1.10, "speedup_vs_upstream_min": 2.0,
         "seed_ms_per_step_max_4090": 25.0, "throughput_mfu_min_h100": 0.40}


def upstream_model(config):
    """GPT-2 with the MLP paGating's own patch puts in every block (a comparison baseline only)."""
    import torch
    from torch import nn
    from transformers import GPT2LMHeadModel

    class UpstreamMLP(nn.Module):
        def __init__(self, d_model: int, d_ff: int, alpha: float):
            super().__init__()
            self.c_fc = nn.Linear(d_model, d_ff)  # no activation after it, as in the patch
            self.value_proj = nn.Linear(d_ff, d_ff)  # the paGLU unit: d_ff -> d_ff, two separate Linears
            self.gate_proj = nn.Linear(d_ff, d_ff)
            self.alpha = alpha
            self.c_proj = nn.Linear(d_ff, d_model)

        def forward(self, x):
            h = self.c_fc(x)
            a, b = self.value_proj(h), self.gate_proj(h)
            return self.c_proj(a * (self.alpha * torch.sigmoid(b) + (1 - self.alpha)))

    model = GPT2LMHeadModel(config)
    for block in model.transformer.h:
        block.mlp = UpstreamMLP(config.n_embd, config.n_inner, 0.5)
        block.mlp.apply(model._init_weights)
    return model


def build(kind: str, dims: dict, block_size: int, matched: bool = True):
    from transformers import GPT2Config, GPT2LMHeadModel

    from pagating.model import PaGatingGPT2Config, PaGatingGPT2LMHeadModel

    common = dict(vocab_size=dims["vocab_size"], n_positions=max(block_size, dims["block_size"]),
                  n_embd=dims["n_embd"], n_layer=dims["n_layer"], n_head=dims["n_head"],
                  resid_pdrop=dims["dropout"], embd_pdrop=dims["dropout"], attn_pdrop=dims["dropout"],
                  bos_token_id=min(50256, dims["vocab_size"] - 1), eos_token_id=min(50256, dims["vocab_size"] - 1))
    if kind == "pagating":
        return PaGatingGPT2LMHeadModel(PaGatingGPT2Config(unit="paGLU", alpha_mode="static_0.5",
                                                          ffn_dim=dims["ffn_dim"], param_matched=matched, **common))
    config = GPT2Config(n_inner=dims["ffn_dim"], **common)
    return GPT2LMHeadModel(config) if kind == "plain" else upstream_model(config)


def make_step(model, device: str, batch: int, block: int, vocab: int, compile_model: bool, seed: int = 0):
    import torch

    from pagating.model import count_parameters

    n_params = count_parameters(model)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01,
                            **({"fused": True} if device == "cuda" else {}))
    fwd = torch.compile(model) if compile_model else model
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, block), generator=g).to(device)
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        with C.autocast(device):
            loss = fwd(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)  # no .item(): no host sync
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step, n_params


def run_config(dims: dict, batch: int, block: int, args, device: str, peak: float | None) -> dict:
    import torch

    from pagating.config import mlp_width
    from pagating.flops import flops_per_token

    torch.manual_seed(0)
    steps, n_params, build_s, attn = {}, {}, {}, set()
    for kind in args.models:
        t0 = time.perf_counter()
        model = build(kind, dims, block, matched=not args.unmatched)
        attn.add(model.config._attn_implementation)
        steps[kind], n_params[kind] = make_step(model, device, batch, block, dims["vocab_size"], args.compile)
        build_s[kind] = time.perf_counter() - t0
    # The first step of each (compile, allocator, lazy init) is timed on its own and reported.
    first = {}
    for kind, fn in steps.items():
        C.sync(device)
        t0 = time.perf_counter()
        fn()
        C.sync(device)
        first[kind] = time.perf_counter() - t0
    # On CUDA a few steps back to back per timed block, as in training, where the host queues the
    # next step's kernels while the GPU still runs the last one (no sync per step).
    inner = 5 if device == "cuda" and args.steps >= 10 else 1
    times, cpu = C.interleaved(steps, device, warmup=max(args.warmup - 1, 0), repeats=max(args.steps // inner, 1),
                               inner=inner)
    tokens = batch * block
    out: dict = {"batch_size": batch, "block_size": block, "tokens_per_step": tokens,
                 "timed_steps": max(args.steps // inner, 1) * inner, "steps_per_timed_block": inner,
                 "attn_implementation": ",".join(sorted(attn)),
                 "warmup_steps": args.warmup, **{k: dims[k] for k in ("n_layer", "n_head", "n_embd", "ffn_dim",
                                                                     "vocab_size")}}
    for kind in args.models:
        s = C.median(times[kind])
        d_ff = mlp_width(dims["ffn_dim"], kind == "pagating" and not args.unmatched, "paGLU")
        fpt = flops_per_token(n_layer=dims["n_layer"], n_embd=dims["n_embd"], d_ff=d_ff,
                              vocab_size=dims["vocab_size"], block_size=block, gated=kind != "plain")
        out[kind] = {"s_per_step": C.rnd(s), "tokens_per_s": C.rnd(tokens / s), "n_params": n_params[kind],
                     "d_ff": d_ff,
                     "min_s": C.rnd(min(times[kind])), "max_s": C.rnd(max(times[kind])),
                     "first_step_s": C.rnd(first[kind]), "build_s": C.rnd(build_s[kind]),
                     "tflops": C.rnd(fpt * tokens / s / 1e12),
                     "mfu": C.rnd(fpt * tokens / s / peak) if peak else None}
        if device == "cpu":
            out[kind]["cpu_s_per_step"] = C.rnd(C.median(cpu[kind]))
    if "pagating" in out and "plain" in out:
        out["step_time_ratio_vs_plain"] = C.rnd(out["pagating"]["s_per_step"] / out["plain"]["s_per_step"])
    if "pagating" in out and "upstream" in out:
        out["speedup_vs_upstream"] = C.rnd(out["pagating"]["tokens_per_s"] / out["upstream"]["tokens_per_s"])
    if device == "cpu":  # the same ratios in CPU seconds: steadier on a shared machine
        for key, other in (("step_time_ratio_vs_plain", "plain"), ("speedup_vs_upstream", "upstream")):
            if "pagating" in out and other in out:
                a, b = out["pagating"]["cpu_s_per_step"], out[other]["cpu_s_per_step"]
                out[key + "_cpu_s"] = C.rnd(a / b if other == "plain" else b / a)
    if device == "cuda":
        out["max_mem_gb"] = C.rnd(torch.cuda.max_memory_allocated() / 2**30)
    del steps
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return out


def main(argv: list[str] | None = None) -> int:
    p = C.base_parser(__doc__, "fewer steps; on CPU a smaller batch (same dims)")
    p.add_argument("--compile", action="store_true", help="torch.compile each model (meant for CUDA)")
    p.add_argument("--unmatched", action="store_true", help="pagating at d_ff = ffn_dim (more parameters than plain)")
    p.add_argument("--configs", default="tiny,gpt2-small", help=f"comma list of {', '.join(C.CONFIGS)}")
    p.add_argument("--models", default=",".join(MODELS), help="comma list of " + ", ".join(MODELS))
    p.add_argument("--batch-size", type=int, help="override the batch (default: 16; on CPU smaller)")
    p.add_argument("--block-size", type=int, help="override the block (sequence) length")
    p.add_argument("--warmup", type=int, help="untimed steps per model (default 10 CUDA, 2 CPU)")
    p.add_argument("--steps", type=int, help="timed steps per model (default 30 CUDA, 3 CPU)")
    args = p.parse_args(argv)

    import torch
    import transformers

    from pagating.flops import mfu_peak_flops as peak_flops

    transformers.logging.set_verbosity_error()
    device = C.pick_device(args.device)
    C.setup_device(device, args.threads)
    args.configs = [c for c in args.configs.split(",") if c]
    args.models = [m for m in args.models.split(",") if m]
    bad = [c for c in args.configs if c not in C.CONFIGS] + [m for m in args.models if m not in MODELS]
    if bad:
        p.error(f"unknown config/model {bad}; configs: {list(C.CONFIGS)}, models: {list(MODELS)}")
    cuda = device == "cuda"
    args.warmup = args.warmup if args.warmup is not None else (10 if cuda else 1 if args.quick else 2)
    args.steps = args.steps if args.steps is not None else ((10 if args.quick else 30) if cuda else
                                                            2 if args.quick else 3)
    name = C.device_name(device)
    peak = peak_flops(name) if cuda or C.os.environ.get("PAGATING_PEAK_TFLOPS") else None
    print(f"train_step: device {name}, torch {torch.__version__}, compile {args.compile}, "
          f"{'bf16 autocast + fused AdamW' if cuda else 'fp32'}, warm-up {args.warmup}, timed {args.steps}; "
          f"{C.load_note()}", flush=True)

    results = {}
    for cfg in args.configs:
        dims = C.CONFIGS[cfg]
        batch, block = dims["batch_size"], dims["block_size"]
        if not cuda and cfg != "tiny":
            # A GPT-2-small step at batch 16 x 128 is ~1.9 TFLOP: tens of seconds on a small CPU. Same
            # dims, batch 2, so the bench stays around two minutes (and ~10 GB of RAM for the three
            # models with their AdamW state). --quick only checks that everything runs: 2 of the 12
            # layers at batch 1 x 32 (building and stepping the 350M-parameter upstream model at full
            # depth takes about a minute here).
            batch, block = (1, 32) if args.quick else (2, block)
            if args.quick:
                dims = {**dims, "n_layer": 2}
        r = run_config(dims, args.batch_size or batch, args.block_size or block, args, device, peak)
        results[cfg] = r
        print(f"\n[{cfg}] {r['n_layer']}L {r['n_embd']}d ff{r['ffn_dim']} vocab {r['vocab_size']}, "
              f"batch {r['batch_size']} x {r['block_size']}, median of {args.steps} steps")
        rows = [[k, r[k]["s_per_step"] * 1e3, r[k]["tokens_per_s"], r[k]["n_params"] / 1e6, r[k]["tflops"],
                 r[k]["mfu"], r[k]["first_step_s"]] for k in args.models]
        C.print_table(rows, ["model", "ms/step", "tokens/s", "Mparams", "TFLOP/s", "MFU", "first step s"])
        for key in ("step_time_ratio_vs_plain", "speedup_vs_upstream"):
            if key in r:
                print(f"{key}: {r[key]}")

    head = results.get("gpt2-small") or results[args.configs[-1]]
    figures = {"bench": "train_step", "device": device, "gpu": name if cuda else None, "compile": args.compile,
               "quick": args.quick, "dtype": "bf16-autocast" if cuda else "fp32", "param_matched": not args.unmatched,
               "peak_tflops": C.rnd(peak / 1e12) if peak else None,
               "headline_config": "gpt2-small" if "gpt2-small" in results else args.configs[-1],
               "step_time_ratio_vs_plain": head.get("step_time_ratio_vs_plain"),
               "speedup_vs_upstream": head.get("speedup_vs_upstream"),
               "threads": torch.get_num_threads(), "load_avg": C.rnd(C.os.getloadavg()[0], 3),
               "max_rss_gb": C.rnd(C.max_rss_gb(), 3) if not cuda else None,
               "goals": GOALS, "configs": results}
    C.emit(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
