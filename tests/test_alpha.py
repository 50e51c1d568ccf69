"""α modes are a registry: each class alone decides parsing, start value, step update, logging, params and
report order, so a new mode (here a toy linear ramp) trains through the real Trainer path with no other edit."""

import os
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from mlflow.tracking import MlflowClient

from pagating import alpha
from pagating.alpha import MODES, Alpha, AlphaMode, parse_alpha_mode, register, sort_key


@dataclass(frozen=True)
class LinearRamp(AlphaMode):
    """The toy mode CONTRIBUTING.md describes: α goes linearly from 0.25 to 0.75 over max_steps."""

    name: ClassVar[str] = "linear_ramp"
    syntax: ClassVar[str] = "linear_ramp"
    order: ClassVar[int] = 3
    logged: ClassVar[bool] = True

    def initial(self, max_steps):
        return 0.25

    def at_step(self, step, max_steps):
        return 0.25 + 0.5 * min(step / max(max_steps, 1), 1.0)

    def params(self):
        return {"alpha.kind": self.name, "alpha.schedule": "linear, alpha 0.25 -> 0.75 over train.max_steps"}


@pytest.fixture
def linear_ramp():
    register(LinearRamp)
    yield LinearRamp
    MODES.pop(LinearRamp.name)


def test_builtin_modes_say_how_they_log_and_describe_themselves():
    static, learnable, cosine = (parse_alpha_mode(m) for m in ("static_0.3", "learnable", "scheduler_cosine"))
    assert [m.logged for m in (static, learnable, cosine)] == [False, True, True]
    assert static.params() == {"alpha.kind": "static"} and learnable.params() == {"alpha.kind": "learnable"}
    assert cosine.params()["alpha.schedule"].startswith("half cosine, alpha 0 at the first optimizer step -> 1")
    assert parse_alpha_mode("static_0.3") == parse_alpha_mode(0.3)  # a bare number is a static α


def test_cosine_alpha_is_exactly_one_at_the_last_optimizer_step_and_after():
    """The Trainer's callback order on a 60-step run: α is set at each step begin (global_step = steps done);
    the last step, the last eval after it, the test eval and the saved model (train end) all see α = 1."""
    from pagating.model import PaGatingGPT2Config, PaGatingGPT2LMHeadModel
    from pagating.trainer import AlphaCallback

    model = PaGatingGPT2LMHeadModel(PaGatingGPT2Config(n_layer=2, n_embd=16, n_head=2, ffn_dim=32, vocab_size=64,
                                                       n_positions=8, alpha_mode="scheduler_cosine",
                                                       alpha_max_steps=60))
    cb = AlphaCallback(model)

    class State:
        global_step = 0

    cb.on_train_begin(None, State, None)
    assert model.alphas() == [0.0, 0.0]  # the first step runs the value path alone
    seen = []
    for step in range(60):
        State.global_step = step
        cb.on_step_begin(None, State, None)
        seen.append(model.alphas()[0])
    assert seen[-1] == 1.0 and seen[-2] < 1.0  # exactly 1 at the last step, not 0.9993
    assert all(b > a for a, b in zip(seen, seen[1:], strict=False))
    State.global_step = 60  # the last eval runs here, before train end: α still the last step's
    assert model.alphas() == [1.0, 1.0]
    cb.on_train_end(None, State, None)  # the test eval and the saved model
    assert model.alphas() == [1.0, 1.0]
    assert alpha.cosine_alpha(0, 1) == 1.0  # a one-step run: that step is the last


def test_report_orders_static_by_value_then_learnable_then_scheduled_then_other_labels():
    labels = ["plain", "scheduler_cosine", "learnable", "static_1.0", "static_0.0", "static_0.5"]
    assert sorted(labels, key=sort_key) == ["static_0.0", "static_0.5", "static_1.0", "learnable",
                                            "scheduler_cosine", "plain"]


def test_a_registered_mode_is_parsed_listed_and_driven_by_the_step(linear_ramp):
    assert isinstance(parse_alpha_mode("linear_ramp"), LinearRamp)
    assert "linear_ramp" in alpha.choices()
    with pytest.raises(ValueError, match="valid alpha modes: .*learnable, scheduler_cosine, linear_ramp"):
        parse_alpha_mode("linear")
    a = Alpha("linear_ramp", max_steps=4)
    assert a.get().item() == 0.25 and "alpha" in dict(a.named_buffers())
    buf = a.get()
    a.set_step(2)
    assert a.get() is buf and a.get().item() == pytest.approx(0.5)  # in place: no recompile
    assert sorted(["linear_ramp", "scheduler_cosine", "plain"], key=sort_key) == [
        "scheduler_cosine", "linear_ramp", "plain"]


def test_unregistered_mode_is_refused_by_the_model_config():
    from pagating.model import PaGatingGPT2Config

    assert "linear_ramp" not in MODES
    with pytest.raises(ValueError, match="valid alpha modes"):
        PaGatingGPT2Config(alpha_mode="linear_ramp")


@pytest.mark.slow
def test_a_new_mode_trains_one_step_through_the_trainer(linear_ramp, sample_project, mlflow_server, tmp_path,
                                                        monkeypatch):
    from pagating.config import load_config
    from pagating.model import load_model
    from pagating.train import train

    monkeypatch.chdir(sample_project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    cfg = load_config("sample", {"train.alpha_mode": "linear_ramp", "train.max_steps": "1", "train.eval_steps": "1",
                                 "train.save_steps": "1", "train.logging_steps": "1", "train.batch_size": "2",
                                 "train.output_dir": str(tmp_path / "out")})
    result = train(cfg, device="cpu", compile_model="off", threads=1)
    assert result["status"] == "FINISHED"
    # In-process training (it logged an MLflow model) leaves no experiment exported to later children:
    # an `mlflow run` started afterwards by this process would otherwise open its run there.
    assert "MLFLOW_EXPERIMENT_ID" not in os.environ

    mlf = MlflowClient(mlflow_server.uri)
    run = mlf.get_run(result["run_id"])
    assert run.info.run_name.split()[1] == "linear_ramp"
    assert run.data.params["alpha.kind"] == "linear_ramp"
    assert run.data.params["alpha.schedule"] == "linear, alpha 0.25 -> 0.75 over train.max_steps"
    # `logged` made the run log α per layer; the step-0 value drove the one step.
    history = mlf.get_metric_history(run.info.run_id, "alpha/layer_00")
    assert [(m.step, m.value) for m in history] == [(1, 0.25)]
    # The Trainer's optimizer step reached at_step: the saved model ends at α(1 of 1 steps) = 0.75.
    model = load_model(f"{result['run_dir']}/model")
    assert model.alphas() == [0.75] * model.config.n_layer
    assert all(isinstance(u.alpha_module.mode, LinearRamp) for u in model.units())
    assert not any(isinstance(p, torch.nn.Parameter) and "alpha" in n for n, p in model.named_parameters())
