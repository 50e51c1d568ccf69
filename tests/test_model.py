"""GPT-2 with a paGating MLP: parameter counts, learning, save/load round trip, pretrained init."""

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from pagating.model import (
    PaGatingGPT2Config,
    PaGatingGPT2LMHeadModel,
    PaGatingMLP,
    build_config,
    build_model,
    count_parameters,
    load_model,
)

TINY = dict(n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0)


def test_parameter_counts_gpt2_small():
    plain = count_parameters(GPT2LMHeadModel(GPT2Config()))
    assert plain == 124_439_808
    gated = count_parameters(PaGatingGPT2LMHeadModel(PaGatingGPT2Config(unit="paGLU")))
    # d_ff = 3072 adds exactly one gate projection (weight + bias) per layer.
    assert gated == plain + 12 * (768 * 3072 + 3072)
    matched = PaGatingGPT2LMHeadModel(PaGatingGPT2Config(param_matched=True))
    assert matched.config.d_ff == 2048
    assert abs(count_parameters(matched) - plain) / plain < 0.005


def test_every_block_uses_the_unit():
    model = PaGatingGPT2LMHeadModel(PaGatingGPT2Config(unit="paGTU", alpha_mode="learnable", **TINY))
    assert all(isinstance(b.mlp, PaGatingMLP) for b in model.transformer.h)
    assert type(model.transformer.h[0].mlp.unit).__name__ == "paGTU"
    assert model.alphas() == [0.5, 0.5]


def test_tiny_model_learns():
    torch.manual_seed(0)
    model = PaGatingGPT2LMHeadModel(PaGatingGPT2Config(alpha_mode="static_0.5", **{**TINY, "resid_pdrop": 0,
                                                                                 "embd_pdrop": 0}))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    # Learnable data: each sequence counts up modulo the vocabulary from a random start.
    losses = []
    for _ in range(50):
        start = torch.randint(0, 64, (16, 1))
        x = (start + torch.arange(32)) % 64
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5


@pytest.mark.parametrize("alpha_mode", ["static_0.3", "learnable", "scheduler_cosine"])
def test_save_load_identical_logits_and_generate(tmp_path, alpha_mode):
    torch.manual_seed(0)
    model = PaGatingGPT2LMHeadModel(PaGatingGPT2Config(unit="paSwishU", alpha_mode=alpha_mode,
                                                       alpha_max_steps=10, **TINY)).eval()
    model.set_alpha_step(4)
    model.save_pretrained(tmp_path)
    x = torch.randint(0, 64, (2, 12))
    for loaded in (load_model(tmp_path), AutoModelForCausalLM.from_pretrained(tmp_path)):
        loaded.eval()
        assert isinstance(loaded, PaGatingGPT2LMHeadModel)
        assert loaded.alphas() == model.alphas()
        assert torch.equal(loaded(x).logits, model(x).logits)
    out = loaded.generate(x[:1, :3], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 9)


def test_pretrained_init_copies_value_path_and_out_projection(tmp_path):
    torch.manual_seed(0)
    plain = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=32))
    plain.save_pretrained(tmp_path)
    # Copying c_fc needs the checkpoint's width: not param-matched (train.validate says so in one line).
    cfg = build_config({"init": str(tmp_path), "unit": "paGLU", "ffn_dim": 128, "param_matched": False},
                       vocab_size=0, block_size=0)
    model = build_model(cfg, init=str(tmp_path))
    for b, pb in zip(model.transformer.h, plain.transformer.h, strict=True):
        assert torch.equal(b.mlp.unit.value_proj.weight, pb.mlp.c_fc.weight.T)
        assert torch.equal(b.mlp.c_proj.weight, pb.mlp.c_proj.weight.T)
        assert torch.equal(b.attn.c_attn.weight, pb.attn.c_attn.weight)
    assert torch.equal(model.transformer.wte.weight, plain.transformer.wte.weight)


def test_bad_config_raises():
    with pytest.raises(ValueError, match="valid units"):
        PaGatingGPT2Config(unit="nope")
    with pytest.raises(ValueError, match="valid alpha modes"):
        PaGatingGPT2Config(alpha_mode="cosine")


def test_mlp_dropout_after_c_proj_as_gpt2():
    """GPT-2's MLP drops out c_proj's output: dropped positions are exact zeros despite c_proj's bias."""
    torch.manual_seed(0)
    mlp = PaGatingMLP(PaGatingGPT2Config(**{**TINY, "resid_pdrop": 0.5})).train()
    torch.nn.init.constant_(mlp.c_proj.bias, 1.0)
    y = mlp(torch.randn(4, 8, 32))
    assert 0.3 < (y == 0).float().mean().item() < 0.7
    mlp.eval()
    torch.testing.assert_close(mlp(torch.ones(1, 32)), mlp.c_proj(mlp.unit(torch.ones(1, 32))))


def test_plain_unit_is_gpt2s_own_mlp(tmp_path):
    """unit `plain`: the baseline is GPT-2 itself (same parameters, same logits), and it round-trips."""
    torch.manual_seed(0)
    config = PaGatingGPT2Config(unit="plain", ffn_dim=128, **TINY)
    model = PaGatingGPT2LMHeadModel(config).eval()
    assert model.units() == [] and model.alphas() == [] and config.d_ff == 128
    ref = GPT2LMHeadModel(GPT2Config(n_inner=128, **TINY)).eval()
    assert count_parameters(model) == count_parameters(ref)
    ref.load_state_dict(model.state_dict())
    x = torch.randint(0, 64, (2, 16))
    torch.testing.assert_close(model(x).logits, ref(x).logits)
    model.save_pretrained(tmp_path)
    torch.testing.assert_close(load_model(str(tmp_path)).eval()(x).logits, model(x).logits)
    assert PaGatingGPT2Config(unit="plain", param_matched=True).d_ff == 3072  # matching is for gated units


def test_pretrained_init_with_the_param_matched_default_is_one_clear_error():
    from pagating.config import UserError, load_config
    from pagating.train import validate

    with pytest.raises(UserError, match=r"model.init gpt2 copies .* --set model.param_matched=false"):
        validate(load_config("wikitext103", {"model.init": "gpt2"}))
    validate(load_config("wikitext103", {"model.init": "gpt2", "model.param_matched": "false"}))
    validate(load_config("wikitext103", {"model.init": "gpt2", "model.unit": "plain"}))
