"""INT8: QDQ export checked against the float graph, INT8 latency tables and kits tied to their precision, the
pipeline's int8 run (finalists scored in INT8, INT8 beside FP32 in the report), and clear errors on bad input."""
import json

import numpy as np
import pytest
import timm
import torch

import ofa_timm  # noqa: F401  registers the ofa_* models
from ofa_timm.cli import main
from ofa_timm.example_data import make_shapes_dataset
from ofa_timm.pipeline import RunConfig, run
from ofa_timm.pipeline.report import report_markdown
from ofa_timm.pipeline.steps import latency_table, pick_winners
from ofa_timm.search import LatencySettings, export_subnet
from ofa_timm.search.quantize import (
    OnnxClassifier, QuantizeConfig, calibration_batches, compare_graphs, onnx_bytes, quantize_onnx,
    quantized_classifier)
from ofa_timm.space import Subnet
from ofa_timm.training import Schedule, Stage, TrainConfig
from ofa_timm.training.data import eval_loader, resize_to

from helpers import randomize_bn

onnx = pytest.importorskip('onnx')
pytest.importorskip('onnxruntime.quantization')
MODEL = 'ofa_mobilenetv3_small_100'


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    return make_shapes_dataset(tmp_path_factory.mktemp('int8') / 'data', num_classes=3, train_per_class=12,
                               val_per_class=8, image_size=32)


@pytest.fixture(scope='module')
def supernet():
    torch.manual_seed(0)
    return randomize_bn(timm.create_model(MODEL, num_classes=3, resolutions=(24, 32))).eval()


@pytest.fixture(scope='module')
def loaders(shapes):
    from ofa_timm.training import DataConfig, build_datasets
    _, val_set, calib_set, _ = build_datasets(DataConfig(str(shapes), image_size=32), seed=0)
    return eval_loader(calib_set, 12, 0, False), eval_loader(val_set, 12, 0, False)


def _ops(path) -> set:
    return {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}


def test_onnx_int8_export_is_a_qdq_graph_that_agrees_with_the_float_one(supernet, loaders, tmp_path):
    calib, val = loaders
    result = export_subnet(supernet, 'max', tmp_path / 'out', formats=('onnx', 'onnx-int8'), calib_loader=calib,
                           calib_images=24, quantize=QuantizeConfig(calibration_images=24), check_loader=val)
    path = tmp_path / 'out' / 'model_int8.onnx'
    assert str(path) in result['files']
    assert {'QuantizeLinear', 'DequantizeLinear'} <= _ops(path)
    weights = [i for i in onnx.load(str(path)).graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert weights, 'the weights are stored in int8'
    check = result['int8']
    # random weights leave the classes' logits close, so top-1 agreement says little here; the logits must be close
    assert check['images'] == 24 and 0 <= check['top1_agreement'] <= 100 and check['mean_abs_diff'] < 0.1
    # the check is what compare_graphs says of the two written graphs on the validation images
    again = compare_graphs(tmp_path / 'out' / 'model.onnx', path, calibration_batches(val, 256, 32))
    assert again == pytest.approx(check)
    out = OnnxClassifier(path)(torch.randn(5, 3, 32, 32))
    assert out.shape == (5, 3) and torch.isfinite(out).all()


@pytest.mark.parametrize('activations,lowest', [('uint8', 0), ('int8', -128)])
def test_activations_after_a_relu_use_all_levels(tmp_path, activations, lowest):
    """Activation ranges are asymmetric: after a ReLU the zero point is the lowest level, so no level is wasted on
    negative values that never occur (a symmetric int8 range cost the MobileNetV3 subnets up to 37 points)."""
    from onnx import numpy_helper
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3)).eval()
    graph = onnx_bytes(net, torch.zeros(1, 3, 8, 8), dynamic_batch=True)
    batches = [torch.randn(4, 3, 8, 8).numpy() for _ in range(2)]
    path = quantize_onnx(graph, tmp_path / 'q.onnx', batches, QuantizeConfig(8, activations=activations))
    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    relu_out = next(n.output[0] for n in model.graph.node if n.op_type in ('Relu', 'Conv'))
    zero_points = [inits[n.input[2]] for n in model.graph.node if n.op_type == 'QuantizeLinear' and
                   n.input[0] == relu_out]
    assert zero_points and all(int(z) == lowest for z in zero_points)


