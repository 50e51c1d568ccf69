"""GPT-2 whose every block's MLP is `dropout(c_proj(unit(x)))` with a paGating unit (d_model -> d_ff).

The model is a transformers GPT2LMHeadModel subclass with its own config type, registered with the
Auto classes, so `save_pretrained(dir)` + `AutoModelForCausalLM.from_pretrained(dir)` (after
`import pagating.model`) or `load_model(dir)` round-trips it, and `generate()` works unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel
from transformers import initialization as hf_init

from pagating.alpha import Alpha, parse_alpha_mode
from pagating.config import defaults, is_plain, mlp_width
from pagating.units import PaGatingBase, check_unit, get_unit, paSwishU


class PaGatingGPT2Config(GPT2Config):
    model_type = "pagating-gpt2"

    def __init__(self, unit: str = "paGLU", alpha_mode: str = "static_0.5", ffn_dim: int = 3072,
                 param_matched: bool = False, alpha_max_steps: int = 1, fused_unit: bool = False, **kwargs):
        super().__init__(**kwargs)
        check_unit(unit)  # validate early: ValueError naming the choices
        parse_alpha_mode(alpha_mode)
        self.unit = unit
        self.alpha_mode = alpha_mode
        self.ffn_dim = int(ffn_dim)
        self.param_matched = bool(param_matched)
        self.alpha_max_steps = int(alpha_max_steps)  # scheduler_cosine reaches α=1 at this step
        self.fused_unit = bool(fused_unit)
        if self.plain:
            self.n_inner = self.ffn_dim  # GPT2MLP's width

    @property
    def plain(self) -> bool:
        """unit `plain`: GPT-2's own GELU MLP, the baseline (α and param_matching do not apply)."""
        return is_plain(self.unit)

    @property
    def d_ff(self) -> int:
        return mlp_width(self.ffn_dim, self.param_matched, self.unit)


class PaGatingMLP(nn.Module):
    def __init__(self, config: PaGatingGPT2Config):
        super().__init__()
        self.unit = get_unit(config.unit)(config.n_embd, config.d_ff, alpha=config.alpha_mode,
                                          max_steps=config.alpha_max_steps, fused=config.fused_unit)
        self.dropout = nn.Dropout(config.resid_pdrop)
        self.c_proj = nn.Linear(config.d_ff, config.n_embd)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.unit(hidden_states)))  # dropout after c_proj, as GPT2MLP


class PaGatingGPT2LMHeadModel(GPT2LMHeadModel):
    config_class = PaGatingGPT2Config

    def __init__(self, config: PaGatingGPT2Config):
        super().__init__(config)
        # Declare the causal-LM loss: transformers infers it from the class name, which finds none in
        # "...LMHeadModel", and the Trainer then divides the summed loss by all T labels of a block
        # instead of the T-1 predicted ones (num_items_in_batch), under-reporting loss by (T-1)/T.
        self.loss_type = "ForCausalLM"
        if config.plain:
            return  # GPT2Block's own GPT2MLP (width n_inner = ffn_dim), initialised by GPT-2's post_init
        for block in self.transformer.h:
            block.mlp = PaGatingMLP(config)
            # Direct apply: post_init would dispatch the transformer subtree to GPT2Model's own
            # _init_weights, which knows nothing of these modules.
            block.mlp.apply(self._init_weights)

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, PaGatingMLP):
            # GPT-2's scaled init of residual projections (1/sqrt(2 * n_layer)), as for GPT2MLP.c_proj.
            std = self.config.initializer_range / math.sqrt(2 * self.config.n_layer)
            hf_init.normal_(module.c_proj.weight, mean=0.0, std=std)
        elif isinstance(module, Alpha) and module.mode is not None:
            hf_init.constant_(module.raw, module.mode.initial(module.max_steps))
        elif isinstance(module, paSwishU) and isinstance(module.beta, nn.Parameter):
            hf_init.constant_(module.beta, module.beta_init)

    # α bookkeeping used by the training callbacks -------------------------------------------
    def units(self) -> list[PaGatingBase]:
        return [] if self.config.plain else [block.mlp.unit for block in self.transformer.h]

    def set_alpha_step(self, step: int) -> None:
        for unit in self.units():
            unit.set_step(step)

    @torch.no_grad()
    def alphas(self) -> list[float]:
        return [float(unit.get_alpha()) for unit in self.units()]


