"""One peak-FLOPs table and one FLOPs formula: logged MFU, the offer ranking and the report's projections
all read these, so they cannot disagree.

Peaks are dense BF16 tensor-core TFLOPS with FP32 accumulate (what torch autocast bf16 runs), without
sparsity, keyed by the exact name NVML reports (`nvidia-smi --query-gpu=name`). A name not in the table
has no peak: no MFU is logged rather than a wrong one.
"""

from __future__ import annotations

import os
import re

from pagating.config import is_plain, mlp_width, view

PEAK_BF16_TFLOPS: dict[str, float] = {
    # NVIDIA Ada Lovelace architecture whitepaper v1.1, appendix table: BF16 w/ FP32 acc. 165.2 (330.4 sparse)
    "NVIDIA GeForce RTX 4090": 165.2,
    # NVIDIA Ampere GA102 GPU architecture whitepaper v2.1, appendix: BF16 w/ FP32 acc. 71 (142 sparse)
    "NVIDIA GeForce RTX 3090": 71.0,
    # GA102 whitepaper / NVIDIA RTX A6000 datasheet: BF16 tensor 154.8 (309.7 sparse)
    "NVIDIA RTX A6000": 154.8,
    # NVIDIA A100 Tensor Core GPU datasheet: BFLOAT16 tensor core 312 (624 sparse), all four variants
    "NVIDIA A100-SXM4-40GB": 312.0,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-PCIE-40GB": 312.0,
    "NVIDIA A100 80GB PCIe": 312.0,
    # NVIDIA H100 Tensor Core GPU datasheet: BF16 1,979 (SXM) / 1,513 (PCIe) / 1,671 (NVL), all with
    # sparsity; dense is half (H100 architecture whitepaper: 989.4 SXM5, 756 PCIe)
    "NVIDIA H100 80GB HBM3": 989.4,
    "NVIDIA H100 PCIe": 756.0,
    "NVIDIA H100 NVL": 835.5,
    # NVIDIA H200 Tensor Core GPU datasheet: BF16 1,979 (SXM) / 1,671 (NVL) with sparsity
    "NVIDIA H200": 989.4,
    "NVIDIA H200 NVL": 835.5,
    # NVIDIA L4 datasheet: BF16 tensor core 242 with sparsity
    "NVIDIA L4": 121.0,
    # NVIDIA L40S datasheet: BF16 tensor core 362.05 (733 sparse)
    "NVIDIA L40S": 362.05,
    # NVIDIA L40 datasheet: BF16 tensor core 181.05 (362.1 sparse)
    "NVIDIA L40": 181.05,
    # NVIDIA A10 datasheet: BF16 tensor core 125 (250 sparse)
    "NVIDIA A10": 125.0,
}

# Market names (Vast.ai's `gpu_name`, e.g. "RTX 4090", "H100 SXM", "A100_PCIE") -> the NVML name above.
# Where the market name leaves the memory size open (A100), both sizes have the same peak.
MARKET_NAMES: dict[str, str] = {
    "rtx 4090": "NVIDIA GeForce RTX 4090",
    "rtx 3090": "NVIDIA GeForce RTX 3090",
    "rtx a6000": "NVIDIA RTX A6000",
    "a100 sxm4": "NVIDIA A100-SXM4-80GB",
    "a100 sxm": "NVIDIA A100-SXM4-80GB",
    "a100 pcie": "NVIDIA A100 80GB PCIe",
    "h100 sxm": "NVIDIA H100 80GB HBM3",
    "h100 sxm5": "NVIDIA H100 80GB HBM3",
    "h100 pcie": "NVIDIA H100 PCIe",
    "h100 nvl": "NVIDIA H100 NVL",
    "h200": "NVIDIA H200",
    "h200 nvl": "NVIDIA H200 NVL",
    "l4": "NVIDIA L4",
    "l40s": "NVIDIA L40S",
    "l40": "NVIDIA L40",
    "a10": "NVIDIA A10",
}


def _norm(name: str) -> str:
    words = re.sub(r"[_\-/]+", " ", name or "").lower().split()
    return " ".join(w for w in words if w not in ("nvidia", "geforce", "tesla"))


def nvml_name(name: str) -> str | None:
    """The table's NVML name for an NVML or market spelling; None when the GPU is not in the table."""
    if name in PEAK_BF16_TFLOPS:
        return name
    norm = _norm(name)
    for key in PEAK_BF16_TFLOPS:  # an NVML name with other spacing or case
        if _norm(key) == norm:
            return key
    return MARKET_NAMES.get(norm)


def peak_tflops(name: str) -> float | None:
    """Dense BF16 peak of a GPU (NVML or market name), TFLOPS; None when unknown."""
    key = nvml_name(name)
    return PEAK_BF16_TFLOPS[key] if key else None


def mfu_peak_flops(device_name: str) -> float | None:
    """FLOP/s that MFU divides by for the device a run uses: PAGATING_PEAK_TFLOPS when set (a GPU the
    table lacks, or tests), else the table; None (no MFU) for anything unknown."""
    if os.environ.get("PAGATING_PEAK_TFLOPS"):
        return float(os.environ["PAGATING_PEAK_TFLOPS"]) * 1e12
    peak = peak_tflops(device_name)
    return peak * 1e12 if peak else None


def run_peak_flops(device_name: str, world_size: int = 1) -> float | None:
    """The peak of all devices a run trains on (world size x one device's peak): MFU = achieved FLOP/s over
    it is the utilisation per device, whatever the process count; None when the device's peak is unknown."""
    peak = mfu_peak_flops(device_name)
    return peak * max(int(world_size), 1) if peak else None


def flops_per_token(*, n_layer: int, n_embd: int, d_ff: int, vocab_size: int, block_size: int,
                    gated: bool = True) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward): 6 x the matmul weights a token passes
    (attention q,k,v,o: 4d^2; the MLP: 3 d·d_ff gated (value, gate, out), 2 plain; the LM head V·d) plus
    12·L·d·T for attention scores and values (PaLM, appendix B)."""
    mlp = (3 if gated else 2) * n_embd * d_ff
    matmul_weights = n_layer * (4 * n_embd * n_embd + mlp) + vocab_size * n_embd
    return 6.0 * matmul_weights + 12.0 * n_layer * n_embd * block_size


def padded_vocab(vocab_size: int) -> int:
    """The model's vocabulary rows: a multiple of 64 (tensor-core friendly; pad rows are never targets)."""
    return -(-vocab_size // 64) * 64


def config_flops_per_token(cfg: dict) -> float:
    """flops_per_token of a params.yaml config (model + data sections), as train builds the model."""
    c = view(cfg)
    m = c.model
    return flops_per_token(n_layer=m.n_layer, n_embd=m.n_embd, d_ff=mlp_width(m.ffn_dim, m.param_matched, m.unit),
                           vocab_size=padded_vocab(c.data.vocab_size), block_size=c.data.block_size,
                           gated=not is_plain(m.unit))
