"""A block built from its parts: mixer, optional MLP and norms, against the pre-norm residual definition."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from timm.layers import Mlp
from torch import nn

from vim.models import MambaMixer
from vim.models.block import MambaBlock, norm_factory

from support.norms import randomize_norms

WIDTH = 8


def _block(mlp: bool, drop_path: float = 0.0, norm_layer: str = "layernorm") -> MambaBlock:
    mixer_cls = partial(MambaMixer, d_state=4, kernel_backend="torch")
    mlp_cls = partial(Mlp, hidden_features=2 * WIDTH) if mlp else None
    return MambaBlock(WIDTH, mixer_cls, mlp_cls, norm_factory(norm_layer), drop_path=drop_path, kernel_backend="torch")


def _layer_norm(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    centred = x - x.mean(-1, keepdim=True)
    return centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight + norm.bias


def test_blocks_with_an_mlp_chain_two_pre_norm_residual_steps() -> None:
    """Two blocks with MLPs give x + mixer(norm(x)), then x + mlp(norm2(x)), block after block (written out by hand)."""
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    blocks = [_block(mlp=True).eval() for _ in range(2)]
    for block in blocks:
        randomize_norms(block, generator)
    x = torch.randn(2, 5, WIDTH, generator=generator)
    expected = x
    for block in blocks:
        expected = expected + block.mixer(_layer_norm(expected, block.norm))
        expected = expected + block.mlp(_layer_norm(expected, block.norm2))
    with torch.no_grad():
        hidden, residual = x, None
        for block in blocks:
            hidden, residual = block(hidden, residual)
        torch.testing.assert_close(residual + hidden, expected, rtol=1e-5, atol=1e-5)


def test_state_dict_keys_name_each_part() -> None:
    """Mixer and norm as in the official checkpoints; an MLP adds norm2 and mlp (timm's fc1 / fc2)."""
    plain = {key.split(".")[0] for key in _block(mlp=False).state_dict()}
    assert plain == {"norm", "mixer"}
    keys = set(_block(mlp=True).state_dict())
    assert {"norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc2.weight"} <= keys
    assert {key.split(".")[0] for key in keys} == {"norm", "mixer", "norm2", "mlp"}


def test_drop_path_drops_each_branch() -> None:
    """At rate 1 in training both branches are dropped: the stream leaves the block as it came in."""
    block = _block(mlp=True, drop_path=1.0).train()
    hidden, previous = torch.randn(2, 5, WIDTH), torch.randn(2, 5, WIDTH)
    out, residual = block(hidden, previous)
    torch.testing.assert_close(residual, previous, rtol=0, atol=0)  # neither hidden nor the mixer's output entered
    torch.testing.assert_close(out, block.mlp(_layer_norm(previous, block.norm2)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mlp", [False, True])
def test_reset_parameters_rescales_every_branch_for_depth(mlp: bool) -> None:
    """The branches' last projections (out_proj, fc2) are their default init divided by sqrt(depth * branches)."""
    block = _block(mlp=mlp)
    torch.manual_seed(3)
    block.reset_parameters(depth=3)
    rescaled = {name: p.clone() for name, p in block.named_parameters()}
    torch.manual_seed(3)
    block.mixer.reset_parameters()
    if block.mlp is not None:
        block.mlp.fc1.reset_parameters()
        block.mlp.fc2.reset_parameters()
    scale = math.sqrt(3 * (2 if mlp else 1))
    for name, p in block.named_parameters():
        divisor = scale if name in ("mixer.out_proj.weight", "mlp.fc2.weight") else 1.0
        torch.testing.assert_close(rescaled[name], p / divisor, rtol=0, atol=0, msg=name)
