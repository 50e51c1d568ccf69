"""One training run: the HF Trainer on packed blocks, one MLflow run, checkpoints, resume.

Read top to bottom: check the input, find what to resume, open the MLflow run, build the model and
data, train, save `model/`, close the run. Everything a user can get wrong is checked before the
MLflow run exists.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

import yaml

from pagating.config import UserError, config_hash, flatten, load_config, parse_sets
from pagating.runtime import passive_openmp

passive_openmp()  # before transformers pulls in torch: OpenMP reads its wait policy once, at load

# Seed flag -> params.yaml key. The seed's spellings (underscores) are the canonical flags.
FLAG_KEYS = {
    "alpha_mode": "train.alpha_mode", "learning_rate": "train.learning_rate", "batch_size": "train.batch_size",
    "max_steps": "train.max_steps", "output_dir": "train.output_dir", "seed": "train.seed",
    "eval_steps": "train.eval_steps", "save_steps": "train.save_steps", "logging_steps": "train.logging_steps",
    "warmup_steps": "train.warmup_steps", "unit": "model.unit",
}


def validate(cfg: dict, world: int = 1) -> None:
    """Every check of a run's settings; `world` is the number of training processes."""
    from pagating.alpha import parse_alpha_mode
    from pagating.units import check_unit

    t = cfg["train"]
    try:
        parse_alpha_mode(t["alpha_mode"])
        check_unit(cfg["model"]["unit"])
    except ValueError as exc:
        raise UserError(str(exc)) from None
    for key in ("learning_rate", "batch_size", "max_steps", "eval_steps", "save_steps", "logging_steps"):
        value = t.get(key)
        if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
            raise UserError(f"train.{key} must be a number > 0, got {value!r}")
    for key in ("batch_size", "max_steps", "eval_steps", "save_steps", "logging_steps"):
        if int(t[key]) != t[key]:
            raise UserError(f"train.{key} must be a whole number, got {t[key]!r}")
    if int(t["batch_size"]) % world:
        raise UserError(f"train.batch_size {t['batch_size']} is the global batch: it must divide by {world} processes")


def run_name(cfg: dict) -> str:
    if str(cfg["model"]["unit"]).lower() == "plain":  # GPT-2's own MLP: no α
        return f"plain lr={cfg['train']['learning_rate']:g}"
    return f"{cfg['model']['unit']} {cfg['train']['alpha_mode']} lr={cfg['train']['learning_rate']:g}"


def run_dir_for(cfg: dict, h: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9_.=-]+", "_", run_name(cfg).replace(" ", "_"))
    return Path(cfg["train"]["output_dir"]) / f"{slug}_{h[:8]}"


def pick_device(requested: str = "auto") -> str:
    import torch

    if requested != "auto":
        if requested == "cuda" and not torch.cuda.is_available():
            raise UserError("--device cuda asked but no CUDA GPU is visible; use --device auto or cpu")
        return requested
    if torch.cuda.is_available():
        return "cuda"
    from pagating.instance import check_cuda

    ok, line = check_cuda()  # a rented GPU box (PAGATING_CUDA_GPUS) must not train on CPU
    if not ok:
        raise UserError(line)
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"  # the seed's Mac
    return "cpu"


def newest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = [p for p in run_dir.glob("checkpoint-*") if (p / "trainer_state.json").exists()]
    return max(ckpts, key=lambda p: int(p.name.split("-")[-1]), default=None)


