"""The EfficientNet-builder families beyond MobileNetV3: EfficientNet, MobileNetV2, MNASNet, FBNet, SPNASNet, TinyNet,
LCNet, MobileNetV4-conv (the contract itself is tested in test_contract.py, with efficientnet_b0, fbnetc_100,
lcnet_100 and mobilenetv4_conv_small among its cases)."""
import pytest
import timm
import torch
import torch.nn as nn
from timm.models import EfficientNet, MobileNetV3, save_for_hf
from torch.utils.flop_counter import FlopCounterMode

import ofa_timm
from ofa_timm._timm import decode_arch_def
from ofa_timm.elastic import ElasticEfficientNet, ElasticMobileNetV3, EfficientNetBuilderSupernet
from ofa_timm.example_data import make_shapes_dataset
from ofa_timm.search import count_params
from ofa_timm.training import (
    DataConfig, Schedule, Stage, TrainConfig, Trainer, build_datasets, load_checkpoint)
from ofa_timm.training.sampling import space_dimensions

from helpers import assert_close, randomize_bn, timm_model

RES = 32  # five stride-2 stages: 1x1 at the end, enough to compare every layer

LISTED = [
    'efficientnet_b0', 'efficientnet_b1', 'efficientnet_b3', 'efficientnet_lite0', 'mobilenetv2_100', 'mobilenetv2_140',
    'mnasnet_100', 'fbnetc_100', 'spnasnet_100', 'tinynet_a', 'lcnet_100', 'mobilenetv4_conv_small']
# Static EdgeResidual stages and blocks without depthwise conv; SE reduced from the block input in a MobileNetV3.
MORE = ['mobilenetv4_conv_medium', 'efficientnet_es', 'fbnetv3_b']
NEW_NAMES = [
    'ofa_efficientnet_b1', 'ofa_efficientnet_b2', 'ofa_efficientnet_b3', 'ofa_efficientnet_lite0',
    'ofa_mobilenetv2_100', 'ofa_mobilenetv2_140', 'ofa_mnasnet_100', 'ofa_spnasnet_100', 'ofa_tinynet_a',
    'ofa_mobilenetv4_conv_medium']  # the contract covers ofa_efficientnet_b0, _fbnetc_100, _lcnet_100, _mbv4_conv_small


@pytest.fixture(scope='module')
def b0():
    return timm_model('efficientnet_b0')


@pytest.fixture
def b0_supernet(b0):
    sn = ofa_timm.elasticize(b0).eval()
    yield sn


@pytest.mark.parametrize('name', LISTED + MORE)
def test_max_is_the_source_and_ten_subnets_extract_and_describe_exactly(name):
    source = timm_model(name)
    sn = ofa_timm.elasticize(source).eval()
    assert isinstance(sn, ElasticEfficientNet if isinstance(source, EfficientNet) else ElasticMobileNetV3)
    x = torch.randn(2, 3, RES, RES)
    with torch.no_grad():
        expected = source(x)
        assert torch.equal(sn(x), expected)
        ext = sn.extract('max')
        assert torch.equal(ext(x), expected) and list(ext.state_dict()) == list(source.state_dict())
        for seed in range(10):
            sn.set_active(sn.space.sample(seed))
            ext = sn.extract()
            assert type(ext) is type(source)
            assert_close(ext(x), sn(x))
        specs = sn.describe()  # exact FLOPs and parameters of what the extracted model runs
        counter = FlopCounterMode(display=False)
        with counter:
            ext(x[:1])
        assert sum(s.flops(RES) for s in specs) == counter.get_total_flops()
        assert sum(s.params() for s in specs) == count_params(ext)


def test_efficientnet_space_and_se_reduced_from_block_input(b0_supernet):
    sn = b0_supernet
    space = sn.space
    assert sn.elastic_stages == (1, 2, 3, 4, 5, 6)  # the leading depthwise-separable stage stays static, as in OFA
    assert space.max().depths == (2, 2, 3, 3, 4, 1) and space.stages[3].depths == (2, 3)
    assert space.stages[1].kernels == ((3, 5),) * 2 and space.stages[0].kernels == ((3,),) * 2
    assert all(e == (3.0, 4.0, 6.0) for e in space.expand_slots)
    subnet = space.min()
    ext = sn.extract(subnet)
    # EfficientNet's SE reduces relative to the block input: at e3 the 16 -> 48 block keeps round(48 * 0.25 / 3) = 4
    assert ext.blocks[1][0].conv_pw.out_channels == 48 and ext.blocks[1][0].se.conv_reduce.out_channels == 4
    # The arch_def alone rebuilds the extracted model in plain timm
    again = EfficientNet(block_args=decode_arch_def(sn.arch_def(subnet)), num_classes=10, act_layer=nn.SiLU)
    again.load_state_dict(ext.state_dict())


