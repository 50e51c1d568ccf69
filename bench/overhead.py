"""Tracking overhead: real Trainer runs with pagating's tracking on against the same runs with it off.

    .venv/bin/python bench/overhead.py [--quick] [--device auto|cpu|cuda] [--config tiny|gpt2-small]
        [--steps N] [--save-steps N] [--logging-steps N] [--repeats N]

"on" wires the pieces exactly as pagating.train.train does: an MLflow run in a local `sqlite:///`
store (temp dir), the MetricSpool with its flusher thread, the CheckpointUploader uploading every
checkpoint in the background, the GpuSampler (NVML; nothing to sample without a GPU), and the
TrackingCallback. "off" is the same Trainer with no callback of ours; both save checkpoints locally
every --save-steps. Data: random token blocks (packed, no padding; the datasets package is not used).

After one warm-up run of each, the timed runs alternate off/on in an ABBA order; the figure is
median(trainer.train() seconds, on) / median(off) (goal <= 1.02). `tail_s` is what the on-case
spends after training (waiting for the last upload, draining the spool), reported apart. Ends with
one JSON line. Without mlflow installed the on-case is skipped (and said so).
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402  (puts the repo root on sys.path too)

GOAL = 1.02


class RandomBlocks:
    """A packed dataset of random token blocks: {"input_ids", "labels"} per item, like PackedDataset."""

    def __init__(self, n: int, block: int, vocab: int, seed: int = 0):
        import torch

        g = torch.Generator().manual_seed(seed)
        self.data = torch.randint(0, vocab, (n, block), generator=g)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):
        return {"input_ids": self.data[i], "labels": self.data[i]}


def training_args(out_dir: Path, a, device: str):
    """pagating.train's TrainingArguments, less evaluation (the same in both cases)."""
    from transformers import TrainingArguments

    cuda = device == "cuda"
    return TrainingArguments(
        output_dir=str(out_dir), max_steps=a.steps, per_device_train_batch_size=a.batch_size,
        learning_rate=1e-3, lr_scheduler_type="cosine", warmup_steps=min(10, a.steps // 10), weight_decay=0.01,
        max_grad_norm=1.0, logging_steps=a.logging_steps, eval_strategy="no", save_strategy="steps",
        save_steps=a.save_steps, save_total_limit=2, report_to="none", seed=42, data_seed=42, bf16=cuda,
        tf32=cuda or None, optim="adamw_torch_fused" if cuda else "adamw_torch", dataloader_pin_memory=cuda,
        dataloader_num_workers=2 if cuda else 0, use_cpu=device == "cpu", disable_tqdm=True,
        logging_nan_inf_filter=False)


def build_model(dims: dict):
    from transformers import set_seed

    from pagating.model import PaGatingGPT2Config, PaGatingGPT2LMHeadModel

    set_seed(42)
    return PaGatingGPT2LMHeadModel(PaGatingGPT2Config(
        unit="paGLU", alpha_mode="static_0.5", ffn_dim=dims["ffn_dim"], vocab_size=dims["vocab_size"],
        n_positions=dims["block_size"], n_embd=dims["n_embd"], n_layer=dims["n_layer"], n_head=dims["n_head"],
        resid_pdrop=dims["dropout"], embd_pdrop=dims["dropout"], attn_pdrop=dims["dropout"],
        bos_token_id=dims["vocab_size"] - 1, eos_token_id=dims["vocab_size"] - 1))


class Tracked:
    """The on-case's pieces for one run, set up and torn down as pagating.train.train does."""

    def __init__(self, uri: str, exp_id: str, run_dir: Path, model, dims: dict, a, device: str, label: str):
        from pagating import flops
        from pagating.gpu import GpuSampler
        from pagating.tracking import callback, checkpoints, claim, provenance, spool, store

        self.mlf = store.client(uri)
        run = self.mlf.create_run(exp_id, run_name=f"overhead {label}",
                                  tags={"pagating.config_hash": "bench", "host": claim.host_tag()})
        self.run_id = run.info.run_id
        info = {"run_id": self.run_id, "experiment_id": exp_id, "config_hash": "bench",
                "tracking_uri": store.mask_uri(uri)}
        provenance.write_run_file(run_dir, info)
        self.spool = spool.MetricSpool(spool.spool_path(run_dir, self.run_id), self.run_id, uri).start()
        self.uploader = checkpoints.CheckpointUploader(self.run_id, uri, run_dir / ".upload-staging", self.spool)
        self.sampler = GpuSampler()
        self.sampler.start()
        cuda = device == "cuda"
        name = C.device_name(device)
        self.callback = callback.TrackingCallback(
            self.spool, self.uploader, info, tokens_per_step=a.batch_size * dims["block_size"],
            flops_token=flops.flops_per_token(n_layer=dims["n_layer"], n_embd=dims["n_embd"], d_ff=dims["ffn_dim"],
                                              vocab_size=dims["vocab_size"], block_size=dims["block_size"]),
            peak=flops.mfu_peak_flops(name) if cuda or os.environ.get("PAGATING_PEAK_TFLOPS") else None,
            sampler=self.sampler, model=model, log_alpha=False, cuda=cuda)

    def finish(self, drain_s: float = 60.0) -> dict:
        self.sampler.stop()
        uploaded = self.uploader.wait(drain_s)
        left = self.spool.drain(drain_s)
        self.spool.close()
        self.uploader.close()
        self.mlf.set_terminated(self.run_id, "FINISHED")
        return {"uploaded_all": uploaded, "uploaded_step": self.uploader.uploaded_step, "spool_left": left,
                "metric_lines": self.spool.sent(), "upload_error": self.uploader.last_error}


def run_once(tracked: bool, a, dims: dict, device: str, root: Path, store: dict | None, label: str) -> dict:
    import torch
    from transformers import Trainer, default_data_collator
    from transformers.trainer_callback import PrinterCallback

    run_dir = root / label
    model = build_model(dims)
    data = RandomBlocks(a.steps * a.batch_size, dims["block_size"], dims["vocab_size"])
    tr = Tracked(store["uri"], store["exp_id"], run_dir, model, dims, a, device, label) if tracked else None
    trainer = Trainer(model=model, args=training_args(run_dir, a, device), train_dataset=data,
                      data_collator=default_data_collator, callbacks=[tr.callback] if tr else [])
    trainer.remove_callback(PrinterCallback)  # its log lines would bury the figures (same in both cases)
    C.sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    trainer.train()
    C.sync(device)
    out = {"train_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}
    if tr is not None:
        t1 = time.perf_counter()
        out.update(tr.finish())
        out["tail_s"] = time.perf_counter() - t1
    del trainer, model
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> int:
    p = C.base_parser(__doc__, "short runs, one timed run per case")
    p.add_argument("--config", default="tiny", choices=list(C.CONFIGS))
    p.add_argument("--batch-size", type=int)
    p.add_argument("--steps", type=int, help="optimizer steps per run (default 200, 20 with --quick)")
    p.add_argument("--save-steps", type=int, help="checkpoint every N steps (default 50, 10 with --quick)")
    p.add_argument("--logging-steps", type=int, default=10)
    p.add_argument("--repeats", type=int, help="timed runs per case (default 3, 1 with --quick)")
    a = p.parse_args(argv)

    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    logging.getLogger("pagating").setLevel(logging.ERROR)  # "no NVIDIA GPU" once per run on CPU
    device = C.pick_device(a.device)
    C.setup_device(device, a.threads)
    dims = C.CONFIGS[a.config]
    a.batch_size = a.batch_size or dims["batch_size"]
    a.steps = a.steps or (20 if a.quick else 200)
    a.save_steps = a.save_steps or (10 if a.quick else 50)
    a.repeats = a.repeats or (1 if a.quick else 3)

    try:
        import mlflow  # noqa: F401
        skipped = None
    except ImportError:
        skipped = "mlflow is not installed: the tracking (on) case is skipped; only the off case runs"
        print(f"overhead: {skipped}", flush=True)
    print(f"overhead: device {C.device_name(device)}, {a.config} model, batch {a.batch_size} x "
          f"{dims['block_size']}, {a.steps} steps, log every {a.logging_steps}, save every {a.save_steps}, "
          f"{a.repeats} timed runs per case; {C.load_note()}", flush=True)

    results: dict[str, list[dict]] = {"off": [], "on": []}
    with tempfile.TemporaryDirectory(prefix="pagating-overhead-") as tmp:
        root = Path(tmp)
        store = None
        if not skipped:
            from pagating.tracking import store as tracking_store

            uri = f"sqlite:///{root / 'mlflow.db'}"
            t0 = time.perf_counter()
            mlf = tracking_store.client(uri)
            exp_id = mlf.create_experiment("bench-overhead", artifact_location=(root / "artifacts").as_uri())
            store = {"uri": uri, "exp_id": exp_id}
            print(f"mlflow store {uri} ready in {time.perf_counter() - t0:.1f} s", flush=True)
        cases = ["off"] if skipped else ["off", "on"]
        # Warm-up: lazy imports, allocator, the store's first writes.
        for case in cases:
            run_once(case == "on", a, dims, device, root, store, f"warmup-{case}")
        order = []
        for i in range(a.repeats):
            order += cases if i % 2 == 0 else cases[::-1]  # ABBA: neither case always goes first
        for n, case in enumerate(order):
            r = run_once(case == "on", a, dims, device, root, store, f"{case}-{n}")
            results[case].append(r)
            extra = (f", tail {r['tail_s']:.2f} s, {r['metric_lines']} metric lines, checkpoint step "
                     f"{r['uploaded_step']} uploaded") if case == "on" else ""
            print(f"  {case:>3}: train {r['train_s']:.2f} s ({r['cpu_s']:.2f} CPU s){extra}", flush=True)

    off = C.median([r["train_s"] for r in results["off"]])
    figures = {"bench": "overhead", "device": device, "config": a.config, "batch_size": a.batch_size,
               "block_size": dims["block_size"], "steps": a.steps, "save_steps": a.save_steps,
               "logging_steps": a.logging_steps, "repeats": a.repeats, "quick": a.quick,
               "off_train_s": C.rnd(off), "off_s_per_step": C.rnd(off / a.steps), "goal_ratio_max": GOAL,
               "skipped": skipped, "threads": torch.get_num_threads(), "load_avg": C.rnd(os.getloadavg()[0], 3)}
    if results["on"]:
        on = C.median([r["train_s"] for r in results["on"]])
        cpu_on = C.median([r["cpu_s"] for r in results["on"]])
        cpu_off = C.median([r["cpu_s"] for r in results["off"]])
        last = results["on"][-1]
        figures.update({
            "on_train_s": C.rnd(on), "on_s_per_step": C.rnd(on / a.steps),
            "ratio": C.rnd(on / off), "cpu_ratio": C.rnd(cpu_on / cpu_off),
            "meets_goal": on / off <= GOAL,
            "tail_s": C.rnd(C.median([r["tail_s"] for r in results["on"]])),
            "uploaded_step": last["uploaded_step"], "metric_lines": last["metric_lines"],
            "upload_error": last["upload_error"], "spool_left": last["spool_left"]})
        print(f"\ntracking on/off: {figures['ratio']} (train wall time, median of {a.repeats}; goal <= {GOAL}); "
              f"CPU time {figures['cpu_ratio']}; {figures['on_s_per_step'] * 1e3:.1f} vs "
              f"{figures['off_s_per_step'] * 1e3:.1f} ms/step; tail after training {figures['tail_s']} s")
    else:
        figures.update({"on_train_s": None, "ratio": None, "cpu_ratio": None, "meets_goal": None})
        print(f"\noff case only: {off:.2f} s for {a.steps} steps")
    C.emit(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
