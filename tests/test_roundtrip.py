"""A trained run loads back exactly through every documented route; bad files and a missing network give errors that
say what is wrong and what to do."""
import json
import os
import random
import re
import socket
import time

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from timm.models import load_checkpoint, resume_checkpoint, save_for_hf

import ofa_timm  # noqa: F401  registers the models
from ofa_timm.example_data import make_shapes_dataset
from ofa_timm.cli import main
from ofa_timm.training import Schedule, Stage, load_checkpoint as load_run_checkpoint

RES = (24, 32)
NUM_CLASSES = 3
FAMILIES = ['ofa_mobilenetv3_small_100', 'ofa_resnet26d', 'ofa_efficientnet_b0']


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    return make_shapes_dataset(tmp_path_factory.mktemp('rt_shapes'), num_classes=NUM_CLASSES, train_per_class=8,
                               val_per_class=4, image_size=RES[-1])


def train_args(name, shapes, out, schedule):
    return ['train', '--model', name, '--data-dir', str(shapes), '--schedule', str(schedule), '--resolutions',
            *map(str, RES), '--batch-size', '8', '--workers', '0', '--calib-images', '8', '--output', str(out),
            '--no-progress']


def tiny_schedule(path):
    Schedule((Stage('depth', 1, 1e-2, {'depth': 'all', 'resolution': 'all'}),)).to_yaml(path)
    return path


@pytest.fixture(scope='module', params=FAMILIES)
def run(request, shapes, tmp_path_factory):
    """A few steps of `ofa-timm train`; returns (name, run folder, the trained supernet loaded by hand)."""
    name = request.param
    tmp = tmp_path_factory.mktemp(name)
    out = tmp / 'run'
    assert main(train_args(name, shapes, out, tiny_schedule(tmp / 'tiny.yaml'))) == 0
    trained = timm.create_model(name, num_classes=NUM_CLASSES, resolutions=RES).eval()
    trained.load_state_dict(load_file(out / 'supernet.safetensors'))
    return name, out, trained


def assert_same_state(model, reference):
    a, b = model.state_dict(), reference.state_dict()
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]


def test_checkpoint_carries_what_rebuilds_its_model(run):
    name, out, trained = run
    with safe_open(str(out / 'supernet.safetensors'), 'pt') as f:
        meta = f.metadata()
    assert meta['model'] == name and meta['num_classes'] == str(NUM_CLASSES)
    assert json.loads(meta['resolutions']) == list(RES)
    assert json.loads(meta['space']) == trained.space.to_dict()
    args = json.loads(meta['model_args'])
    assert args['num_classes'] == NUM_CLASSES and args['resolutions'] == list(RES)
    assert load_run_checkpoint(out / 'last.pth')['metadata'] == {k: v for k, v in meta.items() if k != 'format'}


