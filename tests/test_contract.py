"""The family contract, checked on every supernet family the package registers (canonical and converted spaces).

A new family is tested by adding one line to ``CASES``.
"""
import random

import pytest
import timm
import torch
from timm.models import ConvNeXt, EfficientNet, MobileNetV3, ResNet, VisionTransformer, save_for_hf
from torch.utils.flop_counter import FlopCounterMode

import ofa_timm
from ofa_timm.elastic import ElasticSupernet, OFAResNet, single_subnet
from ofa_timm.search import count_params
from ofa_timm.training import calibrate_bn, sort_channels

from helpers import assert_close, randomize_bn, timm_model

RES = 64

# (registered name, timm source model or None for a canonical space, the timm class its subnets come out as, model
# kwargs that make the case small enough for the suite)
CASES = [
    ('ofa_mobilenetv3_large_100', 'mobilenetv3_large_100', MobileNetV3, {}),
    ('ofa_mobilenetv3_small_100', 'mobilenetv3_small_100', MobileNetV3, {}),
    ('ofa_mbv3_w12', None, MobileNetV3, {}),
    ('ofa_mobilenetv4_conv_small', 'mobilenetv4_conv_small', MobileNetV3, {}),
    ('ofa_lcnet_100', 'lcnet_100', MobileNetV3, {}),
    ('ofa_efficientnet_b0', 'efficientnet_b0', EfficientNet, {}),
    ('ofa_fbnetc_100', 'fbnetc_100', EfficientNet, {}),
    ('ofa_resnet50d', 'resnet50d', ResNet, {}),
    ('ofa_resnet34', 'resnet34', ResNet, {}),
    ('ofa_resnet50', None, OFAResNet, {}),
    ('ofa_vit_tiny_patch16_224', 'vit_tiny_patch16_224', VisionTransformer, dict(depth=4, img_size=RES)),
    ('ofa_convnext_atto', 'convnext_atto', ConvNeXt, {}),
]
NAMES = [c[0] for c in CASES]
SOURCES = {name: source for name, source, _, _ in CASES}
CLASSES = {name: cls for name, _, cls, _ in CASES}
KWARGS = {name: kwargs for name, _, _, kwargs in CASES}


@pytest.fixture(scope='module')
def _supernets():
    return {}


@pytest.fixture(params=NAMES)
def supernet(request, _supernets) -> ElasticSupernet:
    """The registered supernet (10 classes, randomized BN), built once per module; reset after each test."""
    name = request.param
    if name not in _supernets:
        torch.manual_seed(0)
        _supernets[name] = randomize_bn(timm.create_model(name, num_classes=10, **KWARGS[name]))
    model = _supernets[name].eval()
    yield model
    model.set_active(None)
    model.eval()


def subnets(space, n: int = 4):
    return [space.max(), space.min()] + [space.sample(i) for i in range(n)]


def fixed_size(name: str) -> bool:
    """Whether the family's extracted models take their own resolution only (a transformer's position embedding);
    the CNNs take any."""
    return CLASSES[name] is VisionTransformer


def inputs(name: str, subnet, n: int = 2) -> torch.Tensor:
    """A batch at the subnet's resolution where the family needs it, else at RES."""
    res = subnet.resolution if fixed_size(name) else RES
    return torch.randn(n, 3, res, res)


@pytest.mark.parametrize('name', [n for n, source, _, _ in CASES if source is not None])
def test_max_subnet_is_the_source_model(name):
    source = timm_model(SOURCES[name], **KWARGS[name])
    sn = ofa_timm.elasticize(source).eval()
    x = torch.randn(2, 3, RES, RES)
    with torch.no_grad():
        expected = source(x)
        assert torch.equal(sn(x), expected)
        ext = sn.extract('max')
        assert torch.equal(ext(x), expected)
    assert list(ext.state_dict()) == list(source.state_dict())  # the source architecture, key for key


def test_extract_equals_supernet_and_is_a_stock_timm_model(supernet):
    name = supernet.pretrained_cfg['architecture']
    for subnet in subnets(supernet.space):
        x = inputs(name, subnet)
        supernet.set_active(subnet)
        ext = supernet.extract()
        assert type(ext) is CLASSES[supernet.pretrained_cfg['architecture']]
        assert not ext.training
        assert ext.pretrained_cfg['input_size'] == (3, subnet.resolution, subnet.resolution)
        with torch.no_grad():
            assert_close(ext(x), supernet(x))


