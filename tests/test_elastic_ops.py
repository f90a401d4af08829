import pytest
import torch
import torch.nn as nn
from timm.layers import Conv2dSame
import torch.nn.functional as F
from timm.layers import BatchNormAct2d
from ofa_timm._timm import SqueezeExcite

from ofa_timm.elastic import (
    ElasticBatchNorm2d, ElasticBatchNormAct2d, ElasticConv2d, ElasticLinear, ElasticSqueezeExcite)
from ofa_timm.elastic import ops

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


@pytest.mark.parametrize('conv, kernels, match', [
    (nn.Conv2d(8, 8, 3, padding=0, groups=8), (1, 3), 'symmetric static padding'),  # a shrinking kernel pads as timm
    (Conv2dSame(8, 8, 3), None, r"a Conv2dSame with padding .* \(TF 'same'"),
    (nn.Conv2d(8, 16, 3, padding=1, groups=4), None, 'dense .* or depthwise'),
    (nn.Conv2d(8, 8, (3, 1), padding=(1, 0)), None, 'square'),
])
def test_conv_rejects_unsupported(conv, kernels, match):
    with pytest.raises(ValueError, match=match):
        ElasticConv2d.from_static(conv, kernels)


def test_a_fixed_kernel_keeps_its_own_padding():
    """A patch embedding: an even kernel, stride = kernel, no padding; its output channels shrink."""
    conv = nn.Conv2d(3, 12, 4, stride=4)
    ec = ElasticConv2d.from_static(conv)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(ec(x), conv(x))
    ec.set_active(out_channels=8)
    assert_close(ec(x), conv(x)[:, :8], 1e-6)
    assert_close(ec.to_static(3)(x), conv(x)[:, :8], 1e-6)


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


# --- gradients of sliced weights --------------------------------------------------------------------------------------
@pytest.fixture
def direct_grads(monkeypatch):
    """Send every sliced weight, however small, through the in-place gradient path."""
    monkeypatch.setattr(ops, '_DIRECT_GRAD_MIN_NUMEL', 0)


def _plain_slices(monkeypatch):
    monkeypatch.setattr(ops, 'prefix_slice', lambda w, *sizes: w[tuple(
        slice(None) if s is None else slice(0, s) for s in sizes)])


def _elastic_layers(seed: int = 0) -> nn.ModuleDict:
    torch.manual_seed(seed)
    layers = nn.ModuleDict(dict(
        pw=ElasticConv2d.from_static(nn.Conv2d(12, 24, 1, bias=True)),
        dw=ElasticConv2d.from_static(nn.Conv2d(24, 24, 7, padding=3, groups=24, bias=False), (3, 5, 7)),
        se=ElasticSqueezeExcite.from_static(SqueezeExcite(24, rd_channels=8)),
        pwl=ElasticConv2d.from_static(nn.Conv2d(24, 16, 1, bias=False)),
        fc=ElasticLinear.from_static(nn.Linear(16, 5)),
    ))
    with torch.no_grad():
        layers.dw.kernel_transform_7to5.add_(torch.randn(25, 25) * 0.1)
        layers.dw.kernel_transform_5to3.add_(torch.randn(9, 9) * 0.1)
    return layers


def _run(layers: nn.ModuleDict, x: torch.Tensor, mid: int, kernel: int, out: int) -> torch.Tensor:
    layers.pw.set_active(out_channels=mid)
    layers.dw.set_active(kernel_size=kernel)
    layers.pwl.set_active(out_channels=out)
    y = layers.pwl(layers.se(layers.dw(layers.pw(x))))
    return layers.fc(y.mean((2, 3)))


SUBNETS = ((16, 3, 10), (24, 5, 12), (20, 7, 16))  # (mid channels, kernel, out channels)


def _grads(layers: nn.ModuleDict, x: torch.Tensor, subnets=SUBNETS[:2]):
    layers.zero_grad(set_to_none=True)
    for mid, kernel, out in subnets:  # several subnets accumulated in one step, as progressive shrinking does
        _run(layers, x[:, :12], mid, kernel, out).square().sum().backward()
    return {n: None if p.grad is None else p.grad.clone() for n, p in layers.named_parameters()}


@pytest.mark.parametrize('subnets, channels_last', [
    (SUBNETS[:2], False), (SUBNETS[::-1], False), (SUBNETS[1:2], False), (SUBNETS[:2], True)])
def test_sliced_weight_grads_equal_plain_slicing(direct_grads, monkeypatch, subnets, channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 12, 9, 9).contiguous(memory_format=fmt)
    direct = _grads(_elastic_layers().to(memory_format=fmt), x, subnets)
    with monkeypatch.context() as m:
        _plain_slices(m)
        plain = _grads(_elastic_layers().to(memory_format=fmt), x, subnets)
    assert direct.keys() == plain.keys()
    for name in direct:
        assert (direct[name] is None) == (plain[name] is None), name
        if direct[name] is not None:
            assert torch.equal(direct[name], plain[name]), name
    # Zero outside the union of the blocks the subnets used: here the largest mid width and output width.
    mid = max(s[0] for s in subnets)
    assert torch.count_nonzero(direct['pw.weight'][mid:]) == 0
    assert torch.count_nonzero(direct['pwl.weight'][:, mid:]) == 0


