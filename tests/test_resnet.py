"""What is particular to the ResNet family (the contract itself is tested in test_contract.py)."""
import random

import pytest
import timm
import torch
from timm.models import ResNet

import ofa_timm
from ofa_timm.elastic import ElasticResNet, ofa_resnet50

from helpers import assert_close, timm_model

RES = 64


@pytest.fixture(scope='module')
def _r50d_supernet():
    return ofa_timm.elasticize(timm_model('resnet50d'))


@pytest.fixture
def r50d_supernet(_r50d_supernet):
    yield _r50d_supernet.eval()
    _r50d_supernet.set_active(None)
    _r50d_supernet.set_grad_checkpointing(False)
    _r50d_supernet.zero_grad(set_to_none=True)
    _r50d_supernet.eval()


def test_plain_resnet50_max_subnet_is_source():
    src = timm_model('resnet50')
    sn = ofa_timm.elasticize(src).eval()
    assert isinstance(sn, ElasticResNet)
    x = torch.randn(2, 3, RES, RES)
    with torch.no_grad():
        assert torch.equal(sn(x), src(x))
        assert torch.equal(sn.extract('max')(x), src(x))


@pytest.mark.parametrize('name', ['resnet101', 'resnet26d', 'resnet34', 'resnet18d'])
def test_other_family_members(name):
    src = timm_model(name)
    sn = ofa_timm.elasticize(src).eval()
    x = torch.randn(1, 3, RES, RES)
    with torch.no_grad():
        assert_close(sn(x), src(x))
        subnet = sn.sample_active(3)
        ext = sn.extract()
        assert type(ext) is ResNet and type(ext.layer1[0]) is type(src.layer1[0])
        assert_close(ext(x), sn(x))
    assert [len(getattr(ext, f'layer{i}')) for i in range(1, 5)] == list(subnet.depths)


def test_space_of_converted_resnet50d(r50d_supernet):
    space = r50d_supernet.space
    assert [s.depths for s in space.stages] == [(1, 2, 3), (2, 3, 4), (4, 5, 6), (1, 2, 3)]
    assert space.expand_slots == ((0.2, 0.25),) * 16  # OFA's choices up to timm's 0.25
    assert space.widths == ((0.65, 0.8, 1.0),) * 6  # stem mid, stem out, 4 stages


def test_random_subnets_have_the_subnet_depths_and_widths(r50d_supernet):
    rng = random.Random(0)
    for _ in range(4):
        subnet = r50d_supernet.space.sample(rng)
        ext = r50d_supernet.extract(subnet)
        assert [len(getattr(ext, f'layer{i}')) for i in range(1, 5)] == list(subnet.depths)
        # the resized model keeps feature_info and num_features in step with the new widths
        assert ext.feature_info[-1]['num_chs'] == ext.num_features == ext.fc.in_features


def test_train_step_and_sliced_bn():
    sn = ofa_timm.elasticize(timm_model('resnet50')).train()
    subnet = sn.space.min()
    sn.set_active(subnet)
    block = sn.layer2[0]
    mid = block.conv1.active_out_channels
    before = block.bn1.running_mean.clone()
    sn(torch.randn(2, 3, RES, RES)).logsumexp(1).mean().backward()
    assert block.conv1.weight.grad[:mid].abs().sum() > 0 and block.conv1.weight.grad[mid:].abs().sum() == 0
    assert not torch.equal(block.bn1.running_mean[:mid], before[:mid])
    assert torch.equal(block.bn1.running_mean[mid:], before[mid:])
    assert sn.layer3[-1].conv1.weight.grad is None  # dropped by depth


def test_timm_model_api(r50d_supernet):
    sn = r50d_supernet
    x = torch.randn(2, 3, RES, RES)
    sn.set_active(sn.space.min())
    with torch.no_grad():
        feats = sn.forward_features(x)
        assert feats.shape[1] == 1328  # make_divisible(2048 * 0.65)
        assert torch.equal(sn.forward_head(feats), sn(x))
    assert [f['num_chs'] for f in sn.feature_info] == [64, 256, 512, 1024, 2048]
    sn.set_active(None)
    sn.set_grad_checkpointing(True)
    sn.train()
    sn(x).sum().backward()


def test_invalid_resnet_subnets(r50d_supernet):
    space = r50d_supernet.space
    with pytest.raises(ValueError, match=r'widths\[2\] = 0.5 is not allowed: allowed \[0.65, 0.8, 1.0\]'):
        r50d_supernet.set_active(space.max().replace(widths=(1.0, 1.0, 0.5, 1.0, 1.0, 1.0)))
    with pytest.raises(ValueError, match=r'expands\[0\] \(stage 0 block 0\) = 0.35 is not allowed'):
        r50d_supernet.set_active(space.max().replace(expands=(0.35,) + space.max().expands[1:]))
    with pytest.raises(ValueError, match=r'depths\[2\] \(stage 2\) = 7 is not allowed'):
        r50d_supernet.extract(space.max().replace(depths=(3, 4, 7, 3)))
    with pytest.raises(ValueError, match='ResNeXt'):
        ofa_timm.elasticize(timm.create_model('resnext50_32x4d'))
    with pytest.raises(ValueError, match='attention'):
        ofa_timm.elasticize(timm.create_model('seresnet50'))


def test_ofa_resnet50_space():
    space = ofa_resnet50(num_classes=10).space
    assert [s.depths for s in space.stages] == [(0, 1), (2, 3, 4), (2, 3, 4), (4, 5, 6), (2, 3, 4)]
    assert len(space.expand_slots) == 18 and space.expand_slots[0] == (0.2, 0.25, 0.35)
    assert len(space.widths) == 6


def test_reference_subnet_form(r50d_supernet):
    canonical = ofa_resnet50(num_classes=10)
    s = canonical.resolve({'d': [2, 0, 1, 2, 1], 'e': [0.25] * 18, 'w': [0, 1, 2, 2, 1, 0]})
    assert s.depths == (1, 2, 3, 6, 3)
    assert s.widths == (0.65, 0.8, 1.0, 1.0, 0.8, 0.65)
    assert canonical.resolve({'d': [0, 0, 0, 0, 0], 'e': [0.2] * 18, 'w': [0] * 6}).depths[0] == 0
    with pytest.raises(ValueError, match=r"'w'\[2\] = 3"):
        canonical.resolve({'d': [2] * 5, 'e': [0.25] * 18, 'w': [0, 1, 3, 0, 0, 0]})
    with pytest.raises(ValueError, match="'d'"):
        canonical.resolve({'d': [2] * 4, 'e': [0.25] * 18, 'w': [0] * 6})
    with pytest.raises(ValueError, match='canonical OFA-ResNet50 only'):
        r50d_supernet.resolve({'d': [2] * 5, 'e': [0.25] * 16, 'w': [0] * 6})
