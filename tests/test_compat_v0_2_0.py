"""Files written by ofa-timm 0.2.0 load in this release and give the same results (``tests/fixtures/v0_2_0``, made by
its ``make_fixtures.py`` with 0.2.0): subnet JSON files and dicts, the reference implementation's dicts, the space
dicts stored in checkpoints, predictors and tables, a trained supernet, its predictor, latency table, latency kit and
an exported subnet."""
import json
from pathlib import Path

import pytest
import timm
import torch

import ofa_timm  # noqa: F401  registers the ofa_* models
from ofa_timm import SearchSpace, Subnet
from ofa_timm.search import AccuracyPredictor, flops_model, load_supernet, params_model, read_accuracy_dataset
from ofa_timm.search.kit import import_kit_results
from ofa_timm.search.latency import LatencyTable

from helpers import assert_close

HERE = Path(__file__).resolve().parent / 'fixtures' / 'v0_2_0'
EXPECTED = json.loads((HERE / 'expected.json').read_text())
TRAINED = EXPECTED['trained']


def _logits(model: torch.nn.Module, resolution: int) -> torch.Tensor:
    x = torch.randn(2, 3, resolution, resolution, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize('name', sorted(EXPECTED['families']))
def test_subnet_files_spaces_and_reference_dicts(name):
    family = EXPECTED['families'][name]
    torch.manual_seed(0)
    supernet = timm.create_model(name, num_classes=10)
    space = supernet.space
    assert SearchSpace.from_dict(family['space']) == space  # as stored in 0.2.0's checkpoints, tables, predictors
    flops, params = flops_model(supernet), params_model(supernet)
    for row in family['subnets']:
        subnet = supernet.resolve(HERE / 'subnets' / row['file'])
        assert subnet == Subnet.from_dict(row['dict']) == supernet.resolve(row['dict'])
        code = space.encode(subnet)
        assert code.tolist() == row['code']
        assert space.decode(code) == subnet
        assert int(flops(code)[0]) == row['flops'] and int(params(code)[0]) == row['params']
    for row in family['reference']:
        assert supernet.resolve(row['reference']) == Subnet.from_dict(row['subnet'])


def test_subnet_keyword_api():
    subnet = Subnet(depths=[2, 3], kernels=[3, 5, 7, 3, 5], expands=[3, 4, 6, 4, 3], resolution=160)
    assert subnet.kernels == (3, 5, 7, 3, 5) and subnet.depths == (2, 3) and subnet.resolution == 160
    assert subnet.widths == ()  # a dimension the subnet does not have reads as empty, as in 0.2.0
    assert Subnet.from_dict(subnet.to_dict()) == subnet
    assert subnet.replace(resolution=None).resolution is None


@pytest.fixture(scope='module')
def trained():
    return load_supernet(TRAINED['model'], HERE / 'supernet.safetensors')


def test_trained_checkpoint_gives_the_same_outputs(trained):
    assert trained.space == SearchSpace.from_dict(TRAINED['space'])
    for d, logits in zip(TRAINED['subnets'], TRAINED['logits']):
        subnet = trained.resolve(d)
        assert_close(_logits(trained.extract(subnet), subnet.resolution), torch.tensor(logits), rtol=1e-5)
    codes = trained.space.encode([Subnet.from_dict(d) for d in TRAINED['subnets']])
    assert flops_model(trained)(codes).tolist() == TRAINED['flops']


def test_predictor_table_kit_and_dataset_give_the_same_results(trained):
    space = trained.space
    subnets = [Subnet.from_dict(d) for d in TRAINED['subnets']]
    predictor = AccuracyPredictor.load(HERE / 'predictor.safetensors', space=space)
    assert predictor.predict(subnets) == pytest.approx(TRAINED['predicted_top1'], abs=1e-4)
    table = LatencyTable.load(HERE / 'table.json', space=space)
    assert table(space.encode(subnets)) == pytest.approx(TRAINED['latency_ms'], rel=1e-9)
    kit = import_kit_results(HERE / 'kit' / 'results.json')
    assert kit.space == space
    assert kit(space.encode(subnets)) == pytest.approx(TRAINED['kit_latency_ms'], rel=1e-9)
    codes, top1 = read_accuracy_dataset(HERE / 'accuracy.jsonl', space)
    assert len(codes) == len(top1) == 20


def test_exported_subnet_loads_back():
    model = timm.create_model(f'local-dir:{HERE / "export"}', pretrained=True)
    export = TRAINED['export']
    assert_close(_logits(model, export['subnet']['resolution']), torch.tensor(export['logits']), rtol=1e-5)
    assert Subnet.from_json(HERE / 'export' / 'subnet.json') == Subnet.from_dict(export['subnet'])
