"""The specialization verbs of ofa-timm, end to end on a generated dataset: latency, predictor, search, export."""
import json

import pytest
import timm
import torch
from safetensors.torch import save_file

import ofa_timm  # noqa: F401  registers the ofa_* models
from ofa_timm.example_data import make_shapes_dataset
from ofa_timm import Subnet
from ofa_timm.cli import main
from ofa_timm.search import LatencyTable

MODEL = 'ofa_mobilenetv3_small_100'


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    """A generated dataset and a supernet checkpoint as ofa-timm train writes it."""
    root = tmp_path_factory.mktemp('search_cli')
    data = make_shapes_dataset(root / 'data', num_classes=3, train_per_class=8, val_per_class=4, image_size=32)
    torch.manual_seed(0)
    supernet = timm.create_model(MODEL, num_classes=3, resolutions=(24, 32))
    ckpt = root / 'supernet.safetensors'
    save_file({k: v.contiguous() for k, v in supernet.state_dict().items()}, str(ckpt),
              metadata={'space': json.dumps(supernet.space.to_dict())})
    return root, data, ckpt


@pytest.mark.slow
def test_latency_predictor_search_export(run, capsys):
    root, data, ckpt = run
    model = ['--model', MODEL, '--checkpoint', str(ckpt)]
    table = root / 'table.json'
    assert main(['latency', 'build', *model, '--threads', '1', '--warmup', '1', '--repeats', '3', '--calibrate', '2',
                 '--validate', '2', '--out', str(table), '--no-progress']) == 0
    printed = capsys.readouterr().out
    assert 'Validation: 2 held-out subnets (measured in the same rounds as the calibration): median |error|' in \
        printed and 'within ±10%' in printed and 'latency = ' in printed
    loaded = LatencyTable.load(table)
    assert loaded.validation['n'] == 2 and loaded.meta['batch_size'] == 1
    # later, apart in time: the table names its model, class count and resolutions
    assert main(['latency', 'validate', '--table', str(table), '--n', '2', '--no-progress']) == 0
    assert 'measured in a later, separate run' in capsys.readouterr().out
    assert LatencyTable.load(table).validation['apart']

    dataset = root / 'acc.jsonl'
    assert main(['predictor', 'dataset', *model, '--data-dir', str(data), '--n', '8', '--calib-images', '8',
                 '--batch-size', '8', '--out', str(dataset), '--no-progress']) == 0
    assert 'Accuracy dataset' in capsys.readouterr().out and len(dataset.read_text().splitlines()) == 9
    predictor = root / 'p.safetensors'
    assert main(['predictor', 'fit', '--data', str(dataset), '--steps', '50', '--out', str(predictor),
                 '--no-progress']) == 0
    assert 'Spearman' in capsys.readouterr().out

    smallest, largest = loaded.minimum()[0], loaded.maximum()[0]
    budgets = f'{smallest * 1.05:.4f}ms,{(smallest + largest) / 2:.4f}ms'
    out = root / 'search'
    assert main(['search', *model, '--predictor', str(predictor), '--latency-table', str(table), '--budgets',
                 budgets, '--population', '20', '--generations', '20', '--out', str(out), '--no-progress']) == 0
    assert 'Searched 2 budgets' in capsys.readouterr().out
    folders = sorted(p for p in out.iterdir() if p.is_dir())
    assert len(folders) == 2 and all((f / 'config.json').is_file() and (f / 'subnet.json').is_file() for f in folders)
    assert (out / 'pareto.png').stat().st_size > 10_000 and '| latency <=' in (out / 'results.md').read_text()
    reloaded = timm.create_model(f'local-dir:{folders[0]}', pretrained=True).eval()
    assert reloaded(torch.randn(1, 3, 32, 32)).shape == (1, 3)

    assert main(['search', *model, '--predictor', str(predictor), '--budgets', '20MFLOPs,25%flops+3Mparams',
                 '--population', '20', '--generations', '10', '--export-format', 'none', '--out',
                 str(root / 'flops')]) == 0
    assert (root / 'flops' / 'flops_20M' / 'subnet.json').is_file()
    assert (root / 'flops' / 'flops_25pct+params_3M' / 'subnet.json').is_file()
    # 0.2.0's form still works, and says what to write instead
    assert main(['search', *model, '--predictor', str(predictor), '--flops', '--budgets', '20M', '--population',
                 '20', '--generations', '10', '--export-format', 'none', '--out', str(root / 'old')]) == 0
    assert '--flops --budgets 20M is the old form; write --budgets 20MFLOPs' in capsys.readouterr().err
    assert Subnet.from_json(root / 'old' / 'flops_20M' / 'subnet.json') == Subnet.from_json(
        root / 'flops' / 'flops_20M' / 'subnet.json')

    pytest.importorskip('onnxruntime')
    assert main(['export', *model, '--subnet', str(folders[1] / 'subnet.json'), '--format', 'onnx,timm',
                 '--calibrate-bn', str(data), '--calib-images', '8', '--out', str(root / 'export')]) == 0
    assert 'onnx check: max abs difference' in capsys.readouterr().out
    assert (root / 'export' / 'model.onnx').is_file() and (root / 'export' / 'config.json').is_file()


def test_cli_errors(run, capsys, tmp_path):
    root, data, ckpt = run
    model = ['--model', MODEL, '--checkpoint', str(ckpt)]
    assert main(['export', *model, '--subnet', 'max', '--format', 'tflite', '--out', str(tmp_path / 'x')]) == 2
    assert 'Unknown export format' in capsys.readouterr().err
    assert main(['export', '--model', 'ofa_resnet34', '--checkpoint', str(ckpt), '--subnet', 'max',
                 '--out', str(tmp_path / 'x')]) == 2
    assert 'does not fit ofa_resnet34' in capsys.readouterr().err
    assert not (tmp_path / 'x').exists()
    assert main(['latency', 'build', *model, '--backend', 'onnxruntime', '--amp', 'bf16',
                 '--out', str(tmp_path / 't')]) == 2
    assert 'torch-cpu and torch-cuda backends only' in capsys.readouterr().err
    from ofa_timm.search import AccuracyPredictor
    supernet = timm.create_model(MODEL, num_classes=3, resolutions=(24, 32))
    AccuracyPredictor(supernet.space, hidden_size=8, n_layers=1).save(tmp_path / 'p.safetensors')
    assert main(['search', *model, '--predictor', str(tmp_path / 'p.safetensors'), '--flops', '--budgets', '1M',
                 '--out', str(tmp_path / 's')]) == 2
    assert 'smallest achievable flops' in capsys.readouterr().err
    assert main(['search', *model, '--predictor', str(tmp_path / 'p.safetensors'), '--budgets', '20ms',
                 '--out', str(tmp_path / 's')]) == 2
    assert 'Budget latency_20ms needs a latency cost model (a latency table)' in capsys.readouterr().err
    assert main(['search', *model, '--predictor', str(tmp_path / 'p.safetensors'), '--budgets', '20 apples',
                 '--out', str(tmp_path / 's')]) == 2
    assert "Cannot read budget '20 apples'" in capsys.readouterr().err
    other = timm.create_model(MODEL, num_classes=3)
    AccuracyPredictor(other.space, hidden_size=8, n_layers=1).save(tmp_path / 'q.safetensors')
    assert main(['search', *model, '--predictor', str(tmp_path / 'q.safetensors'), '--flops', '--budgets', '30M',
                 '--out', str(tmp_path / 's')]) == 2
    assert 'another space' in capsys.readouterr().err