def test_every_route_loads_the_trained_run_exactly(run, tmp_path):
    name, out, trained = run
    path = str(out / 'supernet.safetensors')
    subnet = trained.space.sample(1)
    subnet.to_json(tmp_path / 'subnet.json')
    expected = trained.extract(subnet).eval()
    # The trained head is not what a fresh model has: a silent re-initialisation would show
    assert not torch.equal(expected.get_classifier().weight,
                           timm.create_model(name, num_classes=NUM_CLASSES).get_classifier().weight)
    # checkpoint_path, without and with subnet=
    assert_same_state(timm.create_model(name, num_classes=NUM_CLASSES, resolutions=RES, checkpoint_path=path), trained)
    for form in (subnet, subnet.to_dict(), str(tmp_path / 'subnet.json')):
        model = timm.create_model(name, num_classes=NUM_CLASSES, resolutions=RES, checkpoint_path=path, subnet=form)
        assert_same_state(model, expected)
    # pretrained_cfg_overlay file: num_classes and resolutions come from the checkpoint; as timm's train.py passes it
    for overlay, kwargs in ((dict(file=path), {}),
                            (dict(file=path), dict(num_classes=NUM_CLASSES)),
                            (dict(file=path, num_classes=-1), {}),  # train.py --pretrained --pretrained-path
                            (dict(file=str(out / 'last.pth')), {})):  # the run's own checkpoint
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, subnet=subnet.to_dict(),
                                  **kwargs)
        assert model.num_classes == NUM_CLASSES
        assert_same_state(model, expected)
        supernet = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
        assert supernet.space == trained.space
        assert_same_state(supernet, trained)
    # timm.models.load_checkpoint into a subnet (what train.py --initial-checkpoint does); the random state is kept
    model = timm.create_model(name, num_classes=NUM_CLASSES, resolutions=RES, subnet=subnet.to_dict())
    rng = torch.get_rng_state()
    load_checkpoint(model, path)
    assert torch.equal(torch.get_rng_state(), rng)
    assert_same_state(model, expected)
    # the local-dir export of that subnet, and of the supernet
    save_for_hf(model, str(tmp_path / 'subnet_dir'), safe_serialization=True)
    again = timm.create_model(f'local-dir:{tmp_path / "subnet_dir"}', pretrained=True)
    assert type(again) is type(expected)
    assert_same_state(again, expected)
    supernet = timm.create_model(name, num_classes=NUM_CLASSES, resolutions=RES, checkpoint_path=path)
    save_for_hf(supernet, str(tmp_path / 'supernet_dir'), safe_serialization=True)
    assert_same_state(timm.create_model(f'local-dir:{tmp_path / "supernet_dir"}', pretrained=True), trained)
    x = torch.randn(2, 3, RES[-1], RES[-1])
    with torch.no_grad():
        assert torch.equal(again.eval()(x), expected(x))


def test_timm_train_py_checkpoints_of_a_subnet_resume(run, tmp_path):
    """train.py writes {'state_dict', 'optimizer', 'epoch', 'args': Namespace} and resumes with resume_checkpoint."""
    import argparse
    name, out, trained = run
    model = timm.create_model(name, num_classes=NUM_CLASSES, resolutions=RES, subnet='min',
                              checkpoint_path=str(out / 'supernet.safetensors'))
    torch.save({'state_dict': model.state_dict(), 'epoch': 0, 'version': 2, 'args': argparse.Namespace(lr=0.1)},
               tmp_path / 'last.pth.tar')
    fresh = timm.create_model(name, num_classes=NUM_CLASSES, resolutions=RES, subnet='min')
    assert resume_checkpoint(fresh, str(tmp_path / 'last.pth.tar')) == 1
    assert_same_state(fresh, model)
    again = timm.create_model(name, pretrained=True, subnet='min', num_classes=NUM_CLASSES, resolutions=RES,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / 'last.pth.tar')))
    assert_same_state(again, model)


def test_a_classifier_of_another_size_is_replaced_only_when_asked(run, tmp_path):
    name, out, trained = run
    plain = tmp_path / 'plain.pth'  # no metadata: the model is built with the registry's 1000 classes
    torch.save(trained.state_dict(), plain)
    for subnet in (None, 'min'):
        with pytest.raises(RuntimeError, match=rf'has {NUM_CLASSES} classes and the model 1000: pass '
                                               rf'num_classes={NUM_CLASSES}'):
            timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(plain)), subnet=subnet)
    with pytest.raises(RuntimeError, match=rf'pass num_classes={NUM_CLASSES}'):
        timm.create_model(name, resolutions=RES, subnet='min', checkpoint_path=str(out / 'supernet.safetensors'))
    # Asked for: a new head, every other weight as trained
    five = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(plain)), num_classes=5)
    assert five.num_classes == 5
    head = set(five.pretrained_cfg['classifier'] + s for s in ('.weight', '.bias'))
    ref = trained.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in five.state_dict().items() if k not in head)
    # num_classes=0: no classifier, as in timm
    for subnet in (None, 'min'):
        headless = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(plain)),
                                     num_classes=0, subnet=subnet)
        assert headless.num_classes == 0
    # A plain state dict with the same class count keeps its head
    kept = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(plain)),
                             num_classes=NUM_CLASSES, resolutions=RES)
    assert_same_state(kept, trained)


