"""timm registry: names, subnet= forms, offline pretrained loading, checkpoints of this project."""
import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models import MobileNetV3, save_for_hf

import ofa_timm  # noqa: F401  registers the models
from ofa_timm.elastic import ElasticSupernet, OFAResNet

from helpers import assert_close, randomize_bn

RES = 64
NAMES = ['ofa_mbv3', 'ofa_mbv3_w10', 'ofa_mbv3_w12', 'ofa_resnet50', 'ofa_mobilenetv3_large_100',
         'ofa_mobilenetv3_large_075', 'ofa_mobilenetv3_small_100', 'ofa_resnet50d', 'ofa_resnet26d',
         'ofa_resnet101', 'ofa_resnet34', 'ofa_mobilenetv4_conv_small', 'ofa_mobilenetv4_conv_medium', 'ofa_lcnet_100',
         'ofa_efficientnet_b0', 'ofa_efficientnet_b1', 'ofa_efficientnet_b2', 'ofa_efficientnet_b3',
         'ofa_efficientnet_lite0', 'ofa_mobilenetv2_100', 'ofa_mobilenetv2_140', 'ofa_mnasnet_100', 'ofa_fbnetc_100',
         'ofa_spnasnet_100', 'ofa_tinynet_a', 'ofa_vit_tiny_patch16_224', 'ofa_vit_small_patch16_224',
         'ofa_deit_tiny_patch16_224', 'ofa_deit_small_patch16_224', 'ofa_convnext_atto', 'ofa_convnext_femto',
         'ofa_convnext_pico', 'ofa_convnext_nano', 'ofa_convnext_tiny']


def test_names_are_listed():
    assert set(timm.list_models('ofa_*')) == set(NAMES)
    pretrained = timm.list_pretrained('ofa_*')
    for tag in ('ofa_mbv3_w12.ofa_in1k', 'ofa_mbv3_w10.ofa_in1k', 'ofa_resnet50.ofa_in1k',
                'ofa_mobilenetv3_large_100.ra_in1k', 'ofa_resnet50d.ra2_in1k',
                'ofa_vit_tiny_patch16_224.augreg_in21k_ft_in1k', 'ofa_deit_small_patch16_224.fb_in1k'):
        assert tag in pretrained
    cfg = timm.models.get_pretrained_cfg('ofa_mbv3_w12')
    assert cfg.url.endswith('ofa_mbv3_d234_e346_k357_w1.2')
    assert timm.models.get_pretrained_cfg('ofa_mobilenetv3_large_100').hf_hub_id == 'timm/mobilenetv3_large_100.ra_in1k'


@pytest.mark.parametrize('name', NAMES)
def test_each_name_builds_a_trainable_supernet(name):
    model = timm.create_model(name, num_classes=5)
    assert isinstance(model, ElasticSupernet)
    assert model.pretrained_cfg['architecture'] == name
    model.set_active(model.space.min())
    out = model(torch.randn(2, 3, RES, RES))
    assert out.shape == (2, 5)
    out.sum().backward()


@pytest.fixture(scope='module')
def mbv3():
    return timm.create_model('ofa_mbv3', num_classes=10).eval()


def test_subnet_forms(mbv3, tmp_path):
    s = mbv3.space.sample(0)
    path = tmp_path / 'subnet.json'
    s.to_json(path)
    ref_form = {'ks': list(s.kernels), 'e': list(s.expands), 'd': list(s.depths), 'r': s.resolution}
    outputs = []
    x = torch.randn(1, 3, RES, RES)
    for form in (s, s.to_dict(), ref_form, str(path), path):
        torch.manual_seed(0)  # same random supernet weights every time
        model = timm.create_model('ofa_mbv3', subnet=form, num_classes=10).eval()
        assert type(model) is MobileNetV3
        assert model.pretrained_cfg['input_size'] == (3, s.resolution, s.resolution)
        outputs.append(model(x))
    assert all(torch.equal(o, outputs[0]) for o in outputs)
    assert type(timm.create_model('ofa_mbv3', subnet='max')) is MobileNetV3
    assert sum(len(st) for st in timm.create_model('ofa_mbv3', subnet='min').blocks) == 2 * 5 + 2


def test_bad_inputs():
    with pytest.raises(RuntimeError, match='Unknown model'):
        timm.create_model('ofa_mbv9')
    with pytest.raises(ValueError, match=r"subnet='biggest': expected 'max', 'min'"):
        timm.create_model('ofa_mbv3', subnet='biggest')
    with pytest.raises(ValueError, match=r'kernels\[0\] \(stage 0 block 0\) = 9 is not allowed'):
        timm.create_model('ofa_mbv3', subnet={'ks': [9] * 20, 'e': [3] * 20, 'd': [2] * 5})
    with pytest.raises(ValueError, match=r"values for \['kernel'\], which this space does not have"):
        timm.create_model('ofa_mbv3', subnet={'kernel': [3]})