def test_lcnet_has_depthwise_separable_stages_without_expand():
    sn = ofa_timm.elasticize(timm_model('lcnet_100'))
    space = sn.space
    assert sn.elastic_stages == tuple(range(6))
    assert set(space_dimensions(space)) == {'kernel', 'depth', 'resolution'}
    assert space.stages[4].depths == (2, 3, 4) and space.stages[4].kernels == ((3, 5),) * 4
    assert all(e == (1.0,) for e in space.expand_slots)
    ext = sn.extract('min')
    assert [len(s) for s in ext.blocks] == [1, 2, 2, 2, 2, 2]
    assert ext.blocks[4][1].conv_dw.kernel_size == (3, 3) and ext.blocks[5][1].se.conv_reduce.out_channels == 128


def test_mobilenetv4_universal_inverted_residuals():
    source = timm_model('mobilenetv4_conv_small')
    sn = ofa_timm.elasticize(source, grow_kernels=True).eval()
    assert sn.elastic_stages == (2, 3)  # ConvBnAct stages stay static
    space = sn.space
    # ExtraDW 'uir_a5_k5': dw_mid is elastic, dw_start static; ConvNeXt 'uir_a3_k0': dw_start is the elastic kernel
    assert space.stages[0].expands[0] == (3.0,) and space.stages[1].expands[0] == (3.0, 4.0, 6.0)
    assert all(k == (3, 5, 7) for k in space.kernel_slots)
    subnet = space.min().replace(depths=space.max().depths)
    ext = sn.extract(subnet)
    first, convnext = ext.blocks[2][0], ext.blocks[2][5]
    assert first.dw_start.conv.kernel_size == (5, 5) and first.dw_mid.conv.kernel_size == (3, 3)
    assert convnext.dw_start.conv.kernel_size == (3, 3) and isinstance(convnext.dw_mid, nn.Identity)
    assert ext.blocks[3][0].pw_exp.conv.out_channels == 3 * 96
    x = torch.randn(1, 3, RES, RES)
    with torch.no_grad():
        assert_close(sn(x), source(x))  # kernels grown to 7 by zero padding: the same function
        sn.set_active(subnet)
        assert_close(ext(x), sn(x))
    assert type(ext.norm_head) is type(source.norm_head)  # MobileNetV4's head norm


@pytest.mark.parametrize('name, match', [
    ('tf_efficientnet_b0', r"tf_efficientnet_b0 uses TensorFlow 'same' padding .* use 'efficientnet_b0' instead"),
    ('tf_mobilenetv3_large_100', r"TensorFlow 'same' padding .* use 'mobilenetv3_large_100' instead"),
    ('efficientnet_cc_b0_4e', r'blocks\.4\.0: CondConvResidual blocks are not supported; supported: Inverted'),
    ('mixnet_s', r'blocks\.1\.0\.conv_pw: MixedConv2d convs are not supported'),
    ('mobilenetv4_hybrid_medium', r'blocks\.1\.0: UniversalInvertedResidual blocks with layer scale'),
])
def test_unsupported_models_name_the_reason(name, match):
    with pytest.raises(ValueError, match=match):
        ofa_timm.elasticize(timm.create_model(name))