def test_a_near_constant_activation_falls_back_to_minmax_with_a_warning(tmp_path):
    """A histogram cannot span values that all but coincide (numpy: too many bins); the quantization still succeeds."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1)).eval()
    with torch.no_grad():
        net[0].weight.mul_(1e-9)
        net[0].bias.fill_(1e6)
    graph = onnx_bytes(net, torch.zeros(1, 3, 4, 4), dynamic_batch=True)
    with pytest.warns(UserWarning, match='calibrating with minmax instead'):
        path = quantize_onnx(graph, tmp_path / 'q.onnx', [torch.randn(2, 3, 4, 4).numpy()], QuantizeConfig(2))
    assert {'QuantizeLinear', 'DequantizeLinear'} <= _ops(path)


def test_int8_evaluation_is_the_quantized_graphs_accuracy(supernet, loaders):
    from ofa_timm.training import evaluate_subnet
    calib, val = loaders
    subnet = supernet.space.min()
    int8 = evaluate_subnet(supernet, subnet, calib, val, 24, quantize=QuantizeConfig(24))
    # by hand: extract, recalibrate, quantize on the same images, run the INT8 graph
    from ofa_timm.training import calibrate_bn
    model = supernet.extract(subnet)
    calibrate_bn(model, calib, 24, resolution=subnet.resolution)
    classifier = quantized_classifier(model.eval(), calib, subnet.resolution, QuantizeConfig(24))
    correct = total = 0
    for x, y in val:
        x = resize_to(x, subnet.resolution)
        correct += int((classifier(x).argmax(1) == y).sum())
        total += len(y)
    assert int8['top1'] == pytest.approx(100 * correct / total, abs=100 / total + 1e-6)


def test_bad_int8_input_gets_clear_errors(supernet, loaders, tmp_path, capsys):
    with pytest.raises(ValueError, match='training images'):
        export_subnet(supernet, 'min', tmp_path / 'a', formats=('onnx-int8',))
    assert not (tmp_path / 'a').exists()
    with pytest.raises(ValueError, match='no images'):
        calibration_batches([], 16)
    with pytest.raises(ValueError, match='at least one batch'):
        quantize_onnx(b'', tmp_path / 'x.onnx', [])
    with pytest.raises(ValueError, match='calibration method'):
        QuantizeConfig(method='mse')
    with pytest.raises(ValueError, match='percentile must be in'):
        QuantizeConfig(percentile=30)
    with pytest.raises(ValueError, match='onnxruntime backend'):
        LatencySettings('torch-cpu', precision='int8')
    with pytest.raises(ValueError, match="allowed: \\['fp32', 'int8'\\]"):
        LatencySettings('onnxruntime', precision='int4')
    empty = tmp_path / 'empty'
    (empty / 'train' / 'a').mkdir(parents=True)
    (empty / 'validation' / 'a').mkdir(parents=True)
    args = ['export', '--model', MODEL, '--subnet', 'min', '--format', 'onnx-int8', '--out', str(tmp_path / 'b')]
    assert main(args) == 2
    assert '--calibrate-bn' in capsys.readouterr().err
    assert main(args + ['--calibrate-bn', str(empty)]) == 2
    assert 'Found 0 images' in capsys.readouterr().err
    assert not (tmp_path / 'b').exists()


def test_an_int8_kit_writes_qdq_graphs_and_its_table_refuses_fp32_use(tmp_path):
    from ofa_timm.search.kit import import_kit_results, make_kit
    from test_latency_kit import measure
    supernet = timm.create_model(MODEL, num_classes=4, resolutions=(32,))
    kit = make_kit(supernet, tmp_path / 'kit', calibrate=3, validate=0, progress=False, precision='int8')
    manifest = json.loads((kit / 'manifest.json').read_text())
    assert manifest['precision'] == 'int8'
    entry = manifest['models'][0]
    assert {'QuantizeLinear', 'DequantizeLinear'} <= _ops(kit / entry['file'])
    # the int8 weights are drawn on the device: none ships, and scales / zero points stay in the graph
    assert {t['dtype'] for m in manifest['models'] for t in m.get('weights', {}).get('tensors', [])} == {'int8'}
    assert not list(kit.rglob('*.weights'))
    done = measure(kit)
    assert done.returncode == 0, done.stderr
    table = import_kit_results(kit / 'results.json')
    assert table.precision == 'int8' and table.meta['dtype'] == 'int8 (QDQ)'
    assert table.check_precision('int8') is table
    with pytest.raises(ValueError, match='measured in int8, and this run deploys fp32'):
        table.check_precision('fp32')
    table.save(tmp_path / 'table.json')
    fp32_run = RunConfig(model=MODEL, data_dir='d', budgets='50%latency', latency=str(tmp_path / 'table.json'))
    with pytest.raises(ValueError, match='measured in int8, and this run deploys fp32'):
        latency_table(fp32_run.latency, supernet, tmp_path / 'run' / 'table.json', fp32_run, False)


def test_run_config_resolves_the_latency_of_each_precision():
    base = dict(model=MODEL, data_dir='d', budgets='50%flops')
    assert RunConfig(**base).latency == 'torch-cpu'
    int8 = RunConfig(**base, precision='int8')
    assert int8.latency == 'onnxruntime' and 'onnx-int8' in int8.formats
    with pytest.raises(ValueError, match='latency=onnxruntime'):
        RunConfig(**base, precision='int8', latency='torch-cpu')
    with pytest.raises(ValueError, match='Unknown precision'):
        RunConfig(**base, precision='fp16')


def _candidate(code: int, val: float, int8: float, ms: float, predicted: float = 50.0) -> dict:
    return dict(subnet={'resolution': code}, predicted=predicted, _val=val, _int8=int8, _ms=ms)


def test_winners_are_chosen_in_int8_and_within_the_budget_as_timed():
    cands = [_candidate(1, 80, 60, 9.0), _candidate(2, 70, 75, 9.5), _candidate(3, 90, 90, 12.0)]
    search = [dict(label='latency_10ms', limits={'latency': 10.0}, candidates=cands)]
    measured = {Subnet.from_dict(c['subnet']): dict(top1=c['_val']) for c in cands}
    int8 = {Subnet.from_dict(c['subnet']): dict(top1=c['_int8']) for c in cands}
    latency = {Subnet.from_dict(c['subnet']): dict(table_ms=c['_ms'], low_ms=c['_ms'], high_ms=c['_ms'],
                                                   measured_ms=c['_ms'], drift=1.0) for c in cands}
    fp32_only = pick_winners(json.loads(json.dumps(search)), measured)[0]
    assert fp32_only['winner']['val_top1'] == 90  # the predictions' budget check alone keeps the 12 ms one
    b = pick_winners(json.loads(json.dumps(search)), measured, int8, latency)[0]
    assert b['dropped_over_budget'] == 1  # timed at 12 ms, over the 10 ms budget
    assert b['winner']['subnet'] == {'resolution': 2} and b['winner']['val_top1_int8'] == 75
    assert b['fp32_choice']['subnet'] == {'resolution': 1}  # FP32 would have picked another subnet
    # every candidate over the budget: the fastest is kept (and the report flags it)
    slow = {s: dict(v, table_ms=v['table_ms'] + 5) for s, v in latency.items()}
    b = pick_winners(json.loads(json.dumps(search)), measured, None, slow)[0]
    assert b['winner']['subnet'] == {'resolution': 1} and b['dropped_over_budget'] == 2


def _info(over_pct: float, low: float) -> dict:
    latency = dict(table_ms=10.0 * (1 + over_pct / 100), low_ms=low, high_ms=11.5, measured_ms=12.0, drift=1.1,
                   over_budget_pct=over_pct)
    budget = dict(label='latency_10ms', limits={'latency': 10.0}, subnet={}, predicted_top1=50, val_top1=60,
                  test_top1=61, test_top5=90, test_top1_int8=58.5, costs={'latency': 9.8, 'flops': 1e6, 'params': 1e5},
                  latency_measured=12.0, latency=latency, random_best=None, files=[], load='',
                  fp32_choice=dict(subnet={}, val_top1=62, val_top1_int8=50, test_top1=63, test_top1_int8=49.5))
    return dict(model=MODEL, data=dict(train=1, val=1, test=1, classes=2), test_source='t', accuracy=dict(
        n=10, top1_min=1, top1_max=2), predictor=dict(n_train=8, n_val=2, rmse=1, spearman=0.5), budgets=[budget],
        latency_measured_here=True, precision='int8',
        int8_export={'latency_10ms': dict(images=24, top1_agreement=95.8)})


def test_the_report_flags_a_winner_over_its_budget_and_sets_int8_beside_fp32():
    text = report_markdown(_info(3.0, 10.1))
    assert 'INT8 test top-1' in text and '| 61.00 | 58.50 |' in text
    assert '**latency_10ms is over its budget as timed here**' in text and '3.0% over.' in text
    assert "FP32's choice: INT8 test top-1 49.50 (FP32 63.00)" in text and '95.8%' in text
    assert 'within the noise' in report_markdown(_info(3.0, 9.5))
    assert 'over its budget' not in report_markdown(_info(0.0, 9.0))


@pytest.mark.slow
def test_an_int8_run_scores_finalists_in_int8_and_reports_both(shapes, tmp_path):
    all_ = {'kernel': 'all', 'depth': 'all', 'expand': 'all', 'resolution': 'all'}
    schedule = Schedule((Stage('full', 1, 0.05), Stage('shrink', 1, 0.01, all_, subnets_per_step=2)))
    schedule.to_yaml(tmp_path / 's.yaml')
    result = run(RunConfig(
        model=MODEL, data_dir=str(shapes), budgets='40%flops', out=str(tmp_path / 'run'), latency=None,
        precision='int8', quantize=QuantizeConfig(calibration_images=18), resolutions=(24, 32), image_size=32,
        schedule=str(tmp_path / 's.yaml'), min_steps=0, subnets=10, finalists=2, formats=('timm',), progress=False,
        train=TrainConfig(batch_size=9, workers=0, calib_images=18, val_every=100, log_every=1)))
    finalists = json.loads((tmp_path / 'run' / 'finalists' / 'finalists.json').read_text())
    b = finalists[0]
    assert all('val_top1_int8' in c for c in b['candidates'])
    assert b['winner']['val_top1_int8'] == max(c['val_top1_int8'] for c in b['candidates'])
    r = result.budgets[0]
    assert r.test_top1_int8 is not None and 0 <= r.test_top1_int8 <= 100
    assert any(f.endswith('model_int8.onnx') for f in r.files)
    report = result.report.read_text()
    assert 'INT8 test top-1' in report and 'model_int8.onnx' in report
    assert np.isfinite(r.test_top1)
