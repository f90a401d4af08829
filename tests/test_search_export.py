"""Export of subnets: timm folder, safetensors, ONNX (checked against ONNX Runtime), pt2; nothing partial on errors."""
import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

import ofa_timm  # noqa: F401  registers the ofa_* models
from ofa_timm.search import export_subnet, load_supernet

from helpers import randomize_bn

RES = 40


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    """A trained run's supernet.safetensors (weights and the space in its metadata)."""
    import json
    torch.manual_seed(0)
    supernet = randomize_bn(timm.create_model('ofa_mobilenetv3_small_100', num_classes=5, resolutions=(32, RES)))
    path = tmp_path_factory.mktemp('ckpt') / 'supernet.safetensors'
    save_file({k: v.contiguous() for k, v in supernet.state_dict().items()}, str(path),
              metadata={'space': json.dumps(supernet.space.to_dict())})
    return path


@pytest.fixture(scope='module')
def supernet(checkpoint):
    return load_supernet('ofa_mobilenetv3_small_100', checkpoint)


def test_load_supernet_reads_classes_space_and_every_weight(supernet, checkpoint):
    from safetensors.torch import load_file
    assert supernet.num_classes == 5 and supernet.space.resolutions == (32, RES)
    stored = load_file(str(checkpoint))
    assert all(torch.equal(v, stored[k]) for k, v in supernet.state_dict().items())  # the classifier too


def test_timm_folder_round_trip(supernet, tmp_path):
    subnet = supernet.space.sample(1).replace(resolution=RES)
    result = export_subnet(supernet, subnet, tmp_path / 'out', formats=('timm', 'safetensors'))
    names = sorted(p.name for p in (tmp_path / 'out').iterdir())
    assert names == ['config.json', 'model.safetensors', 'subnet.json']
    assert result['subnet'] == subnet
    again = timm.create_model(f'local-dir:{tmp_path / "out"}', pretrained=True).eval()
    x = torch.randn(2, 3, RES, RES)
    with torch.no_grad():
        assert torch.equal(again(x), supernet.extract(subnet).eval()(x))
    weights = str(tmp_path / 'out' / 'model.safetensors')
    plain = timm.create_model('ofa_mobilenetv3_small_100', num_classes=5, resolutions=(32, RES),
                              subnet=str(tmp_path / 'out' / 'subnet.json'), pretrained=True,
                              pretrained_cfg_overlay=dict(file=weights, num_classes=5)).eval()
    with torch.no_grad():
        assert torch.equal(plain(x), again(x))


def test_onnx_matches_onnxruntime_and_pt2_matches_eager(supernet, tmp_path):
    ort = pytest.importorskip('onnxruntime')
    subnet = supernet.space.sample(2)
    result = export_subnet(supernet, subnet, tmp_path / 'out', formats=('onnx', 'pt2'), batch_size=2)
    assert result['onnx_max_abs_diff'] < 1e-4 and result['pt2_max_abs_diff'] < 1e-4
    session = ort.InferenceSession(str(tmp_path / 'out' / 'model.onnx'), providers=['CPUExecutionProvider'])
    x = torch.randn(3, 3, subnet.resolution, subnet.resolution)  # another batch size: the batch axis is dynamic
    with torch.no_grad():
        expected = supernet.extract(subnet).eval()(x).numpy()
    assert np.abs(session.run(None, {'input': x.numpy()})[0] - expected).max() < 1e-4
    program = torch.export.load(str(tmp_path / 'out' / 'model.pt2'))
    x2 = torch.randn(2, 3, subnet.resolution, subnet.resolution)
    with torch.no_grad():
        assert torch.allclose(program.module()(x2), supernet.extract(subnet).eval()(x2), atol=1e-5)


def test_bad_input_writes_nothing(supernet, checkpoint, tmp_path):
    out = tmp_path / 'out'
    with pytest.raises(ValueError, match='not allowed'):
        export_subnet(supernet, supernet.space.max().replace(resolution=224), out)
    with pytest.raises(ValueError, match='Unknown export format'):
        export_subnet(supernet, 'max', out, formats=('tflite',))
    blocker = tmp_path / 'file'
    blocker.write_text('')
    with pytest.raises(ValueError, match='Cannot write'):
        export_subnet(supernet, 'max', blocker / 'out')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['file']  # no folder, no staging left behind
    with pytest.raises(ValueError, match='does not fit ofa_resnet34'):
        load_supernet('ofa_resnet34', checkpoint)
    with pytest.raises(ValueError, match='does not exist'):
        load_supernet('ofa_resnet34', tmp_path / 'missing.safetensors')
    with pytest.raises(ValueError, match='registered ofa_'):
        load_supernet('resnet34')
