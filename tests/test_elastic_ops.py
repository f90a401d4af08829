import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import BatchNormAct2d
from ofa_timm._timm import SqueezeExcite

from ofa_timm.elastic import (
    ElasticBatchNorm2d, ElasticBatchNormAct2d, ElasticConv2d, ElasticLinear, ElasticSqueezeExcite)

from helpers import assert_close, randomize_bn


def test_dense_conv_full_and_sliced():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 32, 1, bias=True)
    ec = ElasticConv2d.from_static(conv)
    assert ec.weight is conv.weight and ec.bias is conv.bias  # parameters are reused, keys stay the same
    x = torch.randn(2, 16, 8, 8)
    assert torch.equal(ec(x), conv(x))
    ec.set_active(out_channels=8)
    y = ec(x[:, :12])
    ref = F.conv2d(x[:, :12], conv.weight[:8, :12], conv.bias[:8])
    assert torch.equal(y, ref)
    static = ec.to_static(12)
    assert type(static) is nn.Conv2d and static.weight.shape == (8, 12, 1, 1)
    assert torch.equal(static(x[:, :12]), y)
    assert static.weight.data_ptr() != conv.weight.data_ptr()


def test_depthwise_kernel_transform_identity_is_centre_crop():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 7, stride=2, padding=3, groups=8, bias=False)
    ec = ElasticConv2d.from_static(conv, (3, 5, 7))
    assert sorted(n for n, _ in ec.named_parameters()) == [
        'kernel_transform_5to3', 'kernel_transform_7to5', 'weight']
    x = torch.randn(2, 8, 15, 15)
    for k in (3, 5, 7):
        ec.set_active(kernel_size=k)
        s = (7 - k) // 2
        ref = F.conv2d(x, conv.weight[:, :, s:s + k, s:s + k], None, 2, k // 2, 1, 8)
        assert torch.allclose(ec(x), ref, atol=1e-6)


def test_depthwise_kernel_transform_chain_and_grads():
    torch.manual_seed(0)
    ec = ElasticConv2d.from_static(nn.Conv2d(4, 4, 7, padding=3, groups=4, bias=False), (3, 5, 7))
    with torch.no_grad():
        ec.kernel_transform_7to5.add_(torch.randn(25, 25) * 0.1)
        ec.kernel_transform_5to3.add_(torch.randn(9, 9) * 0.1)
    ec.set_active(kernel_size=3)
    w5 = (ec.weight[:, :, 1:6, 1:6].reshape(4, 25) @ ec.kernel_transform_7to5.T).view(4, 1, 5, 5)
    w3 = (w5[:, :, 1:4, 1:4].reshape(4, 9) @ ec.kernel_transform_5to3.T).view(4, 1, 3, 3)
    x = torch.randn(1, 4, 9, 9)
    out = ec(x)
    assert_close(out, F.conv2d(x, w3, None, 1, 1, 1, 4))
    out.sum().backward()
    assert ec.kernel_transform_7to5.grad is not None and ec.kernel_transform_5to3.grad.abs().sum() > 0
    # A channel prefix of a depthwise conv follows the input
    assert ec(x[:, :2]).shape == (1, 2, 9, 9)
    static = ec.to_static(2)
    assert static.kernel_size == (3, 3) and static.padding == (1, 1) and static.groups == 2
    assert_close(static(x[:, :2]), ec(x[:, :2]))


def test_grow_kernel_by_zero_padding_keeps_function():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=6, bias=False)
    ec = ElasticConv2d.from_static(conv, (3, 5, 7))
    assert ec.weight.shape[-1] == 7
    x = torch.randn(2, 6, 11, 11)
    for k in (3, 5, 7):
        ec.set_active(kernel_size=k)
        assert_close(ec(x), conv(x), 1e-6)


@pytest.mark.parametrize('conv, match', [
    (nn.Conv2d(8, 8, 3, padding=0), 'symmetric static padding'),
    (nn.Conv2d(8, 16, 3, padding=1, groups=4), 'dense .* or depthwise'),
    (nn.Conv2d(8, 8, (3, 1), padding=(1, 0)), 'square'),
])
def test_conv_rejects_unsupported(conv, match):
    with pytest.raises(ValueError, match=match):
        ElasticConv2d.from_static(conv)


def test_conv_set_active_errors():
    ec = ElasticConv2d.from_static(nn.Conv2d(4, 4, 5, padding=2, groups=4), (3, 5))
    with pytest.raises(ValueError, match=r'kernel_size=7 not allowed; allowed \[3, 5\]'):
        ec.set_active(kernel_size=7)
    with pytest.raises(ValueError, match='follows its input'):
        ec.set_active(out_channels=2)
    with pytest.raises(ValueError, match='kernel_sizes'):
        ElasticConv2d.from_static(nn.Conv2d(4, 4, 5, padding=2, groups=4), (3,))


