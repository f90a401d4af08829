import random

import pytest
import timm
import torch
import torch.nn as nn
from timm.models import ResNet

import ofa_timm
from ofa_timm import Subnet
from ofa_timm.elastic import ElasticResNet, OFAResNet, convert_ofa_resnet_state_dict, ofa_resnet50

from conftest import assert_close, randomize_bn

RES = 64


def make(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(timm.create_model(name, num_classes=10, **kwargs)).eval()


@pytest.fixture(scope='module')
def r50d_supernet():
    return ofa_timm.elasticize(make('resnet50d')).eval()


@pytest.mark.parametrize('name', ['resnet50', 'resnet50d'])
def test_max_subnet_is_source(name):
    src = make(name)
    sn = ofa_timm.elasticize(src).eval()
    assert isinstance(sn, ElasticResNet)
    x = torch.randn(2, 3, RES, RES)
    with torch.no_grad():
        assert_close(sn(x), src(x))
        ext = sn.extract(sn.space.max())
        assert type(ext) is ResNet
        assert_close(ext(x), src(x))
    assert list(ext.state_dict()) == list(src.state_dict())


@pytest.mark.parametrize('name', ['resnet101', 'resnet26d', 'resnet34', 'resnet18d'])
def test_other_family_members(name):
    src = make(name)
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


def test_random_subnets_equal_extracted(r50d_supernet):
    sn = r50d_supernet
    rng = random.Random(0)
    x = torch.randn(2, 3, RES, RES)
    for _ in range(10):
        subnet = sn.sample_active(rng)
        ext = sn.extract()
        assert type(ext) is ResNet and not ext.training
        with torch.no_grad():
            assert_close(ext(x), sn(x))
        assert ext.pretrained_cfg['input_size'] == (3, subnet.resolution, subnet.resolution)
        assert [len(getattr(ext, f'layer{i}')) for i in range(1, 5)] == list(subnet.depths)
        # timm's adapt_model_from_string keeps feature_info in step with the new widths
        assert ext.feature_info[-1]['num_chs'] == ext.num_features == ext.fc.in_features
    sn.set_active(None)


def test_extract_train_mode_and_independence(r50d_supernet):
    sn = r50d_supernet
    sn.train()
    try:
        ext = sn.extract(sn.space.min())
    finally:
        sn.eval()
    assert ext.training
    ptrs = {p.data_ptr() for p in sn.parameters()}
    assert not any(p.data_ptr() in ptrs for p in ext.parameters())
    assert sn.active_subnet == sn.space.max()


def test_train_step_and_sliced_bn():
    sn = ofa_timm.elasticize(make('resnet50')).train()
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
    try:
        sn.train()
        sn(x).sum().backward()
    finally:
        sn.set_grad_checkpointing(False)
        sn.eval()
        sn.zero_grad(set_to_none=True)


def test_invalid_resnet_subnets(r50d_supernet):
    space = r50d_supernet.space
    with pytest.raises(ValueError, match=r'widths\[2\] = 0.5 is not allowed: allowed \[0.65, 0.8, 1.0\]'):
        r50d_supernet.set_active(space.max().replace(widths=(1.0, 1.0, 0.5, 1.0, 1.0, 1.0)))
    with pytest.raises(ValueError, match=r'expands\[0\] = 0.35 is not allowed for stage 0 block 0'):
        r50d_supernet.set_active(space.max().replace(expands=(0.35,) + space.max().expands[1:]))
    with pytest.raises(ValueError, match=r'depths\[2\] = 7 is not allowed for stage 2'):
        r50d_supernet.extract(space.max().replace(depths=(3, 4, 7, 3)))
    with pytest.raises(ValueError, match='ResNeXt'):
        ofa_timm.elasticize(timm.create_model('resnext50_32x4d'))
    with pytest.raises(ValueError, match='attention'):
        ofa_timm.elasticize(timm.create_model('seresnet50'))


# --- canonical OFA-ResNet50 and the reference ------------------------------------------------------------------
ofa_networks = pytest.importorskip('ofa.imagenet_classification.elastic_nn.networks')


@pytest.fixture(scope='module')
def reference_and_ours():
    torch.manual_seed(0)
    ref = ofa_networks.OFAResNets(
        n_classes=10, depth_list=[0, 1, 2], expand_ratio_list=[0.2, 0.25, 0.35], width_mult_list=[0.65, 0.8, 1.0])
    randomize_bn(ref)
    ours = ofa_resnet50(num_classes=10)
    ours.load_state_dict(convert_ofa_resnet_state_dict(ref.state_dict()), strict=True)
    return ref.eval(), ours.eval()


def test_ofa_resnet50_space(reference_and_ours):
    _, ours = reference_and_ours
    space = ours.space
    assert [s.depths for s in space.stages] == [(0, 1), (2, 3, 4), (2, 3, 4), (4, 5, 6), (2, 3, 4)]
    assert len(space.expand_slots) == 18 and space.expand_slots[0] == (0.2, 0.25, 0.35)
    assert len(space.widths) == 6


def test_ofa_resnet50_matches_reference(reference_and_ours):
    import random as pyrandom
    ref, ours = reference_and_ours
    configs = [dict(d=[2] * 5, e=[0.35] * 18, w=[2] * 6), dict(d=[0] * 5, e=[0.2] * 18, w=[0] * 6)]
    for seed in range(4):
        pyrandom.seed(seed)
        configs.append(ref.sample_active_subnet())
    for cfg, res in zip(configs, (128, 160, 224, 144, 176, 192)):
        ref.set_active_subnet(**cfg)
        subnet = Subnet.from_dict(cfg)
        ours.set_active(subnet)
        x = torch.randn(2, 3, res, res)
        with torch.no_grad():
            expected = ref(x)
            assert_close(ours(x), expected)
            ext = ours.extract()
            assert type(ext) is OFAResNet and ext.conv1.residual == (cfg['d'][0] == 2)
            assert_close(ext(x), expected)


def test_ofa_resnet_legacy_keys_and_errors(reference_and_ours):
    ref, _ = reference_and_ours
    legacy = {k.replace('.bn.bn.', '.bn.').replace('.conv.conv.weight', '.conv.weight'): v
              for k, v in ref.state_dict().items()}
    assert convert_ofa_resnet_state_dict(legacy).keys() == convert_ofa_resnet_state_dict(ref.state_dict()).keys()
    with pytest.raises(ValueError, match="'blocks.18.conv1.conv.conv.weight'"):
        convert_ofa_resnet_state_dict({'blocks.18.conv1.conv.conv.weight': torch.zeros(1)})