def test_sliced_weight_grads_shared_weight_and_full_use(direct_grads, monkeypatch):
    # One weight used in one graph through two blocks of different sizes and whole (the max setting takes the
    # parameter itself), on top of a gradient left by an earlier backward: all of it adds up as plain slicing does.
    # Equal up to rounding: autograd sums a leaf's uses within one graph before accumulating, in its own order.
    def grads():
        torch.manual_seed(0)
        a = ElasticConv2d.from_static(nn.Conv2d(12, 24, 1, bias=False))
        b = ElasticConv2d.from_static(nn.Conv2d(12, 24, 1, bias=False))
        b.weight = a.weight  # tied
        x = torch.randn(2, 12, 5, 5)
        a.set_active(out_channels=24)
        a(x).square().sum().backward()  # a full-size gradient first
        a.set_active(out_channels=16)
        b.set_active(out_channels=8)
        y = a(x[:, :12]).sum() + b(x).square().sum()
        a.set_active(out_channels=24)
        (y + a(x).sum()).backward()
        return a.weight.grad.clone()

    direct = grads()
    with monkeypatch.context() as m:
        _plain_slices(m)
        plain = grads()
    assert_close(direct, plain, 1e-6)


def test_sliced_weight_autograd_grad_double_backward_and_inputs(direct_grads, monkeypatch):
    layers = _elastic_layers()
    x = torch.randn(2, 12, 9, 9)
    params = [layers.pw.weight, layers.dw.weight, layers.pwl.weight]
    loss = _run(layers, x, 16, 3, 10).square().sum()
    got = torch.autograd.grad(loss, params)  # returned, not accumulated: full-size gradients
    assert all(p.grad is None for p in params)
    with monkeypatch.context() as m:
        _plain_slices(m)
        expected = torch.autograd.grad(_run(layers, x, 16, 3, 10).square().sum(), params)
    for g, e in zip(got, expected):
        assert g.shape == e.shape and torch.equal(g, e)

    _run(layers, x, 16, 3, 10).square().sum().backward(inputs=[layers.fc.weight])  # weights left out stay None
    assert all(p.grad is None for p in params) and layers.fc.weight.grad is not None

    g, = torch.autograd.grad(_run(layers, x, 16, 3, 10).square().sum(), [layers.pw.weight], create_graph=True)
    g.square().sum().backward()  # double backward goes through autograd's own slicing
    assert layers.pw.weight.grad is not None and layers.pw.weight.grad.shape == layers.pw.weight.shape


def test_sliced_weight_grads_in_a_supernet(direct_grads, monkeypatch):
    import ofa_timm
    import timm
    torch.manual_seed(0)
    source = timm.create_model('mobilenetv3_small_050', num_classes=4)
    x = torch.randn(2, 3, 32, 32)

    def grads():
        supernet = ofa_timm.elasticize(source, resolutions=(32,)).train()
        subnet = supernet.set_active(supernet.space.min())
        supernet(x).logsumexp(1).sum().backward()
        supernet.set_active(supernet.space.sample(3))
        supernet(x).logsumexp(1).sum().backward()
        return supernet, subnet, {n: p.grad for n, p in supernet.named_parameters()}

    supernet, subnet, direct = grads()
    with monkeypatch.context() as m:
        _plain_slices(m)
        _, _, plain = grads()
    for name, g in direct.items():
        assert (g is None) == (plain[name] is None), name
        if g is not None:
            assert torch.equal(g, plain[name]), name
    # Blocks that neither subnet runs keep no gradient (DDP's find_unused_parameters relies on it).
    unused = [n for n, g in direct.items() if g is None]
    assert unused and all(n.startswith('blocks.') for n in unused)


def _ddp_grads_worker(rank: int, world: int, port: int, out: str) -> None:
    import os
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.distributed.init_process_group('gloo', rank=rank, world_size=world)
    torch.set_num_threads(1)
    ops._DIRECT_GRAD_MIN_NUMEL = 0
    try:
        layers = _elastic_layers()
        ddp = nn.parallel.DistributedDataParallel(_DictModel(layers), find_unused_parameters=True)
        x = torch.randn(2, 12, 9, 9, generator=torch.Generator().manual_seed(rank))
        for step in range(2):  # grads are set to None between steps, as an optimizer loop does
            layers.zero_grad(set_to_none=True)
            for mid, kernel, out_chs in SUBNETS[:2]:
                ddp(x, mid, kernel, out_chs).square().sum().backward()
        torch.save({n: p.grad for n, p in layers.named_parameters()}, os.path.join(out, f'rank{rank}.pt'))
    finally:
        torch.distributed.destroy_process_group()


class _DictModel(nn.Module):
    def __init__(self, layers: nn.ModuleDict):
        super().__init__()
        self.layers = layers

    def forward(self, x: torch.Tensor, mid: int, kernel: int, out: int) -> torch.Tensor:
        return _run(self.layers, x, mid, kernel, out)


def test_sliced_weight_grads_under_ddp(direct_grads, tmp_path):
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_grads_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    got = [torch.load(tmp_path / f'rank{r}.pt', weights_only=True) for r in range(2)]
    per_rank = []
    for rank in range(2):
        x = torch.randn(2, 12, 9, 9, generator=torch.Generator().manual_seed(rank))
        per_rank.append(_grads(_elastic_layers(), x))
    for name, g in got[0].items():
        assert torch.equal(g, got[1][name]), name
        assert_close(g, (per_rank[0][name] + per_rank[1][name]) / 2, 1e-6)