def _save(state, path):
    if str(path).endswith('.safetensors'):
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return str(path)


@pytest.mark.parametrize('ext', ['pth', 'safetensors'])
def test_timm_source_weights_make_max_subnet_the_pretrained_model(tmp_path, ext):
    torch.manual_seed(0)
    source = randomize_bn(timm.create_model('mobilenetv3_large_100')).eval()
    file = _save(source.state_dict(), tmp_path / f'weights.{ext}')
    overlay = dict(file=file)
    supernet = timm.create_model('ofa_mobilenetv3_large_100', pretrained=True, pretrained_cfg_overlay=overlay).eval()
    x = torch.randn(2, 3, RES, RES)
    with torch.no_grad():
        assert_close(supernet(x), source(x))
        sub = timm.create_model('ofa_mobilenetv3_large_100', pretrained=True, pretrained_cfg_overlay=overlay,
                                subnet='min').eval()
        supernet.set_active('min')
        assert_close(sub(x), supernet(x))


def test_resnet_source_weights_new_head_and_in_chans(tmp_path):
    torch.manual_seed(0)
    source = randomize_bn(timm.create_model('resnet50d')).eval()
    file = _save(source.state_dict(), tmp_path / 'r50d.safetensors')
    supernet = timm.create_model('ofa_resnet50d', pretrained=True, pretrained_cfg_overlay=dict(file=file)).eval()
    x = torch.randn(1, 3, RES, RES)
    with torch.no_grad():
        assert_close(supernet(x), source(x))
    # A new class count keeps the backbone and gets a fresh head, as in timm
    ten = timm.create_model('ofa_resnet50d', pretrained=True, pretrained_cfg_overlay=dict(file=file), num_classes=10,
                            subnet='max').eval()
    assert ten.fc.out_features == 10
    with torch.no_grad():
        assert_close(ten.forward_head(ten.forward_features(x), pre_logits=True),
                     source.forward_head(source.forward_features(x), pre_logits=True))
    gray = timm.create_model('ofa_resnet50d', pretrained=True, pretrained_cfg_overlay=dict(file=file), in_chans=1)
    assert gray.conv1[0].weight.shape[1] == 1
    assert torch.allclose(gray.conv1[0].weight[:, 0], source.conv1[0].weight.sum(1))


def test_project_checkpoint_path(tmp_path, mbv3):
    with torch.no_grad():
        for p in mbv3.parameters():
            p.add_(0.01)
    torch.save({'model': mbv3.state_dict(), 'epoch': 3}, tmp_path / 'ckpt.pth')
    loaded = timm.create_model('ofa_mbv3', num_classes=10, checkpoint_path=str(tmp_path / 'ckpt.pth')).eval()
    x = torch.randn(1, 3, RES, RES)
    with torch.no_grad():
        assert torch.equal(loaded(x), mbv3(x))
    # The same file as pretrained weights of a subnet (its head has 10 classes: say so, as timm expects)
    sub = timm.create_model('ofa_mbv3', num_classes=10, pretrained=True, subnet='min',
                            pretrained_cfg_overlay=dict(file=str(tmp_path / 'ckpt.pth'), num_classes=10)).eval()
    mbv3.set_active('min')
    with torch.no_grad():
        assert_close(sub(x), mbv3(x))
    mbv3.set_active(None)


def test_wrong_architecture_checkpoint_names_keys(tmp_path):
    torch.save(timm.create_model('resnet18').state_dict(), tmp_path / 'r18.pth')
    for subnet in (None, 'min'):
        with pytest.raises(RuntimeError, match=r"does not fit ofa_resnet50d: missing keys "
                                               r"\['conv1\.0\.weight'.* and \d+ more, "
                                               r"unexpected keys \['conv1\.weight'.*shape mismatches "
                                               r"\['layer1\.0\.conv1\.weight: checkpoint \(64, 64, 3, 3\) vs model"):
            timm.create_model('ofa_resnet50d', pretrained=True, subnet=subnet,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / 'r18.pth')))
    torch.save({'state_dict': {'first_conv.conv.weight': torch.zeros(1), 'blocks.0.bogus.weight': torch.zeros(1)}},
               tmp_path / 'bad')
    with pytest.raises(ValueError, match="'blocks.0.bogus.weight' is not part of an OFA MobileNetV3"):
        timm.create_model('ofa_mbv3', pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / 'bad')))


def test_local_dir_round_trip_with_reference_subnet_dict(tmp_path):
    subnet = {'d': [0, 1, 2, 0, 1], 'e': [0.25] * 18, 'w': [0, 1, 2, 1, 0, 2]}
    model = timm.create_model('ofa_resnet50', subnet=subnet, num_classes=10).eval()
    save_for_hf(model, str(tmp_path), safe_serialization=True)
    again = timm.create_model(f'local-dir:{tmp_path}', pretrained=True).eval()
    assert type(again) is OFAResNet
    x = torch.randn(2, 3, RES, RES)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
