"""Parity of the accuracy predictor with the reference implementation (PyPI ``ofa``): OFA's MobileNetV3 encoding, and
both of the reference's checkpoint formats giving the same predictions."""
import importlib.util
import os

import numpy as np
import pytest
import timm
import torch

import ofa_timm  # noqa: F401  registers the ofa_* models
from ofa_timm.search import AccuracyPredictor, ArchEncoder

ofa = pytest.importorskip('ofa')
from ofa.nas.accuracy_predictor import AccuracyPredictor as RefPredictor, MobileNetArchEncoder  # noqa: E402


def _tutorial_predictor_class():
    # ofa.tutorial's package __init__ imports optional downloaders; load the predictor module on its own.
    path = os.path.join(os.path.dirname(ofa.__file__), 'tutorial', 'accuracy_predictor.py')
    spec = importlib.util.spec_from_file_location('ofa_tutorial_accuracy_predictor', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.AccuracyPredictor


@pytest.fixture(scope='module')
def w12():
    return timm.create_model('ofa_mbv3_w12', num_classes=10)


def _ref_dict(subnet, key='image_size'):
    r = subnet.resolution if key == 'image_size' else [subnet.resolution]
    return {'ks': list(subnet.kernels), 'e': [int(e) for e in subnet.expands], 'd': list(subnet.depths), key: r}


def test_encoding_equals_the_reference_mobilenet_encoder(w12):
    space = w12.space
    reference = MobileNetArchEncoder(image_size_list=list(space.resolutions), ks_list=[3, 5, 7],
                                     expand_list=[3, 4, 6], depth_list=[2, 3, 4], n_stage=5)
    subnets = [space.min(), space.max()] + [space.sample(i) for i in range(200)]
    ours = ArchEncoder(space)(space.encode(subnets))
    expected = np.array([reference.arch2feature(_ref_dict(s)) for s in subnets])
    assert ours.shape == expected.shape and np.array_equal(ours, expected)


def test_reference_predictors_give_the_same_predictions(w12):
    space = w12.space
    subnets = [space.sample(i) for i in range(100)]
    torch.manual_seed(0)
    encoder = MobileNetArchEncoder(image_size_list=list(space.resolutions), n_stage=5)
    reference = RefPredictor(encoder, device='cpu')
    for p in reference.parameters():
        p.data.normal_(0, 0.05)
    reference.base_acc.data.fill_(0.75)
    ours = AccuracyPredictor.from_reference(reference.state_dict(), space)
    with torch.no_grad():
        expected = reference.predict_acc([_ref_dict(s) for s in subnets]).numpy()
    assert np.allclose(ours.predict(space.encode(subnets)), 100 * expected, atol=1e-4)

    tutorial = _tutorial_predictor_class()(pretrained=False, device='cpu')  # the published 128-feature format
    for p in tutorial.model.parameters():
        p.data.normal_(0, 0.05)
    ours = AccuracyPredictor.from_reference(tutorial.model.state_dict(), space)
    expected = tutorial.predict_accuracy([_ref_dict(s, 'r') for s in subnets]).detach().numpy().ravel()
    assert np.allclose(ours.predict(subnets), 100 * expected, atol=1e-4)
    with pytest.raises(ValueError, match='features'):
        AccuracyPredictor.from_reference(tutorial.model.state_dict(), timm.create_model('ofa_resnet50').space)