AutoConfig.register(PaGatingGPT2Config.model_type, PaGatingGPT2Config)
AutoModelForCausalLM.register(PaGatingGPT2Config, PaGatingGPT2LMHeadModel)


def build_config(model_cfg: dict, vocab_size: int, block_size: int, alpha_mode: str = "static_0.5",
                 max_steps: int = 1, **extra) -> PaGatingGPT2Config:
    """params.yaml `model` section -> config. `init` other than scratch takes dims from that checkpoint.
    Keys the section leaves out take their declared defaults (pagating/config.py)."""
    model_cfg = {**defaults("model"), **model_cfg}
    init = model_cfg["init"]
    pagating = dict(unit=model_cfg["unit"], alpha_mode=alpha_mode, ffn_dim=model_cfg["ffn_dim"],
                    param_matched=model_cfg["param_matched"], alpha_max_steps=max_steps, **extra)
    dropout = model_cfg["dropout"]
    drops = dict(resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    if init != "scratch":
        base = GPT2Config.from_pretrained(init).to_dict()
        for key in ("model_type", "architectures", "transformers_version"):
            base.pop(key, None)
        return PaGatingGPT2Config(**{**base, **drops, **pagating})
    return PaGatingGPT2Config(vocab_size=vocab_size, n_positions=block_size, n_embd=model_cfg["n_embd"],
                              n_layer=model_cfg["n_layer"], n_head=model_cfg["n_head"], **drops, **pagating)


def build_model(config: PaGatingGPT2Config, init: str = "scratch") -> PaGatingGPT2LMHeadModel:
    """Scratch, or pretrained GPT-2 weights (name or path) with c_fc -> value path, c_proj -> out."""
    model = PaGatingGPT2LMHeadModel(config)
    if init != "scratch":
        load_pretrained_gpt2(model, init)
    return model


@torch.no_grad()
def load_pretrained_gpt2(model: PaGatingGPT2LMHeadModel, name_or_path: str) -> None:
    plain = GPT2LMHeadModel.from_pretrained(name_or_path)
    if model.config.d_ff != plain.config.n_inner and not (plain.config.n_inner is None
                                                           and model.config.d_ff == 4 * plain.config.n_embd):
        raise ValueError(f"pretrained init needs d_ff == the checkpoint's ({4 * plain.config.n_embd}); "
                         "set param_matched: false and ffn_dim to it")
    state = {k: v for k, v in plain.state_dict().items() if ".mlp." not in k}
    unexpected = model.load_state_dict(state, strict=False).unexpected_keys  # missing: the new MLP, expected
    assert not unexpected, unexpected
    for block, plain_block in zip(model.transformer.h, plain.transformer.h, strict=True):
        # HF Conv1D stores weight as (in, out); nn.Linear as (out, in).
        block.mlp.unit.value_proj.weight.copy_(plain_block.mlp.c_fc.weight.T)
        block.mlp.unit.value_proj.bias.copy_(plain_block.mlp.c_fc.bias)
        block.mlp.c_proj.weight.copy_(plain_block.mlp.c_proj.weight.T)
        block.mlp.c_proj.bias.copy_(plain_block.mlp.c_proj.bias)


def load_model(path: str, **kwargs) -> PaGatingGPT2LMHeadModel:
    """One call to load a saved run's `model/` directory (weights, config)."""
    return PaGatingGPT2LMHeadModel.from_pretrained(path, **kwargs)


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (tied embeddings counted once), as GPT-2's 124,439,808 is counted."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
