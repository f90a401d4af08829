import random
from functools import partial

import pytest
import timm
import torch
import torch.nn as nn
from timm.models import MobileNetV3
from timm.models._efficientnet_blocks import SqueezeExcite
from timm.models._efficientnet_builder import decode_arch_def, round_channels

import ofa_timm
from ofa_timm import Subnet
from ofa_timm.elastic import ElasticConv2d

from conftest import assert_close, randomize_bn

RES = 64  # small inputs keep the suite fast; any resolution works


@pytest.mark.parametrize('name', ['mobilenetv3_large_100', 'mobilenetv3_small_100', 'mobilenetv3_large_075'])
def test_max_subnet_is_source(name):
    torch.manual_seed(0)
    src = randomize_bn(timm.create_model(name, num_classes=7)).eval()
    sn = ofa_timm.elasticize(src).eval()
    x = torch.randn(2, 3, RES, RES)
    with torch.no_grad():
        assert_close(sn(x), src(x))
        ext = sn.extract(sn.space.max())
        assert_close(ext(x), src(x))
    # Extraction at max reproduces the source architecture key for key.
    assert list(ext.state_dict()) == list(src.state_dict())


def test_default_space_fits_under_source(mbv3_supernet):
    space = mbv3_supernet.space
    assert space.max().depths == (2, 3, 4, 2, 3)  # timm's mobilenetv3_large_100 stage depths
    assert space.stages[2].depths == (2, 3, 4)
    assert space.stages[0].depths == (2,)  # a 2-block source stage offers no smaller OFA depth
    # Source kernel 3 blocks keep {3}; kernel 5 blocks get {3, 5}; expand ratios never exceed the source's.
    assert space.stages[0].kernels == ((3,), (3,))
    assert space.stages[1].kernels == ((3, 5),) * 3
    assert space.stages[2].expands[1] == (2.5,) and space.stages[0].expands[0] == (3.0, 4.0)
    assert space.resolutions[0] == 128 and space.resolutions[-1] == 224


def test_random_subnets_equal_extracted(mbv3_supernet):
    sn = mbv3_supernet
    rng = random.Random(0)
    x = torch.randn(2, 3, RES, RES)
    for _ in range(10):
        subnet = sn.sample_active(rng)
        ext = sn.extract()
        assert type(ext) is MobileNetV3
        assert not ext.training
        with torch.no_grad():
            assert_close(ext(x), sn(x))
        assert ext.pretrained_cfg['input_size'] == (3, subnet.resolution, subnet.resolution)
        assert sum(len(s) for s in ext.blocks) == sum(subnet.depths) + 2  # + fixed ds and conv stages
    sn.set_active(None)


def test_extracted_is_independent_and_keeps_train_mode(mbv3_large):
    sn = ofa_timm.elasticize(mbv3_large)
    subnet = sn.space.sample(1)
    sn.train()
    ext = sn.extract(subnet)
    assert ext.training and sn.active_subnet == sn.space.max()  # extract(subnet) does not change the active one
    supernet_ptrs = {p.data_ptr() for p in sn.parameters()}
    assert not any(p.data_ptr() in supernet_ptrs for p in ext.parameters())
    assert all(not t.is_meta for t in ext.state_dict().values())
    # A stock timm model: saves and reloads through plain timm with its own arch_def.
    se_layer = partial(SqueezeExcite, gate_layer='hard_sigmoid', force_act_layer=nn.ReLU, rd_round_fn=round_channels)
    again = timm.models.MobileNetV3(
        block_args=decode_arch_def(sn.arch_def(subnet)), num_classes=10, se_layer=se_layer, act_layer=nn.Hardswish)
    again.load_state_dict(ext.state_dict())


def test_source_is_not_modified(mbv3_large):
    before = {k: v.clone() for k, v in mbv3_large.state_dict().items()}
    sn = ofa_timm.elasticize(mbv3_large)
    with torch.no_grad():
        for p in sn.parameters():
            p.add_(1.0)
    assert all(torch.equal(v, mbv3_large.state_dict()[k]) for k, v in before.items())
    assert not any(isinstance(m, ElasticConv2d) for m in mbv3_large.modules())


