"""OFA-ResNet50: numerical parity with the reference implementation (PyPI ``ofa``) given the same weights."""
import random

import pytest

ofa_networks = pytest.importorskip('ofa.imagenet_classification.elastic_nn.networks')

import torch  # noqa: E402

from ofa_timm.elastic import OFAResNet, convert_ofa_resnet_state_dict, ofa_resnet50  # noqa: E402

from helpers import assert_close, randomize_bn  # noqa: E402


@pytest.fixture(scope='module')
def reference_and_ours():
    torch.manual_seed(0)
    ref = ofa_networks.OFAResNets(
        n_classes=10, depth_list=[0, 1, 2], expand_ratio_list=[0.2, 0.25, 0.35], width_mult_list=[0.65, 0.8, 1.0])
    randomize_bn(ref)
    ours = ofa_resnet50(num_classes=10)
    ours.load_state_dict(convert_ofa_resnet_state_dict(ref.state_dict()), strict=True)
    return ref.eval(), ours.eval()


def test_ofa_resnet50_matches_reference(reference_and_ours):
    ref, ours = reference_and_ours
    configs = [dict(d=[2] * 5, e=[0.35] * 18, w=[2] * 6), dict(d=[0] * 5, e=[0.2] * 18, w=[0] * 6)]
    for seed in range(4):
        random.seed(seed)
        configs.append(ref.sample_active_subnet())
    for cfg, res in zip(configs, (128, 160, 224, 144, 176, 192)):
        ref.set_active_subnet(**cfg)
        subnet = ours.set_active(cfg)
        x = torch.randn(2, 3, res, res)
        with torch.no_grad():
            expected = ref(x)
            assert_close(ours(x), expected)
            ext = ours.extract(subnet)
            assert type(ext) is OFAResNet and ext.conv1.residual == (cfg['d'][0] == 2)
            assert_close(ext(x), expected)
    ours.set_active(None)


def test_ofa_resnet_legacy_keys_and_errors(reference_and_ours):
    ref, _ = reference_and_ours
    legacy = {k.replace('.bn.bn.', '.bn.').replace('.conv.conv.weight', '.conv.weight'): v
              for k, v in ref.state_dict().items()}
    assert convert_ofa_resnet_state_dict(legacy).keys() == convert_ofa_resnet_state_dict(ref.state_dict()).keys()
    with pytest.raises(ValueError, match="'blocks.18.conv1.conv.conv.weight'"):
        convert_ofa_resnet_state_dict({'blocks.18.conv1.conv.conv.weight': torch.zeros(1)})
