"""Reference OFA checkpoints (PyPI ``ofa``'s networks and key names) loaded through timm's registry."""
import random

import pytest

ofa_networks = pytest.importorskip('ofa.imagenet_classification.elastic_nn.networks')

import timm  # noqa: E402
import torch  # noqa: E402
from timm.models import MobileNetV3  # noqa: E402

import ofa_timm  # noqa: E402,F401  registers the models
from ofa_timm.elastic import OFAResNet  # noqa: E402

from helpers import assert_close, randomize_bn  # noqa: E402


def _reference(kind: str):
    torch.manual_seed(0)
    if kind == 'resnet':
        ref = ofa_networks.OFAResNets(n_classes=1000, depth_list=[0, 1, 2], expand_ratio_list=[0.2, 0.25, 0.35],
                                      width_mult_list=[0.65, 0.8, 1.0])
    else:
        ref = ofa_networks.OFAMobileNetV3(n_classes=1000, width_mult=float(kind), ks_list=[3, 5, 7],
                                          expand_ratio_list=[3, 4, 6], depth_list=[2, 3, 4], dropout_rate=0)
        with torch.no_grad():
            for name, p in ref.named_parameters():
                if name.endswith('_matrix'):
                    p.add_(torch.randn_like(p) * 0.1)
    return randomize_bn(ref).eval()


@pytest.mark.parametrize('name, kind', [('ofa_mbv3_w12', '1.2'), ('ofa_mbv3_w10', '1.0'), ('ofa_resnet50', 'resnet')])
def test_reference_checkpoints_load_through_create_model(tmp_path, name, kind):
    ref = _reference(kind)
    file = tmp_path / name  # the published files have no extension and wrap the weights in 'state_dict'
    torch.save({'state_dict': ref.state_dict(), 'epoch': 0}, file)
    overlay = dict(file=str(file))
    supernet = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay).eval()
    for seed in range(3):
        random.seed(seed)
        cfg = ref.sample_active_subnet()
        x = torch.randn(1, 3, 128, 128)
        with torch.no_grad():
            expected = ref(x)
            supernet.set_active(cfg)
            assert_close(supernet(x), expected)
            static = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, subnet=cfg).eval()
            assert type(static) in (MobileNetV3, OFAResNet)
            assert_close(static(x), expected)


def test_reference_legacy_checkpoint(tmp_path):
    ref = _reference('1.0')
    legacy = {k.replace('.conv.', '.mobile_inverted_conv.', 1) if k.startswith('blocks.') else k: v
              for k, v in ref.state_dict().items()}
    torch.save({'state_dict': legacy}, tmp_path / 'legacy')
    overlay = dict(file=str(tmp_path / 'legacy'))
    model = timm.create_model('ofa_mbv3_w10', pretrained=True, pretrained_cfg_overlay=overlay)
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        assert_close(model.eval()(x), ref(x))
