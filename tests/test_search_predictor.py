"""Accuracy predictor: OFA's encoding from the space, fitting, the dataset. (Parity with the reference
implementation: ``test_reference_predictor.py``.)"""
import json

import numpy as np
import pytest
import timm
import torch

import ofa_timm  # noqa: F401  registers the ofa_* models
import ofa_timm.training
from ofa_timm.example_data import make_shapes_dataset
from ofa_timm.search import (
    AccuracyPredictor, ArchEncoder, FitConfig, build_accuracy_dataset, dataset_space, fit_predictor,
    read_accuracy_dataset, spearman)


@pytest.fixture(scope='module')
def w12():
    return timm.create_model('ofa_mbv3_w12', num_classes=10)


def test_encoding_works_for_resnet_spaces():
    space = timm.create_model('ofa_resnet50', num_classes=10).space
    enc = ArchEncoder(space)
    features = enc([space.min(), space.max()])
    # resolution + the residual-stem depth + every width slot, then expands of the active blocks only
    assert (features.sum(axis=1) == [1 + 1 + len(space.widths) + n for n in (10, 18)]).all()


def test_predictor_learns_a_synthetic_target(w12, tmp_path):
    space = w12.space
    rng = np.random.default_rng(0)
    codes = np.stack([space.encode(space.sample(rng)) for _ in range(600)])
    subnets = space.decode(codes)
    # A smooth, non-trivial target: more active depth, kernel and expand, and resolution, help; kernel 7 helps less.
    target = np.array([60 + 1.5 * sum(s.depths) + 0.02 * s.resolution
                       + sum(0.3 * (k == 5) + 0.1 * e for k, e in zip(s.kernels, s.expands)) for s in subnets])
    predictor, metrics = fit_predictor(space, codes, target, FitConfig(steps=600, seed=0))
    assert metrics['n_val'] == 120 and metrics['spearman'] > 0.95
    assert metrics['rmse'] < 0.25 * target.std()
    predictor.save(tmp_path / 'p.safetensors', model='ofa_mbv3_w12')
    again = AccuracyPredictor.load(tmp_path / 'p.safetensors', space=space)
    assert np.array_equal(again.predict(codes), predictor.predict(codes))
    assert again.metrics['spearman'] == metrics['spearman']
    with pytest.raises(ValueError, match='another space'):
        AccuracyPredictor.load(tmp_path / 'p.safetensors', space=space.replace_resolutions((160, 224)))
    with pytest.raises(ValueError, match='not an ofa_timm accuracy predictor'):
        from safetensors.torch import save_file
        save_file({'x': torch.zeros(1)}, str(tmp_path / 'other.safetensors'))
        AccuracyPredictor.load(tmp_path / 'other.safetensors')


def test_spearman_handles_ties():
    assert spearman(np.array([1, 2, 3, 4.]), np.array([10, 20, 30, 40.])) == pytest.approx(1.0)
    assert spearman(np.array([1, 1, 2, 3.]), np.array([3, 3, 2, 1.])) == pytest.approx(-1.0)


@pytest.mark.slow
def test_dataset_builder_appends_resumes_and_keeps_its_space(tmp_path, monkeypatch, capsys):
    root = make_shapes_dataset(tmp_path / 'data', num_classes=3, train_per_class=4, val_per_class=2, image_size=32)
    from ofa_timm.training import DataConfig, build_datasets
    _, val, calib, _ = build_datasets(DataConfig(str(root), image_size=32))
    loader = dict(calib_loader=torch.utils.data.DataLoader(calib, batch_size=6),
                  val_loader=torch.utils.data.DataLoader(val, batch_size=6))
    torch.manual_seed(0)
    supernet = timm.create_model('ofa_mobilenetv3_small_100', num_classes=3, resolutions=(24, 32)).eval()
    path = tmp_path / 'acc.jsonl'
    real, calls, resumed = ofa_timm.training.evaluate_subnet, [], []

    def interrupted(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 4 and not resumed:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(ofa_timm.training, 'evaluate_subnet', interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_accuracy_dataset(supernet, path=path, n=6, calib_images=6, progress=False, **loader)
    assert len(path.read_text().splitlines()) == 1 + 3  # header + the 3 results that came in
    with open(path, 'a') as f:
        f.write('{"subnet": {"depths"')  # a line torn by a hard kill
    calls.clear()
    resumed.append(True)
    rows = build_accuracy_dataset(supernet, path=path, n=6, calib_images=6, progress=True, **loader)
    assert len(calls) == 3 and len(rows) == 6  # only the missing subnets were evaluated
    assert '\r' not in capsys.readouterr().err  # no progress bar when the output is not a terminal (a log file)
    assert len({json.dumps(r['subnet'], sort_keys=True) for r in rows}) == 6
    space, model = dataset_space(path)
    codes, targets = read_accuracy_dataset(path, space)
    assert space == supernet.space and codes.shape == (6, len(space.genes)) and (0 <= targets).all()
    with pytest.raises(ValueError, match='another space'):
        read_accuracy_dataset(path, timm.create_model('ofa_mobilenetv3_small_100').space)