def eval_indices(n_blocks: int, max_blocks: int = 0) -> list[int]:
    """The eval blocks of a split: all of them, or `max_blocks` spread over the whole split (the middle
    block of each of `max_blocks` equal stretches), the same set every time, so α-to-α differences are
    measured on the split rather than on its first pages."""
    if max_blocks <= 0 or max_blocks >= n_blocks:
        return list(range(n_blocks))
    return [(2 * i + 1) * n_blocks // (2 * max_blocks) for i in range(max_blocks)]


def no_decay(name: str, param) -> bool:
    """α, β, biases and norm weights are not decayed: decay on a 0-dim α pulls it toward a fixed value,
    and the 1-dim vectors are scales and offsets, not weights. Every matrix (ndim >= 2) is decayed."""
    return param.ndim < 2


def _make_trainer_class():
    from transformers import Trainer

    class PaGatingTrainer(Trainer):
        """The HF Trainer with our decay rule in its own hook; `on_optimizer(groups)` hears the groups once."""

        on_optimizer = None

        def get_decay_parameter_names(self, model) -> list[str]:
            return [n for n, p in model.named_parameters() if not no_decay(n, p)]

        def create_optimizer(self, model=None):
            fresh = self.optimizer is None
            optimizer = super().create_optimizer(model)
            if fresh and self.on_optimizer is not None:
                names = {id(p): n for n, p in self.model.named_parameters()}
                self.on_optimizer([{"weight_decay": g["weight_decay"], "lr": g.get("lr"),
                                    "params": sorted(names[id(p)] for p in g["params"])}
                                   for g in optimizer.param_groups])
            return optimizer

    return PaGatingTrainer


def find_resume(cfg: dict, resume: str, run_dir: Path, mlf, exp_id: str, h: str) -> tuple[Path | None, str | None]:
    """(checkpoint dir, MLflow run id) to continue, or (None, None) for a fresh run."""
    from pagating import tracking

    if resume in ("none", "", None):
        return None, None
    if resume == "if-any":  # the sweep: continue an interrupted run of this config, else start fresh
        try:
            return find_resume(cfg, "auto", run_dir, mlf, exp_id, h)
        except UserError:
            # Interrupted before its first checkpoint: start over under the same run id (metric
            # steps already logged are skipped), so the config never has two runs.
            unfinished = [r for r in tracking.runs_with_hash(mlf, exp_id, h) if r.info.status != "FINISHED"]
            return None, (unfinished[0].info.run_id if unfinished else None)
    if resume != "auto":
        ckpt = Path(resume)
        if not (ckpt / "trainer_state.json").exists():
            raise UserError(f"{ckpt} is not a Trainer checkpoint (no trainer_state.json)")
        info = tracking.read_run_file(ckpt) or tracking.read_run_file(run_dir) or {}
        return ckpt, info.get("run_id")
    ckpt = newest_checkpoint(run_dir)
    if ckpt is not None:
        info = tracking.read_run_file(ckpt) or tracking.read_run_file(run_dir) or {}
        return ckpt, info.get("run_id")
    # Nothing local (a new machine): the newest run of this config that uploaded a checkpoint.
    for run in tracking.runs_with_hash(mlf, exp_id, h):
        if run.info.status == "FINISHED":
            continue
        ckpt = tracking.download_checkpoint(mlf, run.info.run_id, run_dir)
        if ckpt is not None:
            return ckpt, run.info.run_id
    raise UserError(f"nothing to resume: no checkpoint in {run_dir} and no unfinished MLflow run of this "
                    f"config (hash {h}) uploaded one; run without --resume to start fresh")


def _training_arguments(cfg: dict, run_dir: Path, device: str, compile_model: bool, world: int,
                        bf16: bool | None = None):
    from transformers import TrainingArguments

    t = cfg["train"]
    cuda = device == "cuda"
    per_device = int(t["batch_size"]) // world  # batch_size is the global batch, whatever the process count
    return TrainingArguments(
        output_dir=str(run_dir),
        max_steps=int(t["max_steps"]),
        per_device_train_batch_size=per_device,
        per_device_eval_batch_size=per_device,
        learning_rate=float(t["learning_rate"]),
        lr_scheduler_type="cosine",
        warmup_steps=int(t.get("warmup_steps", 0)),
        weight_decay=float(t.get("weight_decay", 0.0)),
        max_grad_norm=1.0,
        logging_steps=int(t["logging_steps"]),
        eval_strategy="steps",
        eval_steps=int(t["eval_steps"]),
        save_strategy="steps",
        save_steps=int(t["save_steps"]),
        save_total_limit=2,  # bounded local disk; MLflow keeps only checkpoints/latest
        report_to="none",  # tracking is ours (pagating.tracking), not transformers' MLflowCallback
        seed=int(t["seed"]),
        data_seed=int(t["seed"]),
        bf16=cuda if bf16 is None else bf16,  # autocast (CPU too), weights stay fp32
        tf32=cuda or None,
        optim="adamw_torch_fused" if cuda else "adamw_torch",
        torch_compile=compile_model,
        dataloader_pin_memory=cuda,
        dataloader_num_workers=2 if cuda else 0,
        use_cpu=device == "cpu",
        disable_tqdm=not sys.stderr.isatty(),
        logging_nan_inf_filter=False,
    )


def train(cfg: dict, *, resume: str = "none", device: str = "auto", compile_model: str = "auto",
          parent_run_id: str | None = None, sweep_id: str | None = None,
          extra_tags: dict[str, str] | None = None, precision: str = "auto",
          threads: int | None = None) -> dict[str, Any]:
    """Run one config; returns {"run_id", "status", "run_dir", "final_eval_loss", ...}."""
    from pagating import runtime, tracking
    from pagating.data import check_prepared, data_md5

    # 1. Input checks: nothing is written before these pass.
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    validate(cfg, world)
    t, m = cfg["train"], cfg["model"]
    meta = check_prepared(cfg)  # made from this config, else exit 2 naming the fix
    uri = tracking.tracking_uri(cfg)
    tracking.check_server(uri)
    h = config_hash(cfg, meta.get("source_md5", ""))
    run_dir = run_dir_for(cfg, h)
    device = pick_device(device)
    precision = runtime.resolve_precision(precision, device)
    n_threads = runtime.set_threads(threads)
    mlf = tracking.client(uri)
    # Started by `mlflow run`: that run is our parent when it is in the profile's experiment, so the UI
    # nests them; one `mlflow run` put elsewhere (Default) only points to the run (tracking.adopt_launcher).
    launcher = None if parent_run_id else os.environ.get("MLFLOW_RUN_ID")
    if parent_run_id:
        exp_id = mlf.get_run(parent_run_id).info.experiment_id
    else:
        exp_id = tracking.experiment_id(mlf, cfg)
        if launcher and tracking.adopt_launcher(mlf, launcher, exp_id):
            parent_run_id = launcher
            if rank == 0:
                mlf.set_tag(launcher, "mlflow.runName", f"mlflow run: {run_name(cfg)}")
    ckpt, run_id = find_resume(cfg, resume, run_dir, mlf, exp_id, h)

    import torch
    from transformers import default_data_collator, set_seed

    from pagating import flops
    from pagating.alpha import parse_alpha_mode
    from pagating.data import PackedDataset, load_tokenizer
    from pagating.gpu import GpuSampler, gpu_name
    from pagating.model import build_config, build_model, count_parameters

    # 2. The model (deterministic for a seed) and its numbers.
    set_seed(int(t["seed"]))
    vocab = flops.padded_vocab(meta["vocab_size"])  # tensor-core friendly vocabulary (pad rows unused)
    config = build_config(m, vocab_size=vocab, block_size=meta["block_size"], alpha_mode=t["alpha_mode"],
                          max_steps=int(t["max_steps"]), eos_token_id=meta.get("eos_id"),
                          bos_token_id=meta.get("eos_id"))
    model = build_model(config, init=m.get("init", "scratch"))
    n_params = count_parameters(model)
    spec = parse_alpha_mode(t["alpha_mode"])
    eval_pick = eval_indices(int(meta["splits"]["validation"]["blocks"]),
                             int(t.get("max_eval_batches") or 0) * int(t["batch_size"]))
    compile_on = compile_model == "on" or (compile_model == "auto" and device == "cuda")
    dev_name = gpu_name() if device == "cuda" else device
    usd_per_hour = float(os.environ["PAGATING_USD_PER_HOUR"]) if os.environ.get("PAGATING_USD_PER_HOUR") else None

    # 3. The MLflow run: new, or the interrupted one continued under the same id.
    skip: dict[str, int] = {}
    if rank == 0:
        if run_id:
            mlf.update_run(run_id, status="RUNNING")
            # Lines the interrupted process spooled but never sent go first; only then is "already
            # logged" known, and the resumed run skips exactly those steps.
            leftover = tracking.MetricSpool(tracking.spool_path(run_dir, run_id), run_id, uri)
            if leftover.pending():
                leftover.drain(float(cfg["tracking"].get("drain_timeout_s", 60)))
            leftover.close()
            skip = tracking.last_steps(mlf, run_id)
        else:
            tags = {"pagating.config_hash": h, "git.commit": tracking.git_commit(),
                    "dvc.data_md5": data_md5(), "gpu.name": dev_name, "host": tracking.host_tag(),
                    "mlflow.runName": run_name(cfg), **tracking.source_tags("train"),
                    "mlflow.note.content": tracking.run_note(
                        cfg, tracking.reproduce_command(cfg, tracking.git_commit()), n_params),
                    **(extra_tags or {})}
            if sweep_id:
                tags["pagating.sweep_id"] = sweep_id
            if parent_run_id:
                tags["mlflow.parentRunId"] = parent_run_id
            if usd_per_hour:
                tags["cost.usd_per_hour"] = f"{usd_per_hour:g}"
            if os.environ.get("CUDA_VISIBLE_DEVICES"):  # which GPU(s) of the box: the sweep's slot
                tags["gpu.visible_devices"] = os.environ["CUDA_VISIBLE_DEVICES"]
            run = mlf.create_run(exp_id, run_name=run_name(cfg), tags=tags)
            run_id = run.info.run_id
            _log_params(mlf, run_id, cfg, spec, n_params, config, device, world, vocab,
                        {"eval.blocks": len(eval_pick), "eval.tokens": len(eval_pick) * int(meta["block_size"]),
                         "test.tokens": int(meta["splits"]["test"]["tokens_packed"]),
                         "train.precision": precision, "train.compile": "on" if compile_on else "off",
                         "train.threads": n_threads})
            tracking.log_datasets(mlf, run_id, cfg["profile"], data_md5() or _meta_digest(meta),
                                  tracking.dvc_data_source(path=cfg["data"]["raw_dir"]))
    info = {"run_id": run_id, "experiment_id": exp_id, "config_hash": h,
            "tracking_uri": tracking.mask_uri(uri)}
    if rank == 0:
        tracking.write_run_file(run_dir, info)

    spool = tracking.MetricSpool(tracking.spool_path(run_dir, run_id), run_id, uri, skip_until=skip).start() \
        if rank == 0 else None
    uploader = tracking.CheckpointUploader(run_id, uri, run_dir / ".upload-staging", spool) if rank == 0 else None
    # NVML sees the GPUs of CUDA_VISIBLE_DEVICES; without any it says so once and logs no system/gpu_* metric.
    sampler = GpuSampler() if rank == 0 else None
    if sampler is not None:
        sampler.start()
    cb = tracking.TrackingCallback(
        spool, uploader, info, tokens_per_step=int(t["batch_size"]) * meta["block_size"],
        flops_token=flops.flops_per_token(n_layer=config.n_layer, n_embd=config.n_embd, d_ff=config.d_ff,
                                          vocab_size=vocab, block_size=meta["block_size"], gated=not config.plain),
        # The one peak table, by the NVML name; a GPU it lacks gets no MFU rather than a wrong one.
        peak=flops.mfu_peak_flops(dev_name) if device == "cuda" or os.environ.get("PAGATING_PEAK_TFLOPS") else None,
        sampler=sampler, usd_per_hour=usd_per_hour, model=model,
        log_alpha=spec.kind in ("learnable", "scheduler_cosine"), cuda=device == "cuda",
        compile_watch=runtime.CompileWatch() if compile_on else None)

    status = "FAILED"
    result: dict[str, Any] = {"run_id": run_id, "run_dir": str(run_dir), "config_hash": h}
    try:
        # 4. Data and the Trainer.
        train_ds = PackedDataset(cfg["data"]["prepared_dir"], "train")
        eval_ds = torch.utils.data.Subset(PackedDataset(cfg["data"]["prepared_dir"], "validation"), eval_pick)
        tokenizer = load_tokenizer(cfg["data"]["prepared_dir"])
        args = _training_arguments(cfg, run_dir, device, compile_on, world, bf16=precision == "bf16")
        trainer = _make_trainer_class()(model=model, args=args,
                          train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer,
                          data_collator=default_data_collator,  # blocks are packed: never pad
                          callbacks=[AlphaCallback(model), cb] if rank == 0 else [AlphaCallback(model)])
        if rank == 0:
            trainer.on_optimizer = lambda groups: tracking.retry(
                lambda: mlf.log_text(run_id, json.dumps(groups, indent=1), "optimizer_groups.json"),
                "upload optimizer_groups.json")
            result["resumed_from"] = str(ckpt) if ckpt else None
            print(f"pagating: {run_name(cfg)} -> run {run_id} ({'resumed from ' + str(ckpt) if ckpt else 'new'}),"
                  f" {n_params:,} params, {device}, output {run_dir}\n"
                  f"pagating: run page {tracking.run_url(uri, exp_id, run_id)}", file=sys.stderr)

        # 5. Train (the Trainer restores optimizer, LR schedule, RNG and data order on resume).
        trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
        if trainer.state.global_step % int(t["eval_steps"]) != 0:
            trainer.evaluate()
        # The test split, once, on the final weights.
        test = trainer.evaluate(PackedDataset(cfg["data"]["prepared_dir"], "test"), metric_key_prefix="test")

        # 6. Summary metrics and the final model.
        if rank == 0:
            evals = [e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e]
            final = evals[-1]
            spool.log({"best/eval_loss": min(evals), "final/eval_loss": final,
                       "final/eval_ppl": math.exp(min(final, 50.0)), "test/loss": test["test_loss"],
                       "test/ppl": math.exp(min(test["test_loss"], 50.0))}, trainer.state.global_step)
            model_dir = run_dir / "model"
            trainer.save_model(str(model_dir))
            step = trainer.state.global_step
            written = spool.written()

            def log_final_model():
                spool.flush_until(written)  # the final metrics first: MLflow links those at `step` to the model
                return tracking.log_model(uri, run_id, model_dir, step)

            result["model_id"] = tracking.retry(log_final_model, "log the model")
            result.update(final_eval_loss=final, best_eval_loss=min(evals), first_eval_loss=evals[0],
                          test_loss=test["test_loss"])
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if cb.compile_watch is not None:
            cb.compile_watch.close()
        if sampler is not None:
            sampler.stop()
        if rank == 0:
            drain_s = float(cfg["tracking"].get("drain_timeout_s", 60))
            if uploader is not None and not uploader.wait(drain_s if status == "FINISHED" else 5):
                print(f"pagating: checkpoint upload unfinished ({uploader.last_error})", file=sys.stderr)
            left = spool.drain(drain_s)
            spool.close()
            if left:
                print(f"pagating: {left} metric lines not yet in MLflow ({spool.last_error}); they are kept in "
                      f"{spool.path}: run `pagating sync {run_dir}` when the server is back", file=sys.stderr)
            try:
                tracking.retry(lambda: mlf.set_terminated(run_id, status), f"mark the run {status}", attempts=5)
            except Exception as exc:  # the run stays RUNNING; resume/sweep treat it as interrupted
                print(f"pagating: could not mark run {status}: {type(exc).__name__}", file=sys.stderr)
    result["status"] = status
    return result


def _meta_digest(meta: dict) -> str:
    """Without data.dvc: a digest of the raw files' md5s that prepare recorded."""
    import hashlib

    return hashlib.md5(json.dumps(meta.get("source_md5", {}), sort_keys=True).encode()).hexdigest()


def _log_params(mlf, run_id, cfg, spec, n_params, config, device, world, vocab, extra=None) -> None:
    from mlflow.entities import Param

    params = flatten(cfg)
    params.update(extra or {})
    params.update({"model.d_ff": config.d_ff, "model.n_params": n_params, "model.vocab_size": vocab,
                   "train.device": device, "train.world_size": world,
                   "alpha.kind": "none (plain GPT-2 MLP)" if config.plain else spec.kind})
    if spec.kind == "scheduler_cosine" and not config.plain:
        params["alpha.schedule"] = "half cosine, alpha 0 -> 1 over train.max_steps (optimizer steps)"
    items = [Param(k, str(v)) for k, v in sorted(params.items())]
    for i in range(0, len(items), 100):
        mlf.log_batch(run_id, params=items[i:i + 100])
    mlf.log_text(run_id, yaml.safe_dump({k: v for k, v in cfg.items()}, sort_keys=False), "params.yaml")


try:
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover
    TrainerCallback = object


class AlphaCallback(TrainerCallback):
    """Drives scheduled α by the optimizer step; on resume the restored global_step restores α."""

    def __init__(self, model):
        self.model = model

    def on_train_begin(self, args, state, control, **kwargs):
        self.model.set_alpha_step(state.global_step)

    def on_step_begin(self, args, state, control, **kwargs):
        self.model.set_alpha_step(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        self.model.set_alpha_step(state.global_step)


# CLI ------------------------------------------------------------------------------------------

def _opt(kind):
    """An argparse type where "" means "not given": MLproject passes its empty defaults through."""
    def parse(text: str):
        return None if text == "" else kind(text)
    parse.__name__ = kind.__name__
    return parse


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", help="params.yaml profile (default: params.yaml's `profile`)")
    g = p.add_argument_group("seed flags")
    g.add_argument("--alpha_mode", "--alpha-mode", help="static_<a> | learnable | scheduler_cosine")
    g.add_argument("--learning_rate", "--learning-rate", type=_opt(float))
    g.add_argument("--batch_size", "--batch-size", type=_opt(int))
    g.add_argument("--max_steps", "--max-steps", type=_opt(int))
    g.add_argument("--output_dir", "--output-dir", help="base folder; each run gets a subfolder")
    g.add_argument("--resume_from_checkpoint", "--resume-from-checkpoint", help="a checkpoint folder")
    p.add_argument("--unit", help="paGLU | paGTU | paSwishU | paReGLU | paGELU | paMishU | paSiLU")
    p.add_argument("--seed", type=_opt(int))
    p.add_argument("--eval_steps", "--eval-steps", type=_opt(int))
    p.add_argument("--save_steps", "--save-steps", type=_opt(int))
    p.add_argument("--logging_steps", "--logging-steps", type=_opt(int))
    p.add_argument("--warmup_steps", "--warmup-steps", type=_opt(int))
    p.add_argument("--resume", default="none",
                   help="none | auto (local checkpoint, else MLflow; error if none) | if-any | a checkpoint path")
    p.add_argument("--nproc", type=int, default=1,
                   help="processes (GPUs) for one run: torchrun + the Trainer's DDP; batch_size stays global")
    p.add_argument("--parent-run-id", help=argparse.SUPPRESS)  # set by the sweep
    p.add_argument("--sweep-id", help=argparse.SUPPRESS)
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"])
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                   help="torch.compile (auto: on for CUDA)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="bf16 autocast or fp32 (auto: bf16 on a CUDA GPU that has it)")
    p.add_argument("--threads", type=_opt(int),
                   help="torch CPU threads (default: OMP_NUM_THREADS, else this process's share of the cores)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any params.yaml value, e.g. --set model.ffn_dim=512")


def config_from_args(args) -> dict:
    overrides = {key: getattr(args, flag) for flag, key in FLAG_KEYS.items()
                 if getattr(args, flag, None) not in (None, "")}
    overrides.update(parse_sets(args.set))
    return load_config(args.profile or None, overrides)


def launch_ddp(args, cfg: dict, resume: str) -> int:
    """`--nproc N`: the same command under torchrun (the Trainer's DDP), one MLflow run from rank 0.

    Resume is resolved here, once, so N processes never download the same checkpoint at once.
    """
    import subprocess

    from pagating import tracking
    from pagating.data import check_prepared

    validate(cfg, args.nproc)
    meta = check_prepared(cfg)  # made from this config, else exit 2 naming the fix
    uri = tracking.tracking_uri(cfg)
    tracking.check_server(uri)
    mlf = tracking.client(uri)
    exp_id = tracking.experiment_id(mlf, cfg)  # a new sqlite store is created here once, not by N ranks at once
    if resume not in ("none", ""):
        h = config_hash(cfg, meta.get("source_md5", ""))
        ckpt, _ = find_resume(cfg, resume, run_dir_for(cfg, h), mlf, exp_id, h)
        resume = str(ckpt) if ckpt else "none"
    argv = list(args.argv)
    cut = argv.index("--nproc")
    del argv[cut:cut + 2]
    for flag in ("--resume", "--resume_from_checkpoint", "--resume-from-checkpoint"):
        while flag in argv:
            i = argv.index(flag)
            del argv[i:i + 2]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
           "-m", "pagating.cli", *argv, "--resume", resume]
    from pagating.runtime import explicit_threads, thread_share

    env = dict(os.environ)
    if not explicit_threads():  # torchrun would set 1 per process; each process gets its share instead
        env["OMP_NUM_THREADS"] = str(thread_share(args.nproc))
    return subprocess.call(cmd, env=env)


def cli_train(args) -> int:
    cfg = config_from_args(args)
    resume = args.resume_from_checkpoint or args.resume or "none"
    if args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        return launch_ddp(args, cfg, resume)
    result = train(cfg, resume=resume, device=args.device, compile_model=args.compile,
                   parent_run_id=args.parent_run_id, sweep_id=args.sweep_id, precision=args.precision,
                   threads=args.threads)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result, default=str))
    return 0 if result["status"] == "FINISHED" else 1


def register_cli(sub) -> None:
    p = sub.add_parser("train", help="one tracked training run (HF Trainer + MLflow)")
    add_train_args(p)
    p.set_defaults(func=cli_train)
