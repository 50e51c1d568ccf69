"""One training run: the HF Trainer on packed blocks, one MLflow run, checkpoints, resume.

Read top to bottom: check the input, find what to resume, open the MLflow run, build the model and
data, train, save `model/`, close the run. Everything a user can get wrong is checked before the
MLflow run exists.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

import yaml

from pagating.config import UserError, add_config_args, config_from_args, config_hash, flatten
from pagating.runtime import passive_openmp

passive_openmp()  # before transformers pulls in torch: OpenMP reads its wait policy once, at load

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


def newest_checkpoint(run_dir: Path, run_id: str | None = None) -> Path | None:
    """The newest whole local checkpoint (its marker's sizes and hashes match) of run_id, if given;
    a cut-off or corrupt one is named in one line and skipped."""
    from pagating import tracking

    ckpts = sorted((p for p in run_dir.glob("checkpoint-*") if p.name.rsplit("-", 1)[-1].isdigit()),
                   key=tracking.checkpoint_step, reverse=True)
    for ckpt in ckpts:
        info = tracking.read_run_file(ckpt) or {}
        if run_id and info.get("run_id") not in (None, run_id):
            continue  # another run's leftovers in a reused folder
        problem = tracking.verify_checkpoint(ckpt)
        if problem is None:
            return ckpt
        print(f"pagating: skipping checkpoint {ckpt}: {problem}", file=sys.stderr)
    return None


def unfinished_runs(mlf, exp_id: str, h: str) -> list:
    from pagating import tracking

    return [r for r in tracking.runs_with_hash(mlf, exp_id, h) if r.info.status != "FINISHED"]


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
    """(checkpoint dir, MLflow run id) to continue, or (None, None) for a fresh run.

    An unfinished run of this config (its claim is ours by now) is always continued, whatever
    `resume` says: one run per config. `auto` insists on a checkpoint; `if-any`/`none` start over
    under the same run id when there is none (steps already logged are skipped)."""
    from pagating import tracking

    unfinished = unfinished_runs(mlf, exp_id, h)
    if resume not in ("none", "", None, "auto", "if-any"):
        ckpt = Path(resume)
        if not (ckpt / "trainer_state.json").exists():
            raise UserError(f"{ckpt} is not a Trainer checkpoint (no trainer_state.json)")
        if (ckpt / tracking.CKPT_MARKER).exists() and tracking.verify_checkpoint(ckpt):
            raise UserError(f"checkpoint {ckpt} is corrupt ({tracking.verify_checkpoint(ckpt)}): pick another one")
        info = tracking.read_run_file(ckpt) or tracking.read_run_file(run_dir) or {}
        return ckpt, info.get("run_id")
    if resume in ("none", "", None) and not unfinished:
        return None, None
    for run in unfinished:  # newest first: local copy, else the MLflow one
        rid = run.info.run_id
        ckpt = newest_checkpoint(run_dir, rid) or tracking.download_checkpoint(mlf, rid, run_dir)
        if ckpt is not None:
            return ckpt, rid
    if resume == "auto":
        ckpt = newest_checkpoint(run_dir)
        if ckpt is not None:  # a local checkpoint whose run is not in this experiment / server
            return ckpt, (tracking.read_run_file(ckpt) or {}).get("run_id")
        raise UserError(f"nothing to resume: no checkpoint in {run_dir} and no unfinished MLflow run of this "
                        f"config (hash {h}) uploaded one; run without --resume to start fresh")
    return None, (unfinished[0].info.run_id if unfinished else None)


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
        warmup_steps=int(t["warmup_steps"]),
        weight_decay=float(t["weight_decay"]),
        max_grad_norm=1.0,
        logging_steps=int(t["logging_steps"]),
        eval_strategy="steps",
        eval_steps=int(t["eval_steps"]),
        save_strategy="steps",
        save_steps=int(t["save_steps"]),
        save_total_limit=2,  # bounded local disk; MLflow keeps two too (checkpoints/slot-0, slot-1)
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
          threads: int | None = None, if_claimed: str = "exit") -> dict[str, Any]:
    """Run one config; returns {"run_id", "status", "run_dir", "final_eval_loss", ...}.

    if_claimed: what to do when a live process already trains this config: "exit" (UserError,
    exit 2) or "skip" (status "claimed", for the sweep, which comes back to it later)."""
    from pagating import runtime, tracking
    from pagating.data import check_prepared

    # 1. Input checks: nothing is written before these pass.
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    validate(cfg, world)
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
    claim = None
    if rank == 0:
        done = _finished_run(mlf, exp_id, h)
        if done is not None:
            return done | {"run_dir": str(run_dir)}
        if resume == "auto" and not unfinished_runs(mlf, exp_id, h) and not any(run_dir.glob("checkpoint-*")):
            raise UserError(f"nothing to resume: no checkpoint in {run_dir} and no unfinished MLflow run of this "
                            f"config (hash {h}); run without --resume to start fresh")
        # 1b. One process per config: claim it in MLflow before anything is trained or written.
        claim = tracking.Claim.for_config(mlf, exp_id, h, cfg["tracking"])
        held = claim.acquire()
        if held is not None:
            if if_claimed == "skip":
                return {"status": "claimed", "config_hash": h, "run_id": held.get("run_id"), "run_dir": str(run_dir)}
            raise UserError(f"this config (hash {h}) is already being trained by "
                            f"{tracking.describe_claim(held, claim.timeout_s)}: wait for it, or stop that process")
        done = _finished_run(mlf, exp_id, h)  # finished while we were claiming
        if done is not None:
            claim.release()
            return done | {"run_dir": str(run_dir)}
    try:
        return _train_claimed(cfg, resume=resume, device=device, compile_model=compile_model,
                              parent_run_id=parent_run_id, sweep_id=sweep_id, extra_tags=extra_tags, rank=rank,
                              world=world, meta=meta, uri=uri, h=h, run_dir=run_dir, mlf=mlf, exp_id=exp_id,
                              claim=claim, precision=precision, n_threads=n_threads)
    finally:
        if claim is not None:
            claim.release()


def _train_claimed(cfg: dict, *, resume, device, compile_model, parent_run_id, sweep_id, extra_tags, rank, world,
                   meta, uri, h, run_dir, mlf, exp_id, claim, precision, n_threads) -> dict[str, Any]:
    """train() once this process holds the config's claim (rank 0) or is a DDP worker."""
    from pagating import runtime, tracking
    from pagating.data import data_md5

    t, m = cfg["train"], cfg["model"]
    if rank == 0:
        ckpt, run_id = find_resume(cfg, resume, run_dir, mlf, exp_id, h)
    else:  # a DDP worker follows what the launcher resolved (rank 0 may be creating the run right now)
        ckpt, run_id = (Path(resume) if resume not in ("none", "", None, "auto", "if-any") else None), None
    if rank == 0 and run_id and not ckpt:
        print(f"pagating: continuing interrupted run {run_id} from step 0 (no whole checkpoint of it)", file=sys.stderr)
    if rank == 0 and run_id and (run_dir / tracking.PENDING_FILE).exists():
        # Trained to the end, but the server was away for the final uploads: finish those only.
        left = tracking.sync(run_dir, timeout_s=float(cfg["tracking"]["drain_timeout_s"]))
        return {"run_id": run_id, "run_dir": str(run_dir), "config_hash": h,
                "status": "FINISHED" if not left else "KILLED", "synced": True}

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
    model = build_model(config, init=m["init"])
    n_params = count_parameters(model)
    spec = parse_alpha_mode(t["alpha_mode"])
    eval_pick = eval_indices(int(meta["splits"]["validation"]["blocks"]),
                             int(t["max_eval_batches"]) * int(t["batch_size"]))
    compile_on = compile_model == "on" or (compile_model == "auto" and device == "cuda")
    dev_name = gpu_name() if device == "cuda" else device
    usd_per_hour = float(os.environ["PAGATING_USD_PER_HOUR"]) if os.environ.get("PAGATING_USD_PER_HOUR") else None
    if rank == 0:
        check_disk(run_dir, n_params)

    # 3. The MLflow run: new, or the interrupted one continued under the same id.
    skip: dict[str, int] = {}
    if rank == 0:
        if run_id:
            mlf.update_run(run_id, status="RUNNING")
            # Lines the interrupted process spooled but never sent go first; only then is "already
            # logged" known, and the resumed run skips exactly those steps.
            leftover = tracking.MetricSpool(tracking.spool_path(run_dir, run_id), run_id, uri)
            if leftover.pending():
                leftover.drain(120.0)
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
        claim.start_heartbeat(run_id)

    spool = tracking.MetricSpool(tracking.spool_path(run_dir, run_id), run_id, uri, skip_until=skip).start() \
        if rank == 0 else None
    uploader = tracking.CheckpointUploader(run_id, uri, run_dir / tracking.STAGING_DIR, spool) if rank == 0 else None
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
        log_alpha=spec.logged, cuda=device == "cuda",
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

        # 5. Train (the Trainer restores optimizer, LR schedule, RNG and data order on resume). The
        # Trainer itself evaluates at the last step; a checkpoint of the last step trains nothing more.
        if ckpt is not None and _checkpoint_global_step(ckpt) >= int(t["max_steps"]):
            from transformers import TrainerState

            trainer._load_from_checkpoint(str(ckpt))
            trainer.state = TrainerState.load_from_json(str(Path(ckpt) / "trainer_state.json"))
        else:
            trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
        # The test split, once, on the final weights.
        test = trainer.evaluate(PackedDataset(cfg["data"]["prepared_dir"], "test"), metric_key_prefix="test")

        # 6. Summary metrics and the final model (uploaded in step 7, with the server's time).
        if rank == 0:
            evals = [e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e]
            final = evals[-1]
            spool.log({"best/eval_loss": min(evals), "final/eval_loss": final,
                       "final/eval_ppl": math.exp(min(final, 50.0)), "test/loss": test["test_loss"],
                       "test/ppl": math.exp(min(test["test_loss"], 50.0))}, trainer.state.global_step)
            model_dir = run_dir / "model"
            trainer.save_model(str(model_dir))
            model_step = trainer.state.global_step
            result.update(final_eval_loss=final, best_eval_loss=min(evals), first_eval_loss=evals[0],
                          test_loss=test["test_loss"])
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except (OSError, RuntimeError) as exc:
        if not _disk_full(exc, run_dir):
            raise
        raise UserError(f"disk full in {Path(run_dir).absolute()}: free space there (or set train.output_dir "
                        f"elsewhere) and resume with --resume auto") from None
    finally:
        if cb.compile_watch is not None:
            cb.compile_watch.close()
        if sampler is not None:
            sampler.stop()
        if rank == 0:
            # 7. Last metrics, last checkpoint, model/, status: waiting for the server as long as the drain
            # budget allows; past it everything stays in run_dir for `pagating sync`.
            budget = float(cfg["tracking"]["drain_timeout_s"]) if status == "FINISHED" else 5.0
            local, model_id = tracking.finish_run(
                mlf, run_id, run_dir, status, spool, uploader, model_dir if status == "FINISHED" else None,
                model_step if status == "FINISHED" else 0, budget, float(cfg["tracking"]["retry_max_s"]))
            if model_id:
                result["model_id"] = model_id
            spool.close()
            uploader.close()
            if local:
                result["pending_sync"] = local
                print(f"pagating: MLflow did not answer within {budget:.0f}s: {', '.join(local)} of run {run_id} "
                      f"still only in {run_dir}; `pagating sync {run_dir}` will push them and finish the run",
                      file=sys.stderr)
    result["status"] = status
    return result


def _meta_digest(meta: dict) -> str:
    """Without data.dvc: a digest of the raw files' md5s that prepare recorded."""
    import hashlib

    return hashlib.md5(json.dumps(meta.get("source_md5", {}), sort_keys=True).encode()).hexdigest()


# Bytes per parameter on disk: fp32 weights (4) + Adam's two moments (8) per checkpoint, two kept by
# save_total_limit plus the one being written, and model/ (4).
DISK_BYTES_PER_PARAM = 3 * 12 + 4


def check_disk(run_dir: Path, n_params: int) -> None:
    """Refuse to start when the output folder's disk cannot hold the run's checkpoints and model."""
    import shutil

    where = Path(run_dir).absolute()
    while not where.exists():
        where = where.parent
    need, free = DISK_BYTES_PER_PARAM * n_params, shutil.disk_usage(where).free
    if free < need:
        raise UserError(f"not enough disk space in {where}: the run needs about {need / 2**20:.0f} MiB for "
                        f"checkpoints and model, {free / 2**20:.0f} MiB are free; free some or set train.output_dir "
                        f"elsewhere")


def _disk_full(exc: BaseException, run_dir: Path) -> bool:
    # torch.save reports ENOSPC as a RuntimeError ("basic_ios::clear: iostream error"), so the disk
    # itself is asked too.
    import shutil

    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    try:
        return shutil.disk_usage(run_dir).free < 64 * 2**20
    except OSError:
        return False


def _checkpoint_global_step(ckpt: Path) -> int:
    return int(json.loads((Path(ckpt) / "trainer_state.json").read_text()).get("global_step", 0))


def _finished_run(mlf, exp_id: str, h: str) -> dict | None:
    """A FINISHED run of this config: the result to report instead of training it again."""
    from pagating import tracking

    done = [r for r in tracking.runs_with_hash(mlf, exp_id, h) if r.info.status == "FINISHED"]
    if not done:
        return None
    run = done[0]
    print(f"pagating: this config (hash {h}) already FINISHED as run {run.info.run_id}: nothing to do",
          file=sys.stderr)
    return {"run_id": run.info.run_id, "config_hash": h, "status": "FINISHED", "already_finished": True,
            "final_eval_loss": run.data.metrics.get("final/eval_loss")}


def _log_params(mlf, run_id, cfg, spec, n_params, config, device, world, vocab, extra=None) -> None:
    from mlflow.entities import Param

    params = flatten(cfg)
    params.update(extra or {})
    params.update({"model.d_ff": config.d_ff, "model.n_params": n_params, "model.vocab_size": vocab,
                   "train.device": device, "train.world_size": world,
                   **({"alpha.kind": "none (plain GPT-2 MLP)"} if config.plain else spec.params())})
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
    """An argparse type where "" means "not given" (an empty MLproject parameter)."""
    def parse(text: str):
        return None if text == "" else kind(text)
    parse.__name__ = kind.__name__
    return parse


def add_train_args(p: argparse.ArgumentParser) -> None:
    from pagating.alpha import choices as alpha_choices

    # --profile, --set and the seed's flags (--alpha_mode, --learning_rate, ...) come from pagating/config.py;
    # the α modes' help from their registry.
    add_config_args(p, "train", helps={"train.alpha_mode": alpha_choices(" | ")})
    p.add_argument("--resume_from_checkpoint", "--resume-from-checkpoint", help="a checkpoint folder")
    p.add_argument("--resume", default="none",
                   help="none | auto (local checkpoint, else MLflow; error if none) | if-any | a checkpoint path")
    p.add_argument("--nproc", type=int, default=1,
                   help="processes (GPUs) for one run: torchrun + the Trainer's DDP; batch_size stays global")
    p.add_argument("--parent-run-id", help=argparse.SUPPRESS)  # set by the sweep
    p.add_argument("--sweep-id", help=argparse.SUPPRESS)
    p.add_argument("--if-claimed", default="exit", choices=["exit", "skip"], help=argparse.SUPPRESS)  # sweep: skip
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"])
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                   help="torch.compile (auto: on for CUDA)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="bf16 autocast or fp32 (auto: bf16 on a CUDA GPU that has it)")
    p.add_argument("--threads", type=_opt(int),
                   help="torch CPU threads (default: OMP_NUM_THREADS, else this process's share of the cores, "
                        "no more than are idle at its start)")


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
    h = config_hash(cfg, meta.get("source_md5", ""))
    exp_id = tracking.experiment_id(mlf, cfg)  # a new sqlite store is created here once, not by N ranks at once
    done = _finished_run(mlf, exp_id, h)  # decided here: N processes must all train or none
    if done is not None:
        print(json.dumps(done | {"run_dir": str(run_dir_for(cfg, h))}, default=str))
        return 0
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
    from pagating.runtime import SHARE_ENV, explicit_threads, thread_share

    env = dict(os.environ)
    if not explicit_threads():  # torchrun would set 1 per process; each process gets its share instead
        env["OMP_NUM_THREADS"] = env[SHARE_ENV] = str(thread_share(args.nproc))
    return subprocess.call(cmd, env=env)


def cli_train(args) -> int:
    cfg = config_from_args(args)
    resume = args.resume_from_checkpoint or args.resume or "none"
    if args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        return launch_ddp(args, cfg, resume)
    result = train(cfg, resume=resume, device=args.device, compile_model=args.compile,
                   parent_run_id=args.parent_run_id, sweep_id=args.sweep_id, precision=args.precision,
                   threads=args.threads, if_claimed=args.if_claimed)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result, default=str))
    return 0 if result["status"] in ("FINISHED", "claimed") else 1


def register_cli(sub) -> None:
    p = sub.add_parser("train", help="one tracked training run (HF Trainer + MLflow)")
    add_train_args(p)
    p.set_defaults(func=cli_train)
