"""One peak table and one FLOPs formula: MFU, the offer ranking and train's model agree."""

import pytest

from pagating import cost, flops
from pagating.config import load_config
from pagating.model import build_config, build_model
from pagating.tracking.callback import TrackingCallback

# NVML's spellings (nvidia-smi --query-gpu=name) of the GPUs the peak table must know (flops.PEAK_BF16_TFLOPS).
NVML = ["NVIDIA GeForce RTX 4090", "NVIDIA GeForce RTX 3090", "NVIDIA A100-SXM4-40GB", "NVIDIA A100-SXM4-80GB",
        "NVIDIA A100-PCIE-40GB", "NVIDIA A100 80GB PCIe", "NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe",
        "NVIDIA H200", "NVIDIA L4", "NVIDIA L40S", "NVIDIA RTX A6000"]


@pytest.fixture(autouse=True)
def _no_override(monkeypatch):
    monkeypatch.delenv("PAGATING_PEAK_TFLOPS", raising=False)


def test_table_has_the_nvml_names_and_mfu_and_offers_agree():
    for name in NVML:
        assert name in flops.PEAK_BF16_TFLOPS, name
        peak = flops.PEAK_BF16_TFLOPS[name]
        assert flops.mfu_peak_flops(name) == peak * 1e12 == cost.peak_tflops(name) * 1e12
    assert flops.peak_tflops("NVIDIA H100 80GB HBM3") > flops.peak_tflops("NVIDIA H100 PCIe")
    # Vast's market spellings land on the same rows.
    for market, name in (("RTX 4090", "NVIDIA GeForce RTX 4090"), ("RTX_3090", "NVIDIA GeForce RTX 3090"),
                         ("H100 SXM", "NVIDIA H100 80GB HBM3"), ("H100 PCIE", "NVIDIA H100 PCIe"),
                         ("A100 SXM4", "NVIDIA A100-SXM4-80GB"), ("L40S", "NVIDIA L40S"), ("H200", "NVIDIA H200")):
        assert cost.peak_tflops(market) == flops.peak_tflops(name) == flops.peak_tflops(market)


class _Spool:
    def __init__(self):
        self.lines = []

    def log(self, metrics, step):
        self.lines.append(dict(metrics))


@pytest.mark.parametrize("name, mfu", [("NVIDIA GeForce RTX 4090", True), ("NVIDIA B300 Future", False),
                                       ("RTX 40", False), ("cpu", False)])
def test_unknown_gpu_gives_no_mfu(name, mfu):
    """A GPU the table lacks logs no perf/mfu at all (not one against some other GPU's peak)."""
    assert (flops.mfu_peak_flops(name) is not None) == mfu
    spool = _Spool()
    cb = TrackingCallback(spool, None, {}, tokens_per_step=1024, flops_token=1e6, peak=flops.mfu_peak_flops(name))

    class State:
        global_step, is_world_process_zero = 0, True

    cb.on_train_begin(None, State, None)
    State.global_step = 5
    cb.on_log(None, State, None, logs={"loss": 3.0})
    assert ("perf/mfu" in spool.lines[-1]) == mfu and "perf/step_time_s" in spool.lines[-1]


@pytest.mark.parametrize("profile, unit, matched", [("sample", "paGLU", False), ("wikitext103", "paGLU", True),
                                                    ("wikitext103", "plain", False)])
def test_one_formula_counts_the_models_matmul_weights(profile, unit, matched):
    """flops_per_token is 6 x the weights a token multiplies (every matrix but the position table, the
    tied LM head once) + attention; the offer ranking's per-step figure is the same formula x tokens."""
    cfg = load_config(profile, {"model.unit": unit, "model.param_matched": matched})
    config = build_config(cfg["model"], vocab_size=flops.padded_vocab(cfg["data"]["vocab_size"]),
                          block_size=cfg["data"]["block_size"])
    model = build_model(config)
    matmul = sum(p.numel() for n, p in model.named_parameters() if p.ndim == 2 and "wpe" not in n)
    L, d, T = config.n_layer, config.n_embd, cfg["data"]["block_size"]
    expected = 6 * matmul + 12 * L * d * T
    assert flops.config_flops_per_token(cfg) == expected
    assert flops.flops_per_token(n_layer=L, n_embd=d, d_ff=config.d_ff, vocab_size=config.vocab_size,
                                 block_size=T, gated=not config.plain) == expected
    assert cost.flops_per_step(cfg) == expected * T * cfg["train"]["batch_size"]


def test_mfu_is_per_device_under_several_processes(monkeypatch):
    """Tokens per step are the global batch, so a run on N devices divides by N peaks; one device: the
    table's peak itself, as the offer ranking's single-GPU projection uses."""
    name = "NVIDIA H100 80GB HBM3"
    assert flops.run_peak_flops(name, 1) == flops.mfu_peak_flops(name) == cost.peak_tflops(name) * 1e12
    assert flops.run_peak_flops(name, 4) == 4 * flops.mfu_peak_flops(name)
    assert flops.run_peak_flops("cpu", 2) is None
    monkeypatch.setenv("PAGATING_PEAK_TFLOPS", "0.01")
    assert flops.run_peak_flops("cpu", 2) == 2 * 0.01e12
