"""timm registry: names, subnet= forms, offline pretrained loading, features_only, local-dir round trips."""
import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models import MobileNetV3, ResNet, save_for_hf

import ofa_timm  # noqa: F401  registers the models
from ofa_timm import Subnet
from ofa_timm.elastic import ElasticMobileNetV3, ElasticResNet, OFAResNet

from conftest import assert_close, randomize_bn

RES = 64
NAMES = ['ofa_mbv3', 'ofa_mbv3_w10', 'ofa_mbv3_w12', 'ofa_resnet50', 'ofa_mobilenetv3_large_100',
         'ofa_mobilenetv3_large_075', 'ofa_mobilenetv3_small_100', 'ofa_resnet50d', 'ofa_resnet26d',
         'ofa_resnet101', 'ofa_resnet34']


def test_names_are_listed():
    assert set(timm.list_models('ofa_*')) == set(NAMES)
    pretrained = timm.list_pretrained('ofa_*')
    for tag in ('ofa_mbv3_w12.ofa_in1k', 'ofa_mbv3_w10.ofa_in1k', 'ofa_resnet50.ofa_in1k',
                'ofa_mobilenetv3_large_100.ra_in1k', 'ofa_resnet50d.ra2_in1k'):
        assert tag in pretrained
    cfg = timm.models.get_pretrained_cfg('ofa_mbv3_w12')
    assert cfg.url.endswith('ofa_mbv3_d234_e346_k357_w1.2')
    assert timm.models.get_pretrained_cfg('ofa_mobilenetv3_large_100').hf_hub_id == 'timm/mobilenetv3_large_100.ra_in1k'


@pytest.mark.parametrize('name', NAMES)
def test_each_name_builds_a_trainable_supernet(name):
    model = timm.create_model(name, num_classes=5)
    assert isinstance(model, (ElasticMobileNetV3, ElasticResNet))
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
    with pytest.raises(ValueError, match=r'kernels\[0\] = 9 is not allowed'):
        timm.create_model('ofa_mbv3', subnet={'ks': [9] * 20, 'e': [3] * 20, 'd': [2] * 5})
    with pytest.raises(ValueError, match='Unknown subnet dict keys'):
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


ofa_networks = pytest.importorskip('ofa.imagenet_classification.elastic_nn.networks')


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
    import random
    ref = _reference(kind)
    file = tmp_path / name  # the published files have no extension and wrap the weights in 'state_dict'
    torch.save({'state_dict': ref.state_dict(), 'epoch': 0}, file)
    overlay = dict(file=str(file))
    supernet = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay).eval()
    for seed in range(3):
        random.seed(seed)
        cfg = ref.sample_active_subnet()
        subnet = Subnet.from_dict(cfg)
        x = torch.randn(1, 3, 128, 128)
        with torch.no_grad():
            expected = ref(x)
            supernet.set_active(subnet)
            assert_close(supernet(x), expected)
            static = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, subnet=cfg).eval()
            assert type(static) in (MobileNetV3, OFAResNet)
            assert_close(static(x), expected)


def test_reference_legacy_checkpoint(tmp_path):
    ref = _reference('1.0')
    legacy = {k.replace('.conv.', '.mobile_inverted_conv.', 1) if k.startswith('blocks.') else k: v
              for k, v in ref.state_dict().items()}
    torch.save({'state_dict': legacy}, tmp_path / 'legacy')
    model = timm.create_model('ofa_mbv3_w10', pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / 'legacy')))
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        assert_close(model.eval()(x), ref(x))


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
        with pytest.raises(RuntimeError, match=r"does not fit ofa_resnet50d: missing keys \['conv1\.0\.weight'.* and \d+ more, "
                                               r"unexpected keys \['conv1\.weight'.*shape mismatches "
                                               r"\['layer1\.0\.conv1\.weight: checkpoint \(64, 64, 3, 3\) vs model"):
            timm.create_model('ofa_resnet50d', pretrained=True, subnet=subnet,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / 'r18.pth')))
    torch.save({'state_dict': {'first_conv.conv.weight': torch.zeros(1), 'blocks.0.bogus.weight': torch.zeros(1)}},
               tmp_path / 'bad')
    with pytest.raises(ValueError, match="'blocks.0.bogus.weight' is not part of an OFA MobileNetV3"):
        timm.create_model('ofa_mbv3', pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / 'bad')))


@pytest.mark.parametrize('name', ['ofa_mbv3', 'ofa_resnet50d'])
def test_features_only(name):
    x = torch.randn(1, 3, RES, RES)
    supernet = timm.create_model(name, features_only=True).eval()
    subnet = timm.create_model(name, features_only=True, subnet='min', out_indices=(1, 3)).eval()
    feats = supernet(x)
    assert len(feats) == 5 and feats[-1].shape[-1] == RES // 32
    assert supernet.feature_info.channels() == [f.shape[1] for f in feats]
    small = subnet(x)
    assert len(small) == 2 and subnet.feature_info.channels() == [f.shape[1] for f in small]


@pytest.mark.parametrize('name, subnet', [
    ('ofa_mbv3', {'ks': [3, 5, 7, 3] * 5, 'e': [3, 4, 6, 4] * 5, 'd': [2, 3, 4, 2, 3], 'r': 160}),
    ('ofa_resnet50d', 'min'),
    ('ofa_resnet50', {'d': [0, 1, 2, 0, 1], 'e': [0.25] * 18, 'w': [0, 1, 2, 1, 0, 2]}),
])
def test_local_dir_round_trip(tmp_path, name, subnet):
    model = timm.create_model(name, subnet=subnet, num_classes=10).eval()
    save_for_hf(model, str(tmp_path), safe_serialization=True)
    again = timm.create_model(f'local-dir:{tmp_path}', pretrained=True).eval()
    assert type(again) is type(model) and type(again) in (MobileNetV3, ResNet, OFAResNet)
    x = torch.randn(2, 3, RES, RES)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
    assert again.pretrained_cfg['input_size'] == model.pretrained_cfg['input_size']
