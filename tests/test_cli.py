"""The ofa-timm command line, run in process on tiny generated data."""
import json

import pytest
import timm
import torch

from ofa_timm.example_data import make_shapes_dataset
from ofa_timm.cli import main
from ofa_timm.training import Schedule, Stage


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    return make_shapes_dataset(tmp_path_factory.mktemp('cli_shapes'), num_classes=3, train_per_class=8,
                               val_per_class=4, image_size=32)


def test_train_writes_weights_metrics_summary_and_plot(shapes, tmp_path, capsys):
    schedule = tmp_path / 'tiny.yaml'
    Schedule((Stage('kernel', 1, 1e-2, {'kernel': 'all', 'resolution': 'all'}),
              Stage('depth_1', 1, 1e-2, {'kernel': 'all', 'depth': 2, 'resolution': 'all'}, subnets_per_step=2))
             ).to_yaml(schedule)
    out = tmp_path / 'run'
    args = ['train', '--model', 'ofa_mobilenetv3_small_100', '--data-dir', str(shapes), '--schedule', str(schedule),
            '--resolutions', '24', '32', '--batch-size', '8', '--workers', '0', '--calib-images', '8',
            '--output', str(out), '--no-progress', '--pretrained-file', str(_timm_weights(tmp_path))]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert 'Stages (optimizer steps): kernel 3, depth_1 3;' in printed and '| kernel |' in printed
    for name in ('last.pth', 'metrics.jsonl', 'summary.md', 'val_accuracy.png', 'supernet.safetensors'):
        assert (out / name).is_file(), name
    assert any(json.loads(line)['type'] == 'val_mean' for line in (out / 'metrics.jsonl').read_text().splitlines())
    # The trained weights load through timm
    model = timm.create_model('ofa_mobilenetv3_small_100', num_classes=3, resolutions=(24, 32),
                              checkpoint_path=str(out / 'supernet.safetensors')).eval()
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    # A second run into the same folder must say --resume; with it, the finished run is a no-op
    assert main(args) == 2
    assert '--resume' in capsys.readouterr().err
    assert main(args + ['--resume']) == 0


def _timm_weights(tmp_path):
    path = tmp_path / 'source.pth'
    torch.save(timm.create_model('mobilenetv3_small_100').state_dict(), path)
    return path


def test_train_errors(shapes, tmp_path, capsys):
    assert main(['train', '--model', 'mobilenetv3_large_100', '--data-dir', str(shapes), '--output',
                 str(tmp_path), '--batch-size', '4', '--workers', '0']) == 2
    assert 'registered ofa_* name' in capsys.readouterr().err
    assert main(['train', '--data-dir', str(tmp_path / 'missing'), '--output', str(tmp_path)]) == 2
    assert 'Cannot read dataset' in capsys.readouterr().err
    assert main(['train', '--data-dir', str(shapes), '--schedule', 'nope', '--output', str(tmp_path)]) == 2
    assert 'Unknown schedule' in capsys.readouterr().err
    assert main(['train', '--data-dir', str(shapes), '--batch-size', '64', '--workers', '0',
                 '--output', str(tmp_path)]) == 2
    assert 'fewer than one batch' in capsys.readouterr().err


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / 'demo'
    assert main(['demo', '--output', str(out), '--epochs-scale', '0.02', '--min-steps', '0', '--subnets', '10',
                 '--image-size', '16', '--no-progress']) == 0
    printed = capsys.readouterr().out
    assert 'Handwritten digits' in printed and 'Done in' in printed
    results = json.loads((out / 'run' / 'results.json').read_text())
    labels = [b['label'] for b in results['budgets']]
    assert labels == ['flops_25pct', 'flops_50pct', 'latency_25pct', 'latency_50pct']
    for b in results['budgets']:
        assert b['label'] in printed and 0 <= b['test_top1'] <= 100
        export = out / 'run' / 'export' / b['label']
        assert b['load'] in printed  # the report tells how to load it
        reloaded = timm.create_model(f'local-dir:{export}', pretrained=True).eval()
        assert type(reloaded).__name__ == 'MobileNetV3'
        assert reloaded(torch.randn(1, 3, 16, 16)).shape == (1, 10)  # the ten digits


def test_run_passes_every_schedule_option_to_the_pipeline(shapes, tmp_path, monkeypatch):
    """--lr-scale and --sampling reach the run's schedule (they were accepted and ignored once)."""
    import ofa_timm.pipeline
    seen = {}
    monkeypatch.setattr(ofa_timm.pipeline, 'run', lambda config, until=None: seen.update(config=config))
    assert main(['run', '--data-dir', str(shapes), '--budgets', '50%flops', '--latency', 'none', '--lr-scale', '0.5',
                 '--sampling', 'uniform', '--min-steps', '7', '--epochs-scale', '0.1', '--out', str(tmp_path)]) == 0
    config = seen['config']
    assert (config.lr_scale, config.sampling, config.min_steps, config.epochs_scale) == (0.5, 'uniform', 7, 0.1)