def test_options_and_source_untouched(b0):
    before = {k: v.clone() for k, v in b0.state_dict().items()}
    sn = ofa_timm.elasticize(b0, kernels=(3,), expands=(2, 4), depths=(1,), resolutions=(64,))
    assert sn.space.stages[0].depths == (1, 2) and sn.space.stages[0].kernels[0] == (3,)
    assert sn.space.stages[1].kernels[0] == (3, 5) and sn.space.expand_slots[0] == (2.0, 4.0, 6.0)
    with torch.no_grad():
        for p in sn.parameters():
            p.add_(1.0)
    assert all(torch.equal(v, b0.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ValueError, match=r"does not take \['widths'\]"):
        ofa_timm.elasticize(b0, widths=(0.5, 1.0))


def test_head_api(b0_supernet):
    sn = b0_supernet
    x = torch.randn(2, 3, RES, RES)
    sn.set_active('min')
    with torch.no_grad():
        feats = sn.forward_features(x)
        assert feats.shape[1] == sn.num_features == 1280  # EfficientNet's conv_head runs before pooling
        assert sn.forward_head(feats, pre_logits=True).shape == (2, 1280)
        assert torch.equal(sn.forward_head(feats), sn(x))
    sn.reset_classifier(3)
    assert sn(x).shape == (2, 3) and sn.extract().classifier.out_features == 3
    sn.set_grad_checkpointing(True)
    sn.train()
    sn(x).sum().backward()
    assert sn.blocks[1][0].conv_pw.weight.grad[48:].abs().sum() == 0  # min expand: unused channels get no gradient


def test_source_weights_load_through_the_registry(tmp_path):
    source = timm_model('efficientnet_b0', num_classes=1000)
    torch.save(source.state_dict(), tmp_path / 'b0.pth')
    overlay = dict(file=str(tmp_path / 'b0.pth'))
    supernet = timm.create_model('ofa_efficientnet_b0', pretrained=True, pretrained_cfg_overlay=overlay).eval()
    assert supernet.pretrained_cfg['hf_hub_id'] == 'timm/efficientnet_b0.ra_in1k'
    x = torch.randn(1, 3, RES, RES)
    with torch.no_grad():
        assert torch.equal(supernet(x), source(x))
        subnet = {'depths': [2, 2, 2, 2, 2, 1], 'kernels': [3] * 15, 'expands': [3] * 15}
        sub = timm.create_model('ofa_efficientnet_b0', pretrained=True, pretrained_cfg_overlay=overlay,
                                subnet=subnet).eval()
        assert type(sub) is EfficientNet
        supernet.set_active(subnet)
        assert_close(sub(x), supernet(x))
    assert 'ofa_efficientnet_b0.ra4_e3600_r224_in1k' in timm.list_pretrained('ofa_efficientnet_b0.*')


@pytest.mark.slow
@pytest.mark.parametrize('name', NEW_NAMES)
def test_registered_names_round_trip_and_give_features(name, tmp_path):
    torch.manual_seed(0)
    supernet = timm.create_model(name, num_classes=10)
    assert isinstance(supernet, EfficientNetBuilderSupernet)
    subnet = supernet.space.sample(3)
    torch.manual_seed(0)
    model = randomize_bn(timm.create_model(name, subnet=subnet.to_dict(), num_classes=10)).eval()
    save_for_hf(model, str(tmp_path), safe_serialization=True)
    again = timm.create_model(f'local-dir:{tmp_path}', pretrained=True).eval()
    assert type(again) is type(model) in (EfficientNet, MobileNetV3)
    x = torch.randn(1, 3, RES, RES)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
    for kwargs in ({}, {'subnet': 'min'}):
        features = timm.create_model(name, features_only=True, **kwargs).eval()
        with torch.no_grad():
            out = features(x)
        assert features.feature_info.channels() == [f.shape[1] for f in out] and len(out) == 5


@pytest.mark.slow
def test_progressive_shrinking_on_efficientnet(tmp_path):
    root = make_shapes_dataset(tmp_path / 'shapes', num_classes=4, train_per_class=8, val_per_class=4,
                               image_size=RES)
    train, val, calib, _ = build_datasets(DataConfig(str(root), image_size=RES, scale=(0.5, 1.0)), seed=0)
    torch.manual_seed(0)
    supernet = ofa_timm.elasticize(timm.create_model('efficientnet_b0', num_classes=4), resolutions=(24, RES))
    schedule = Schedule((
        Stage('full', 1, 1e-2, {}, kd_ratio=0.),
        Stage('kernel', 1, 1e-2, {'kernel': 'all', 'resolution': 'all'}),
        Stage('expand_1', 1, 5e-3, {'kernel': 'all', 'depth': 'all', 'expand': 2, 'resolution': 'all'},
              subnets_per_step=2),
    ))
    config = TrainConfig(output=str(tmp_path / 'run'), batch_size=8, workers=0, calib_images=8, progress=False)
    summaries = Trainer(supernet, schedule, train, val, calib, config).run()
    assert [s['stage'] for s in summaries] == ['full', 'kernel', 'expand_1']
    assert load_checkpoint(tmp_path / 'run' / 'last.pth')['position']['stage'] == 3
    ext = supernet.eval().extract(supernet.space.min())
    with torch.no_grad():
        x = torch.randn(2, 3, RES, RES)
        supernet.set_active('min')
        assert_close(ext(x), supernet(x))


def test_nni_space_over_efficientnet():
    pytest.importorskip('nni')
    from ofa_timm.plugins.nni import SupernetSpace

    torch.manual_seed(0)
    space = SupernetSpace(timm.create_model('ofa_efficientnet_b0', num_classes=3, resolutions=(24, RES)))
    assert 'stage1.block0.kernel' in space.labels and 'stage3.depth' in space.labels
    assert 'stage5.depth' not in space.labels  # a one-block stage: a single choice is not exposed
    for seed in range(3):
        subnet = space.supernet.space.sample(seed)
        assert space.to_subnet(space.to_sample(subnet)) == subnet
    frozen = space.freeze(space.to_sample(space.supernet.space.min()))
    with torch.no_grad():
        assert frozen.eval()(torch.randn(1, 3, RES, RES)).shape == (1, 3)
