"""What is particular to the MobileNetV3 family (the contract itself is tested in test_contract.py)."""
from functools import partial

import pytest
import timm
import torch
import torch.nn as nn
from timm.models import MobileNetV3

import ofa_timm
from ofa_timm import Subnet
from ofa_timm._timm import SqueezeExcite, decode_arch_def, round_channels
from ofa_timm.elastic import ElasticConv2d

from helpers import assert_close

RES = 64  # small inputs keep the suite fast; any resolution works


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


def test_random_subnets_have_the_subnet_depths(mbv3_supernet):
    for seed in range(3):
        subnet = mbv3_supernet.space.sample(seed)
        ext = mbv3_supernet.extract(subnet)
        assert sum(len(s) for s in ext.blocks) == sum(subnet.depths) + 2  # + fixed ds and conv stages


def test_extracted_arch_def_rebuilds_in_plain_timm(mbv3_supernet):
    subnet = mbv3_supernet.space.sample(1)
    ext = mbv3_supernet.extract(subnet)
    se_layer = partial(SqueezeExcite, gate_layer='hard_sigmoid', force_act_layer=nn.ReLU, rd_round_fn=round_channels)
    again = timm.models.MobileNetV3(
        block_args=decode_arch_def(mbv3_supernet.arch_def(subnet)), num_classes=10, se_layer=se_layer,
        act_layer=nn.Hardswish)
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
    with pytest.raises(ValueError, match=r"does not take \['widths'\]; its space options are"):
        ofa_timm.elasticize(mbv3_large, widths=(0.5, 1.0))


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
    sn(x).sum().backward()


def test_reset_classifier(mbv3_large):
    sn = ofa_timm.elasticize(mbv3_large)
    sn.reset_classifier(3)
    assert sn(torch.randn(1, 3, RES, RES)).shape == (1, 3)
    ext = sn.extract(sn.space.sample(0))
    assert ext.num_classes == 3 and ext(torch.randn(1, 3, RES, RES)).shape == (1, 3)
    sn.reset_classifier(0)
    assert sn(torch.randn(1, 3, RES, RES)).shape == (1, 1280)


def test_invalid_subnets_and_models(mbv3_supernet):
    with pytest.raises(ValueError, match=r'kernels\[0\] \(stage 0 block 0\) = 7 is not allowed: allowed \[3\]'):
        mbv3_supernet.set_active(mbv3_supernet.space.max().replace(kernels=(7,) * 14))
    with pytest.raises(ValueError, match=r'depths has 3 entries'):
        mbv3_supernet.extract({'depths': [2, 2, 2], 'kernels': [3] * 14, 'expands': [3] * 14})
    with pytest.raises(ValueError, match='Cannot elasticize GhostNet: supported timm model classes are'):
        ofa_timm.elasticize(timm.create_model('ghostnet_100'))


def test_subnet_forms_accepted(mbv3_supernet, tmp_path):
    s = mbv3_supernet.space.sample(5)
    path = tmp_path / 's.json'
    s.to_json(path)
    reference = {'ks': list(s.kernels), 'e': list(s.expands), 'd': list(s.depths), 'r': [s.resolution]}
    ref_path = tmp_path / 'ref.json'
    ref_path.write_text(__import__('json').dumps(reference))
    for form in (s, s.to_dict(), str(path), path, reference, str(ref_path)):
        assert mbv3_supernet.set_active(form) == s
    assert isinstance(Subnet.parse(path), Subnet)


def test_reference_subnet_form(mbv3_supernet):
    mn = mbv3_supernet.space.min()
    ks, e, d = list(mn.kernels), list(mn.expands), list(mn.depths)
    s = mbv3_supernet.resolve({'ks': ks, 'e': e, 'd': d})
    assert s.kernels == tuple(ks) and s.expands == tuple(map(float, e)) and s.depths == tuple(d)
    assert s.resolution is None
    assert mbv3_supernet.resolve({'ks': ks, 'e': e, 'd': d, 'r': [176], 'wid': None}).resolution == 176
    assert mbv3_supernet.resolve({'ks': ks, 'e': e, 'd': d, 'r': 160}).resolution == 160
    with pytest.raises(ValueError, match='have keys ks, e, d'):
        mbv3_supernet.resolve({'ks': ks, 'e': e})
    with pytest.raises(ValueError, match="'wid' must be None"):
        mbv3_supernet.resolve({'ks': ks, 'e': e, 'd': d, 'wid': 1})
    with pytest.raises(ValueError, match="reference implementation's form"):
        Subnet.from_dict({'ks': ks, 'e': e, 'd': d})
    assert type(mbv3_supernet.extract({'ks': ks, 'e': e, 'd': d, 'r': 160})) is MobileNetV3