def test_a_partial_non_strict_load_into_a_subnet_is_left_alone():
    model = timm.create_model('ofa_mobilenetv3_small_100', num_classes=4, subnet='min')
    before = {k: v.clone() for k, v in model.state_dict().items()}
    head = {'classifier.weight': torch.zeros(4, 1024), 'classifier.bias': torch.ones(4)}
    assert not model.load_state_dict(head, strict=False).unexpected_keys
    assert torch.equal(model.classifier.bias, torch.ones(4))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items() if not k.startswith('classifier'))
    foreign = {'fc.weight': torch.zeros(3, 3)}
    assert model.load_state_dict(foreign, strict=False).unexpected_keys == ['fc.weight']


# --- bad files ------------------------------------------------------------------------------------------------------
def _bad_files(tmp_path):
    good = tmp_path / 'good.pth'
    torch.save({'w': torch.randn(64, 64)}, good)
    data = good.read_bytes()
    safe = tmp_path / 'good.safetensors'
    from safetensors.torch import save_file
    save_file({'w': torch.randn(64, 64)}, str(safe))
    files = {
        'truncated.safetensors': (safe.read_bytes()[:-100], 'not a complete safetensors file'),
        'truncated.pth': (data[:len(data) // 2], 'truncated or corrupt'),
        'random.pth': (bytes(range(256)) * 8, 'not a PyTorch checkpoint'),
        'random2.pth': (random.Random(0).randbytes(4096), 'not a PyTorch checkpoint'),
        'random.safetensors': (bytes(range(256)) * 8, 'not a complete safetensors file'),
        'empty.pth': (b'', 'the file is empty'),
    }
    for name, (content, _) in files.items():
        (tmp_path / name).write_bytes(content)
    return {tmp_path / name: reason for name, (_, reason) in files.items()}


class Custom:
    pass


def test_bad_files_raise_value_errors_naming_the_file(tmp_path):
    import argparse
    for path, reason in _bad_files(tmp_path).items():
        with pytest.raises(ValueError, match=re.escape(f"'{path}': {reason}")):
            timm.create_model('ofa_mobilenetv3_small_100', pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(path)))
        with pytest.raises(ValueError, match=re.escape(f"'{path}': {reason}")) as error:
            load_run_checkpoint(path)
        assert 'weights_only` set to `False' not in str(error.value)  # no advice to unpickle a file that is not one
    with pytest.raises(ValueError, match="'.*missing.pth': no such file"):
        load_run_checkpoint(tmp_path / 'missing.pth')
    torch.save({'w': torch.zeros(1), 'obj': Custom()}, tmp_path / 'pickled.pth')
    with pytest.raises(ValueError, match=r"pickled.pth': it holds Python objects other than tensors \(.*Custom"):
        load_run_checkpoint(tmp_path / 'pickled.pth')
    torch.save({'state_dict': {'w': torch.zeros(1)}, 'args': argparse.Namespace(lr=0.1)}, tmp_path / 'timm.pth')
    assert load_run_checkpoint(tmp_path / 'timm.pth')['args'].lr == 0.1  # timm train.py checkpoints are fine


def test_cli_bad_files_print_one_line_and_exit_2(shapes, tmp_path, capsys):
    bad = _bad_files(tmp_path)
    for path, reason in bad.items():
        args = train_args('ofa_mobilenetv3_small_100', shapes, tmp_path / 'out', tiny_schedule(tmp_path / 's.yaml'))
        assert main(args + ['--pretrained-file', str(path)]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and str(path) in err and reason in err, err
    run = tmp_path / 'resume'
    run.mkdir()
    (run / 'last.pth').write_bytes(next(p for p in bad if p.name == 'truncated.pth').read_bytes())
    args = train_args('ofa_mobilenetv3_small_100', shapes, run, tmp_path / 's.yaml')
    assert main(args + ['--resume']) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and 'last.pth' in err and 'truncated or corrupt' in err, err


# --- offline ----------------------------------------------------------------------------------------------------------
@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network: name resolution and connections fail; an empty download cache."""
    def unreachable(*args, **kwargs):
        raise socket.gaierror(socket.EAI_AGAIN, 'Temporary failure in name resolution')
    monkeypatch.setattr(socket, 'getaddrinfo', unreachable)
    monkeypatch.setattr(socket, 'create_connection', unreachable)
    monkeypatch.setattr(socket.socket, 'connect', unreachable)
    monkeypatch.setattr(time, 'sleep', lambda seconds: None)  # the Hugging Face hub retries with backoff
    hub_dir = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / 'hub'))
    yield tmp_path / 'cache'
    torch.hub.set_dir(hub_dir)


def test_offline_pretrained_names_the_url_and_the_offline_route(offline, shapes, tmp_path, capsys):
    for name, where in (('ofa_mbv3', 'https://raw.githubusercontent.com/han-cai/files/master/ofa/ofa_nets/'),
                        ('ofa_mobilenetv3_small_100', 'https://huggingface.co/timm/mobilenetv3_small_100')):
        with pytest.raises(ConnectionError) as info:
            timm.create_model(name, pretrained=True, cache_dir=str(offline))
        message = str(info.value)
        assert where in message and f"timm.create_model('{name}', pretrained=True, " in message
        assert "pretrained_cfg_overlay=dict(file='/path/to/weights')" in message
        assert info.value.__cause__ is None and info.value.__suppress_context__  # no 60-line chained traceback
    args = train_args('ofa_mobilenetv3_small_100', shapes, tmp_path / 'out', tiny_schedule(tmp_path / 's.yaml'))
    assert main(args + ['--pretrained']) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and 'Cannot download' in err, err


# --- files written respect the umask ----------------------------------------------------------------------------------
@pytest.mark.parametrize('umask', [0o022, 0o077])
def test_written_files_respect_the_umask(run, tmp_path, umask):
    from ofa_timm._io import save_safetensors
    from ofa_timm.training import save_checkpoint
    name, out, trained = run
    old = os.umask(umask)
    try:
        save_safetensors(trained.state_dict(), tmp_path / 'a.safetensors')
        save_checkpoint({'w': torch.zeros(1)}, tmp_path / 'last.pth')
        trained.space.min().to_json(tmp_path / 'subnet.json')
    finally:
        os.umask(old)
    for f in ('a.safetensors', 'last.pth', 'subnet.json'):
        assert (tmp_path / f).stat().st_mode & 0o777 == 0o666 & ~umask, f


# --- the README's registry snippet runs as written --------------------------------------------------------------------
def test_readme_registry_snippet_runs_as_written(tmp_path, monkeypatch):
    """The snippet, with each download served by a random model of the right kind (published OFA weights in this
    project's keys, timm's weights of the source model)."""
    from pathlib import Path

    from ofa_timm.plugins import ofa_models
    readme = (Path(__file__).resolve().parents[1] / 'README.md').read_text()
    section = readme.split("### Through timm's registry", 1)[1]
    snippet = section.split('```python\n', 1)[1].split('```', 1)[0]
    sources = {'ofa_mbv3': lambda: timm.create_model('ofa_mbv3'),
               'ofa_resnet50d': lambda: timm.create_model('resnet50d')}
    served = []

    def download(variant, cfg, cache_dir=None):
        assert cfg.get('url') or cfg.get('hf_hub_id'), cfg  # it would have downloaded
        served.append(variant)
        return sources[variant]().state_dict(), {}
    monkeypatch.setattr(ofa_models, '_pretrained_state', download)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(snippet, 'README.md', 'exec'), namespace)
    assert served == ['ofa_mbv3', 'ofa_mbv3', 'ofa_mbv3', 'ofa_resnet50d']
    assert namespace['mine'].num_classes == 10 and type(namespace['r50']).__name__ == 'ResNet'