def test_extract_is_independent_and_keeps_the_active_subnet(supernet):
    subnet = supernet.space.sample(1)
    supernet.train()
    ext = supernet.extract(subnet)
    assert ext.training and supernet.active_subnet == supernet.space.max()
    ptrs = {p.data_ptr() for p in supernet.parameters()}
    assert not any(p.data_ptr() in ptrs for p in ext.parameters())
    assert all(not t.is_meta for t in ext.state_dict().values())


def test_save_for_hf_round_trip(supernet, tmp_path):
    name = supernet.pretrained_cfg['architecture']
    subnet = supernet.space.sample(3)
    torch.manual_seed(0)
    model = timm.create_model(name, subnet=subnet.to_dict(), num_classes=10, **KWARGS[name]).eval()
    save_for_hf(model, str(tmp_path), safe_serialization=True)
    again = timm.create_model(f'local-dir:{tmp_path}', pretrained=True).eval()
    assert type(again) is type(model) is CLASSES[name]
    x = inputs(name, subnet)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
    assert again.pretrained_cfg['input_size'] == model.pretrained_cfg['input_size']


def test_features_only(supernet):
    name = supernet.pretrained_cfg['architecture']
    x = inputs(name, supernet.space.max(), 1)
    features = timm.create_model(name, features_only=True, **KWARGS[name]).eval()
    feats = features(x)
    reductions = features.feature_info.reduction()
    assert len(feats) == len(reductions) > 0
    assert [f.shape[-1] for f in feats] == [-(-x.shape[-1] // r) for r in reductions]
    assert features.feature_info.channels() == [f.shape[1] for f in feats]
    small = timm.create_model(name, features_only=True, subnet='min', out_indices=(0, 1), **KWARGS[name]).eval()
    out = small(inputs(name, supernet.space.min(), 1))
    assert len(out) == 2 and small.feature_info.channels() == [f.shape[1] for f in out]


def test_forward_intermediates_match_extracted_features(supernet):
    subnet = supernet.set_active(supernet.space.sample(2))
    x = inputs(supernet.pretrained_cfg['architecture'], subnet, 1)
    with torch.no_grad():
        final, feats = supernet.forward_intermediates(x)
        assert torch.equal(final, supernet.forward_features(x))
        ext = supernet.extract(subnet)
        expected = ext.forward_intermediates(x, intermediates_only=True)
    assert len(feats) == len(expected) > 0
    for a, b in zip(feats, expected):
        assert_close(a, b)


def test_ranking_keeps_trained_subnets(supernet):
    """Ranking a dimension (OFA's channel sorting) changes no subnet whose value of it was trained: the max subnet,
    then the subnet at the second-largest choices once those are trained too."""
    space = supernet.space
    x = torch.randn(2, 3, RES, RES)
    ranked = [d for d in space.dimensions if d.ranked and d.elastic]
    state = {k: v.clone() for k, v in supernet.state_dict().items()}
    try:
        if not ranked:  # e.g. LCNet: depthwise-separable blocks have no mid channels of their own
            assert sort_channels(supernet, trained=1) == []
            assert all(torch.equal(v, state[k]) for k, v in supernet.state_dict().items())
        for d in ranked:
            second_choices = [c[-2] if len(c) > 1 else c[-1] for c in d.choices]
            second = space.max().replace(**{d.name: second_choices[0] if d.scalar else second_choices})
            with torch.no_grad():
                supernet.set_active(None)
                before = supernet(x)
                assert sort_channels(supernet, trained=1, dimensions=[d.name]) == [d.name]
                assert_close(supernet(x), before, what=f'max subnet after ranking {d.name}')
                assert any(not torch.equal(v, state[k]) for k, v in supernet.state_dict().items()), \
                    f'ranking {d.name} moved nothing'  # the weights are random: some channels are out of order
                supernet.set_active(second)
                band_before = supernet(x)
                sort_channels(supernet, trained=2, dimensions=[d.name])  # its 2nd-largest choices were trained
                assert_close(supernet(x), band_before, what=f'{d.name} at its 2nd-largest choices')
                supernet.set_active(None)
                assert_close(supernet(x), before)
    finally:
        supernet.load_state_dict(state)


def test_bn_calibration_of_supernet_and_extracted_subnet_agree(supernet):
    subnet = supernet.space.min()
    torch.manual_seed(0)
    batches = [inputs(supernet.pretrained_cfg['architecture'], subnet, 4) for _ in range(3)]
    static = supernet.extract(subnet)
    calibrate_bn(static, batches, 12)
    state = {k: v.clone() for k, v in supernet.state_dict().items()}
    try:
        supernet.set_active(subnet)
        calibrate_bn(supernet, batches, 12)
        with torch.no_grad():
            assert_close(static.eval()(batches[0]), supernet.eval()(batches[0]))
    finally:
        supernet.load_state_dict(state)


def test_describe_counts_what_the_extracted_model_runs(supernet):
    name = supernet.pretrained_cfg['architecture']
    rng = random.Random(0)
    for subnet in subnets(supernet.space, 3):
        # odd sizes exercise the ceil of strided layers
        res = subnet.resolution if fixed_size(name) else rng.choice((RES, RES + 8, 97))
        specs = supernet.describe(subnet)
        assert [s.name for s in specs][0] == 'stem' and specs[-1].name == 'head'
        model = supernet.extract(subnet).eval()
        for m in model.modules():  # FlopCounterMode counts nothing of a fused CPU attention
            if hasattr(m, 'fused_attn'):
                m.fused_attn = False
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(torch.zeros(1, 3, res, res))
        assert sum(s.flops(res) for s in specs) == counter.get_total_flops()
        assert sum(s.params(res) for s in specs) == count_params(model)
        names = dict(model.named_modules())
        assert all(m in names for s in specs for m in s.modules)


def test_describe_genes_name_what_a_block_depends_on(supernet):
    """Changing a gene a block does not list leaves its description unchanged."""
    space = supernet.space
    base = space.encode(space.max())
    by_name = {s.name: s for s in supernet.describe(space.max())}
    rng = random.Random(0)
    for gene in rng.sample(range(len(space.genes)), min(8, len(space.genes))):
        if space.genes[gene].field == 'resolution' or len(space.genes[gene].choices) == 1:
            continue
        codes = base.copy()
        codes[gene] = 0
        changed = {s.name: s for s in supernet.describe(space.decode(codes))}
        for name, spec in by_name.items():
            if gene not in spec.genes:
                assert changed.get(name) == spec, (name, space.genes[gene].name)


def test_contract_hooks(supernet):
    space = supernet.space
    assert supernet.resolve('min') == space.min() and supernet.resolve(None) == space.max()
    assert supernet.resolve(space.sample(0).to_dict()) == space.sample(0)
    assert all(d.doc for d in space.dimensions), 'each dimension says what its values mean for the family'
    assert supernet.resolution_of(space.max()) == max(space.resolutions)
    # what conversion adds is there in a fresh supernet, and only that is filled into a source's state dict
    own = supernet.state_dict()
    added = {k for k in supernet.complete_state({}) if k in own}
    assert set(supernet.complete_state({k: v for k, v in own.items() if k not in added})) == set(own)


def test_single_subnet_is_the_model_alone(supernet):
    """A subnet (or any timm model of the family) as a one-subnet supernet: what trains a subnet alone."""
    space = supernet.space
    # An OFA-ResNet50 subnet that skips the residual stem conv comes out as an OFAResNet without it, which no family
    # converts: its subnets here keep the stem.
    picks = [space.max(), space.sample(3)]
    if supernet.pretrained_cfg.get('architecture') == 'ofa_resnet50':
        picks = [s.replace(depths=(1,) + tuple(s.depths[1:])) for s in picks]
    for subnet in picks:
        model = supernet.extract(subnet).eval()
        alone = single_subnet(model, subnet.resolution).eval()
        assert alone.space.size() == 1 and alone.space.resolutions == (subnet.resolution,)
        x = torch.randn(2, 3, subnet.resolution, subnet.resolution)
        with torch.no_grad():
            assert torch.equal(alone(x), model(x))
        assert type(alone.extract('max')) is type(model)
