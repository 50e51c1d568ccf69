"""The Trainer callback that feeds a run: Trainer logs -> the metric spool, step timing, MFU, GPU telemetry,
α, cost, and each checkpoint's marker + upload.

Why not transformers' MLflowCallback: it logs a pyfunc model per checkpoint and opens a new run on resume.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from pagating import names
from pagating.gpu import cpu_window
from pagating.tracking.checkpoints import CheckpointUploader, write_checkpoint_marker
from pagating.tracking.claim import Claim, ClaimLost
from pagating.tracking.provenance import write_run_file
from pagating.tracking.spool import MetricSpool


class _Callback:
    """The Trainer's callback protocol without importing transformers (which pulls in torch, ~5 s): this
    module and pagating.run stay light to import. Every event we do not handle is a no-op."""

    def __getattr__(self, name):
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)


class TrackingCallback(_Callback):
    """Trainer logs -> spool (the metric names README lists), step timing, MFU, GPU telemetry, α, cost,
    and checkpoint upload. Only the main process logs."""

    NAMES = {"loss": names.TRAIN_LOSS, "learning_rate": "train/lr", "grad_norm": "train/grad_norm",
             "eval_loss": names.EVAL_LOSS}

    def __init__(self, spool: MetricSpool, uploader: CheckpointUploader | None, run_info: dict,
                 tokens_per_step: int, flops_token: float, peak: float | None, sampler=None,
                 usd_per_hour: float | None = None, model=None, log_alpha: bool = False, cuda: bool = False,
                 compile_watch=None, claim: Claim | None = None):
        self.spool, self.uploader, self.run_info = spool, uploader, run_info
        self.claim = claim  # once it is lost, training stops at the next step, log or save
        self.tokens_per_step, self.flops_token, self.peak = tokens_per_step, flops_token, peak
        self.sampler, self.usd_per_hour, self.model = sampler, usd_per_hour, model
        self.log_alpha, self.cuda = log_alpha, cuda
        self.compile_watch = compile_watch  # pagating.runtime.CompileWatch when torch.compile is on
        self.t0: float | None = None
        self.step0 = 0
        self.c0 = 0.0
        self.started = time.time()

    def _sync(self) -> None:
        if self.cuda:
            import torch  # heavy: ~2 s to import; only a CUDA run gets here, with torch loaded already

            torch.cuda.synchronize()  # only at logging steps: the step loop itself never waits

    def _restart_window(self, state) -> None:
        self._sync()
        self.t0, self.step0 = time.perf_counter(), state.global_step
        self.c0 = self.compile_watch.seconds() if self.compile_watch is not None else 0.0

    def _fenced(self) -> None:
        if self.claim is not None and self.claim.lost:
            raise ClaimLost(self.claim.lost)

    def on_step_end(self, args, state, control, **kwargs):
        self._fenced()

    def on_train_begin(self, args, state, control, **kwargs):
        cpu_window()  # primes psutil: the first window's CPU figure then covers that window only
        self.started = time.time()
        self._restart_window(state)

    def on_evaluate(self, args, state, control, **kwargs):
        self._restart_window(state)  # evaluation time is not step time

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        self._fenced()
        step = state.global_step
        out = {name: logs[key] for key, name in self.NAMES.items() if key in logs}
        if "eval_loss" in logs:
            out[names.EVAL_PPL] = math.exp(min(logs["eval_loss"], 50.0))
        if "loss" in logs and self.t0 is not None and step > self.step0:
            self._sync()
            elapsed = time.perf_counter() - self.t0
            if self.compile_watch is not None:
                # Compiling is a one-off cost, not step time: it is logged apart, cumulative.
                compiled = self.compile_watch.seconds()
                elapsed -= min(compiled - self.c0, 0.99 * elapsed)
                out["perf/compile_time_s"] = compiled
                out["perf/recompiles"] = self.compile_watch.recompiles
            step_time = elapsed / (step - self.step0)
            out[names.STEP_TIME] = step_time
            out[names.TOKENS_PER_S] = self.tokens_per_step / step_time
            if self.peak:
                out[names.MFU] = self.flops_token * out[names.TOKENS_PER_S] / self.peak
            if self.sampler is not None:
                out.update(self.sampler.window())
            out.update(cpu_window())
            if self.log_alpha and self.model is not None:
                for i, a in enumerate(self.model.alphas()):
                    out[f"alpha/layer_{i:02d}"] = a
            if self.usd_per_hour:
                out[names.COST_USD] = self.usd_per_hour * (time.time() - self.started) / 3600.0
            self.spool.log(out, step)
            self._restart_window(state)
        else:
            self.spool.log(out, step)

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self._fenced()
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if ckpt.exists():
            write_run_file(ckpt, self.run_info)
            # The marker goes last, locally too: a resume never picks a save cut off midway.
            write_checkpoint_marker(ckpt, state.global_step, self.spool.written() if self.spool else 0)
            if self.uploader is not None:
                self.uploader.submit(ckpt, state.global_step)
        self._restart_window(state)  # saving time is not step time