def test_train_step_updates_shared_weights_and_bn(mbv3_large):
    sn = ofa_timm.elasticize(mbv3_large).train()
    subnet = sn.space.min()
    sn.set_active(subnet)
    block = sn.blocks[5][0]  # source k5 e6: min subnet shrinks both
    mid = block.conv_pw.active_out_channels
    before = block.bn1.running_mean.clone()
    out = sn(torch.randn(4, 3, RES, RES))
    out.logsumexp(1).mean().backward()
    grad = block.conv_pw.weight.grad
    assert grad[:mid].abs().sum() > 0 and grad[mid:].abs().sum() == 0
    assert block.conv_dw.kernel_transform_5to3.grad.abs().sum() > 0
    assert not torch.equal(block.bn1.running_mean[:mid], before[:mid])
    assert torch.equal(block.bn1.running_mean[mid:], before[mid:])
    # Dropped blocks receive no gradient
    assert sn.blocks[3][-1].conv_pw.weight.grad is None


def test_grow_kernels(mbv3_large):
    sn = ofa_timm.elasticize(mbv3_large, grow_kernels=True).eval()
    assert all(k == (3, 5, 7) for k in sn.space.kernel_slots)
    x = torch.randn(1, 3, RES, RES)
    with torch.no_grad():
        assert_close(sn(x), mbv3_large(x))
        # A grown kernel at or above the source size is the zero-padded source kernel: same function.
        source_kernels = ofa_timm.elasticize(mbv3_large).space.max().kernels
        for k in (3, 5):
            sn.set_active(sn.space.max().replace(kernels=tuple(max(k, src) for src in source_kernels)))
            assert_close(sn(x), mbv3_large(x))


def test_custom_choices(mbv3_large):
    sn = ofa_timm.elasticize(mbv3_large, kernels=(3,), expands=(2, 3), depths=(1, 2), resolutions=(96, 128))
    assert sn.space.stages[2].depths == (1, 2, 4)
    assert sn.space.kernel_slots[3] == (3, 5)  # the source kernel stays allowed
    assert sn.space.resolutions == (96, 128)  # an explicit list is taken as given


def test_timm_model_api(mbv3_supernet):
    sn = mbv3_supernet
    x = torch.randn(2, 3, RES, RES)
    sn.set_active(sn.space.min())
    with torch.no_grad():
        feats = sn.forward_features(x)
        assert feats.shape[1] == sn.num_features == 960
        assert sn.forward_head(feats, pre_logits=True).shape == (2, 1280)
        assert torch.equal(sn.forward_head(feats), sn(x))
    assert [f['num_chs'] for f in sn.feature_info] == [16, 24, 40, 112, 960]
    assert sn.pretrained_cfg['input_size'] == (3, 224, 224)
    sn.set_grad_checkpointing(True)
    sn.train()
    out = sn(x)
    out.sum().backward()
    sn.set_grad_checkpointing(False)
    sn.eval()
    sn.zero_grad(set_to_none=True)
    sn.set_active(None)


def test_reset_classifier(mbv3_large):
    sn = ofa_timm.elasticize(mbv3_large)
    sn.reset_classifier(3)
    assert sn(torch.randn(1, 3, RES, RES)).shape == (1, 3)
    ext = sn.extract(sn.space.sample(0))
    assert ext.num_classes == 3 and ext(torch.randn(1, 3, RES, RES)).shape == (1, 3)
    sn.reset_classifier(0)
    assert sn(torch.randn(1, 3, RES, RES)).shape == (1, 1280)


def test_invalid_subnets_and_models(mbv3_supernet):
    with pytest.raises(ValueError, match=r'kernels\[0\] = 7 is not allowed for stage 0 block 0: allowed \[3\]'):
        mbv3_supernet.set_active(mbv3_supernet.space.max().replace(kernels=(7,) * 14))
    with pytest.raises(ValueError, match=r'depths has 3 entries'):
        mbv3_supernet.extract({'depths': [2, 2, 2], 'kernels': [3] * 14, 'expands': [3] * 14})
    with pytest.raises(ValueError, match='Cannot elasticize EfficientNet'):
        ofa_timm.elasticize(timm.create_model('efficientnet_b0'))
    with pytest.raises(ValueError, match='head norm'):
        ofa_timm.elasticize(timm.create_model('mobilenetv4_conv_small'))


def test_subnet_forms_accepted(mbv3_supernet, tmp_path):
    s = mbv3_supernet.space.sample(5)
    path = tmp_path / 's.json'
    s.to_json(path)
    for form in (s, s.to_dict(), str(path), {'ks': list(s.kernels), 'e': list(s.expands), 'd': list(s.depths),
                                             'r': [s.resolution]}):
        assert mbv3_supernet.set_active(form) == s
    mbv3_supernet.set_active(None)
    assert isinstance(Subnet.parse(path), Subnet)
