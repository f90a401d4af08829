"""OFA MobileNetV3: numerical parity with the reference implementation (PyPI ``ofa``) given the same weights."""
import pytest

ofa_networks = pytest.importorskip('ofa.imagenet_classification.elastic_nn.networks')

import torch  # noqa: E402

from ofa_timm.elastic import convert_ofa_state_dict, ofa_mobilenetv3  # noqa: E402

from helpers import assert_close, randomize_bn  # noqa: E402


def reference_mbv3(width_mult: float, seed: int = 0):
    torch.manual_seed(seed)
    ref = ofa_networks.OFAMobileNetV3(
        n_classes=10, width_mult=width_mult, ks_list=[3, 5, 7], expand_ratio_list=[3, 4, 6], depth_list=[2, 3, 4],
        dropout_rate=0)
    randomize_bn(ref, seed)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith('_matrix'):  # perturbed away from identity, so the transforms are really tested
                p.add_(torch.randn_like(p) * 0.1)
    return ref.eval()


@pytest.mark.parametrize('width_mult', [1.0, 1.2])
def test_ofa_mbv3_matches_reference(width_mult):
    ref = reference_mbv3(width_mult)
    sn = ofa_mobilenetv3(width_mult, num_classes=10).eval()
    sn.load_state_dict(convert_ofa_state_dict(ref.state_dict()), strict=True)
    subnets = [sn.space.max(), sn.space.min()] + [sn.space.sample(i) for i in range(4)]
    for i, subnet in enumerate(subnets):
        res = (128, 160, 224, 144, 176, 192)[i]
        ref.set_active_subnet(ks=list(subnet.kernels), e=[int(e) for e in subnet.expands], d=list(subnet.depths))
        sn.set_active(subnet)
        x = torch.randn(2, 3, res, res)
        with torch.no_grad():
            expected = ref(x)
            assert_close(sn(x), expected)
            assert_close(sn.extract()(x), expected)


def test_reference_legacy_keys_and_errors():
    ref = reference_mbv3(1.0)
    legacy = {k.replace('.conv.', '.mobile_inverted_conv.', 1) if k.startswith('blocks.') else k: v
              for k, v in ref.state_dict().items()}
    assert convert_ofa_state_dict(legacy).keys() == convert_ofa_state_dict(ref.state_dict()).keys()
    with pytest.raises(ValueError, match="'blocks.99.conv.depth_conv.conv.conv.weight'"):
        convert_ofa_state_dict({'blocks.99.conv.depth_conv.conv.conv.weight': torch.zeros(1)})
    with pytest.raises(ValueError, match="'head.fc.weight' is not part of"):
        convert_ofa_state_dict({'head.fc.weight': torch.zeros(1)})
