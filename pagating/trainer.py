"""The HF Trainer as this project uses it: its arguments from the config, our weight-decay rule, the
whole validation split for the last step's eval, and α driven by the optimizer step.

Imports transformers (and with it torch) at load: pagating.train imports this module only on the path
that trains, after runtime.passive_openmp.
"""

from __future__ import annotations

import sys
from pathlib import Path

from transformers import Trainer, TrainerCallback, TrainingArguments

from pagating.config import view


def no_decay(param) -> bool:
    """α, β, biases and norm weights are not decayed: decay on a 0-dim α pulls it toward a fixed value,
    and the 1-dim vectors are scales and offsets, not weights. Every matrix (ndim >= 2) is decayed."""
    return param.ndim < 2


class PaGatingTrainer(Trainer):
    """The HF Trainer with our decay rule in its own hook; `on_optimizer(groups)` hears the groups once."""

    on_optimizer = None
    final_eval_dataset = None  # the whole validation split, for the last step's eval

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        # Intermediate evals use the (possibly subset) eval_dataset; the last step's, which becomes the
        # run's final/eval_loss and the sweep's choice, always sees the whole split.
        if eval_dataset is None and self.final_eval_dataset is not None \
                and self.state.global_step >= self.state.max_steps > 0:
            eval_dataset = self.final_eval_dataset
        return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)

    def get_decay_parameter_names(self, model) -> list[str]:
        return [n for n, p in model.named_parameters() if not no_decay(p)]

    def create_optimizer(self, model=None):
        fresh = self.optimizer is None
        optimizer = super().create_optimizer(model)
        if fresh and self.on_optimizer is not None:
            names = {id(p): n for n, p in self.model.named_parameters()}
            self.on_optimizer([{"weight_decay": g["weight_decay"], "lr": g.get("lr"),
                                "params": sorted(names[id(p)] for p in g["params"])}
                               for g in optimizer.param_groups])
        return optimizer


def training_arguments(cfg: dict, run_dir: Path, device: str, compile_model: bool, world: int,
                       bf16: bool | None = None) -> TrainingArguments:
    """The Trainer's arguments for one run of `cfg` on `world` processes."""
    t = view(cfg).train
    cuda = device == "cuda"
    per_device = t.batch_size // world  # batch_size is the global batch, whatever the process count
    return TrainingArguments(
        output_dir=str(run_dir),
        max_steps=t.max_steps,
        per_device_train_batch_size=per_device,
        per_device_eval_batch_size=per_device,
        learning_rate=t.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        max_grad_norm=1.0,
        logging_steps=t.logging_steps,
        eval_strategy="steps",
        eval_steps=t.eval_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=2,  # bounded local disk; MLflow keeps two too (checkpoints/slot-0, slot-1)
        report_to="none",  # tracking is ours (pagating.tracking), not transformers' MLflowCallback
        seed=t.seed,
        data_seed=t.seed,
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
