"""Denoising networks: shapes, conditioning (t, class with its null class, scalar w), attention math."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from fastdiff.models import MLPConfig, MLPDenoiser, UNet, UNetConfig, build_model
from fastdiff.models.embeddings import CondEmbedding
from fastdiff.models.unet import AttnBlock

TINY_8 = UNetConfig(image_size=8, in_channels=1, channels=8, channel_mult=(1, 2), num_res_blocks=1,
                    attn_resolutions=(4,), head_dim=4, dropout=0.0)
TINY_32 = UNetConfig(image_size=32, in_channels=3, channels=8, channel_mult=(1, 2, 2), num_res_blocks=1,
                     attn_resolutions=(), head_dim=8, dropout=0.0)


def _randomized(net: torch.nn.Module) -> torch.nn.Module:
    """`net` with its zero-initialised tensors (output convs, attention projections) made random."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.normal_(0.0, 0.3)
    return net.eval()


def _inputs(cfg, b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g), torch.rand(b, generator=g)


@pytest.mark.parametrize("cfg", [TINY_8, TINY_32], ids=["1x8x8", "3x32x32"])
def test_unet_output_shape_and_gradients(cfg):
    net = _randomized(build_model(cfg)).train()
    x, t = _inputs(cfg)
    out = net(x, t)
    assert out.shape == x.shape and out.dtype == x.dtype
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_unet_puts_attention_where_asked():
    n_attn = lambda cfg: sum(isinstance(m, AttnBlock) for m in UNet(cfg).modules())  # noqa: E731
    # the middle block always attends; at 4x4: one block on the way down, num_res_blocks + 1 on the way up
    assert n_attn(TINY_8) == 1 + 1 + 2
    assert n_attn(TINY_32) == 1


def test_attention_block_matches_softmax_attention():
    torch.manual_seed(1)
    blk = _randomized(AttnBlock(8, head_dim=4))
    x = torch.randn(2, 8, 3, 5)
    b, c, h, w = x.shape
    qkv = blk.qkv(blk.norm(x)).reshape(b, 3, 2, c // 2, h * w)  # 2 heads of 4 channels
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]  # (B, heads, d, N)
    weights = torch.softmax(q.transpose(-1, -2) @ k / 2.0, dim=-1)  # 1/sqrt(d) = 1/2
    ref = x + blk.proj((v @ weights.transpose(-1, -2)).reshape(b, c, h, w))
    torch.testing.assert_close(blk(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("channels", [8, 32, 48])
def test_unet_depends_on_t_and_treats_samples_independently(channels):
    # one level only: with 8 or 32 channels, GroupNorm once had one channel per group and erased the t embedding
    net = _randomized(UNet(dataclasses.replace(TINY_8, channels=channels, channel_mult=(1,))))
    x, _ = _inputs(TINY_8, b=5)
    with torch.no_grad():
        a, b = net(x, torch.full((5,), 0.1)), net(x, torch.full((5,), 0.9))
        assert (a - b).abs().mean() > 1e-3
        # sample k's output does not depend on the rest of the batch (per-sample seeds rely on it)
        torch.testing.assert_close(net(x[:2], torch.full((2,), 0.1)), a[:2], rtol=1e-5, atol=1e-5)


def test_time_embedding_depends_on_t():
    emb = CondEmbedding(16, 32)
    t = torch.tensor([0.0, 1e-3, 0.5, 1.0])
    e = emb(t)
    assert e.shape == (4, 32)
    assert all((e[i] - e[j]).abs().max() > 1e-4 for i in range(4) for j in range(i))


@pytest.mark.parametrize("arch", ["unet", "mlp"])
def test_class_embedding_null_class(arch):
    if arch == "unet":
        net = _randomized(UNet(dataclasses.replace(TINY_8, num_classes=3)))
        x, t = _inputs(TINY_8, b=3)
    else:
        net = _randomized(MLPDenoiser(MLPConfig(hidden=32, layers=2, num_classes=3)))
        x, t = torch.randn(3, 2), torch.rand(3)
    null = torch.full((3,), 3)
    with torch.no_grad():
        torch.testing.assert_close(net(x, t), net(x, t, null), rtol=0, atol=0)
        y0, y1 = net(x, t, torch.zeros(3, dtype=torch.long)), net(x, t, torch.ones(3, dtype=torch.long))
        assert (y0 - y1).abs().mean() > 1e-3 and (y0 - net(x, t)).abs().mean() > 1e-3


def test_scalar_condition_defaults_to_zero():
    net = _randomized(MLPDenoiser(MLPConfig(hidden=32, layers=1, scalar_cond=True)))
    x, t = torch.randn(4, 2), torch.rand(4)
    with torch.no_grad():
        torch.testing.assert_close(net(x, t), net(x, t, w=torch.zeros(4)), rtol=0, atol=0)
        assert (net(x, t) - net(x, t, w=torch.full((4,), 2.0))).abs().mean() > 1e-3


@pytest.mark.parametrize("dim", [2, 3])
def test_mlp_shapes(dim):
    net = _randomized(MLPDenoiser(MLPConfig(dim=dim, hidden=32, layers=2)))
    x, t = torch.randn(7, dim), torch.rand(7)
    out = net(x, t)
    assert out.shape == (7, dim)
    assert (out - net(x, 1 - t)).abs().mean() > 1e-3


def test_build_model_rejects_other_configs():
    with pytest.raises(TypeError, match="no model"):
        build_model(object())


def test_closed_form_facts_of_the_networks():
    """The U-Net's output layer starts at zero, so a fresh teacher predicts exactly 0 for any input; the cifar10
    preset builds the DDPM paper's 35.7M-parameter CIFAR-10 model (Ho et al. 2020, App. B)."""
    from fastdiff.train import PRESETS, build_network

    net = build_model(TINY_8)
    x, t = _inputs(TINY_8)
    with torch.no_grad():
        assert torch.equal(net(x, t), torch.zeros_like(x))
    params = sum(p.numel() for p in build_network(PRESETS["cifar10"]).parameters())
    assert round(params / 1e6, 1) == 35.7, params


def test_network_fields_are_declared_once():
    """channels, hidden, dropout, ...: one declaration (models/fields.py) that the model configs and TrainConfig
    inherit, so their defaults cannot drift apart (they did: channels 48 in TrainConfig, 128 in UNetConfig)."""
    import dataclasses

    from fastdiff.models.fields import MLPFields, UNetFields
    from fastdiff.train import TrainConfig

    for fields_cls, model_cls in ((UNetFields, UNetConfig), (MLPFields, MLPConfig)):
        for f in dataclasses.fields(fields_cls):
            assert getattr(TrainConfig(), f.name) == getattr(model_cls(), f.name) == f.default, f.name
    assert issubclass(TrainConfig, UNetFields) and issubclass(TrainConfig, MLPFields)