@pytest.mark.parametrize('cls, static_cls', [
    (ElasticBatchNorm2d, nn.BatchNorm2d), (ElasticBatchNormAct2d, BatchNormAct2d)])
def test_batch_norm_slices_eval_and_train(cls, static_cls):
    torch.manual_seed(0)
    bn = randomize_bn(static_cls(16))
    ebn = cls.from_static(bn)
    assert ebn.running_mean is bn.running_mean
    x = torch.randn(4, 16, 5, 5)
    ebn.eval(), bn.eval()
    assert torch.equal(ebn(x), bn(x))
    ref = static_cls(8).eval()
    ref.load_state_dict({k: (v[:8] if v.ndim else v) for k, v in bn.state_dict().items()})
    assert_close(ebn(x[:, :8]), ref(x[:, :8]), 1e-6)
    assert_close(ebn.to_static(8)(x[:, :8]), ref(x[:, :8]), 1e-6)

    # Training on 8 channels updates exactly those channels' running statistics, in place.
    ebn.train()
    before = ebn.running_mean.clone()
    ebn(x[:, :8] + 3.0)
    assert not torch.allclose(ebn.running_mean[:8], before[:8])
    assert torch.equal(ebn.running_mean[8:], before[8:])
    ref.train()
    ref(x[:, :8] + 3.0)
    assert torch.allclose(ebn.running_mean[:8], ref.running_mean, atol=1e-6)
    assert torch.allclose(ebn.running_var[:8], ref.running_var, atol=1e-6)


def test_batch_norm_cumulative_momentum():
    bn = nn.BatchNorm2d(4, momentum=None)
    ebn = ElasticBatchNorm2d.from_static(bn).train()
    ref = nn.BatchNorm2d(2, momentum=None).train()
    for i in range(3):
        x = torch.randn(3, 4, 2, 2) + i
        ebn(x[:, :2]), ref(x[:, :2])
    assert torch.allclose(ebn.running_mean[:2], ref.running_mean, atol=1e-6)


def test_squeeze_excite_slices_follow_timm_rounding():
    torch.manual_seed(0)
    se = SqueezeExcite(96, rd_ratio=0.25, gate_layer='hard_sigmoid', force_act_layer=nn.ReLU,
                       rd_round_fn=lambda c: int(c) // 8 * 8 if int(c) % 8 == 0 else (int(c) // 8 + 1) * 8)
    ese = ElasticSqueezeExcite.from_static(se, 0.25)
    x = torch.randn(2, 96, 4, 4)
    assert torch.equal(ese(x), se(x))
    static = ese.to_static(72)
    assert static.conv_reduce.out_channels == 24  # make_divisible(72 / 4) = 24, as timm builds it
    assert_close(ese(x[:, :72]), static(x[:, :72]), 1e-6)
    with pytest.raises(ValueError, match='does not follow'):
        ElasticSqueezeExcite.from_static(SqueezeExcite(96, rd_channels=7))


def test_linear():
    lin = nn.Linear(32, 5)
    el = ElasticLinear.from_static(lin)
    x = torch.randn(3, 32)
    assert torch.equal(el(x), lin(x))
    assert_close(el(x[:, :20]), F.linear(x[:, :20], lin.weight[:, :20], lin.bias), 1e-6)
    assert_close(el.to_static(20)(x[:, :20]), el(x[:, :20]), 1e-6)


def test_inference_cache_follows_parameter_updates():
    torch.manual_seed(0)
    ec = ElasticConv2d.from_static(nn.Conv2d(8, 8, 5, padding=2, groups=8, bias=False), (3, 5))
    ec.set_active(kernel_size=3)
    x = torch.randn(1, 8, 7, 7)
    with torch.no_grad():
        first = ec(x)
        assert torch.equal(ec(x), first)  # served from the cache
        ec.weight.mul_(2.0)  # an in-place update (optimizer step, load_state_dict) invalidates it
        assert_close(ec(x), 2 * first, 1e-6)
        ec.kernel_transform_5to3.copy_(torch.zeros(9, 9))
        assert torch.count_nonzero(ec(x)) == 0
    with torch.no_grad():
        ec.kernel_transform_5to3.copy_(torch.eye(9))
    y = ec(x)  # with autograd the weight is rebuilt and differentiable
    y.sum().backward()
    assert ec.weight.grad is not None
