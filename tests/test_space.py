import dataclasses
import json
import random

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from ofa_timm import SearchSpace, StageChoices, Subnet
from ofa_timm.space import Constraint, Dimension


def ofa_like_space() -> SearchSpace:
    stage = StageChoices(depths=(2, 3, 4), kernels=((3, 5, 7),) * 4, expands=((3, 4, 6),) * 4)
    return SearchSpace.from_stages((stage,) * 5, resolutions=tuple(range(128, 225, 4)))


SPACE = ofa_like_space()


def test_max_min_and_size():
    mx, mn = SPACE.max(), SPACE.min()
    assert mx.depths == (4,) * 5 and set(mx.kernels) == {7} and set(mx.expands) == {6.0} and mx.resolution == 224
    assert mn.depths == (2,) * 5 and set(mn.kernels) == {3} and set(mn.expands) == {3.0} and mn.resolution == 128
    # The OFA paper's count: ((3*3)^2 + (3*3)^3 + (3*3)^4)^5 ~ 2e19 architectures, times 25 resolutions.
    assert SPACE.size() == (9 ** 2 + 9 ** 3 + 9 ** 4) ** 5 * 25


def test_size_matches_enumeration():
    stage = StageChoices(depths=(1, 2), kernels=((3, 5), (3,)), expands=((2, 4), (4,)))
    space = SearchSpace.from_stages((stage,), widths=((0.5, 1.0),), resolutions=(32, 64))
    distinct = set()
    rng = random.Random(0)
    for _ in range(2000):
        s = space.sample(rng)
        d = s.depths[0]
        distinct.add((d, s.kernels[:d], s.expands[:d], s.widths, s.resolution))
    assert len(distinct) == space.size() == (4 + 4) * 2 * 2


def test_sample_deterministic_and_rng_types():
    assert SPACE.sample(3) == SPACE.sample(3)
    assert SPACE.sample(3) != SPACE.sample(4)
    a = SPACE.sample(random.Random(7))
    assert a == SPACE.sample(random.Random(7))
    b = SPACE.sample(np.random.default_rng(7))
    assert b == SPACE.sample(np.random.default_rng(7))
    for s in (a, b):
        SPACE.validate(s)
    with pytest.raises(ValueError, match='seed'):
        SPACE.sample('seven')


def test_subnet_is_hashable_and_normalised():
    a = Subnet(depths=[2, 3], kernels=[3, 5], expands=[3, 4], resolution=np.int64(160))
    b = Subnet(depths=(2, 3), kernels=(3, 5), expands=(3.0, 4.0), resolution=160)
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.depths = (1,)
    assert Subnet(depths=[2], kernels=[]) == Subnet(depths=[2]) and Subnet(depths=[2]).kernels == ()


def test_dict_and_json_round_trip(tmp_path):
    s = SPACE.sample(0)
    d = s.to_dict()
    assert set(d) == {'resolution', 'depths', 'kernels', 'expands'}
    assert json.loads(json.dumps(d)) == d
    assert Subnet.from_dict(d) == s
    path = tmp_path / 'sub' / 'subnet.json'
    s.to_json(path)
    assert Subnet.from_json(path) == s
    assert Subnet.parse(str(path)) == s and Subnet.parse(d) == s and Subnet.parse(s) is s
    w = Subnet(depths=(1, 2), expands=(0.25,) * 3, widths=(0.65, 1.0))
    assert Subnet.from_dict(w.to_dict()) == w and 'widths' in w.to_dict()


def test_reference_forms_need_a_supernet():
    with pytest.raises(ValueError, match=r"reference implementation's form.*supernet.resolve"):
        Subnet.from_dict({'ks': [3] * 20, 'e': [3] * 20, 'd': [2] * 5})
    with pytest.raises(ValueError, match=r"reference implementation's form"):
        Subnet.from_dict({'d': [2] * 5, 'e': [0.25] * 18, 'w': [0] * 6})


def test_gene_encoding_round_trip():
    subnets = [SPACE.max(), SPACE.min()] + [SPACE.sample(i) for i in range(20)]
    codes = SPACE.encode(subnets)
    assert codes.shape == (22, len(SPACE.genes)) and codes.dtype == np.int64
    assert SPACE.decode(codes) == subnets
    assert (codes[0] == SPACE.choice_counts - 1).all() and (codes[1] == 0).all()
    assert SPACE.decode(SPACE.encode(subnets[2])) == subnets[2]
    assert [g.name for g in SPACE.genes][:2] == ['depths[0]', 'depths[1]'] and SPACE.genes[-1].name == 'resolution'
    assert SPACE.genes[SPACE.gene_index('kernels', 3)].choices == (3, 5, 7)
    with pytest.raises(ValueError, match=r'shape \(N, 46\)'):
        SPACE.decode(codes[:, :3])
    with pytest.raises(ValueError, match='outside'):
        SPACE.decode(codes + 5)
    with pytest.raises(ValueError, match='without a resolution'):
        SPACE.encode(SPACE.max().replace(resolution=None))


@pytest.mark.parametrize('bad, match', [
    ({'depths': [2] * 5, 'kernels': [3] * 20, 'expands': ['big'] * 20}, r'expands\[0\] must be a number'),
    ({'depths': [-1] * 5}, r'depths\[0\] must be a finite number >= 0'),
    ({'depths': 'abc'}, 'must be a number or a list'),
    ({'depths': [2] * 5, 'not a name': 3}, 'identifiers'),
    ({'resolution': float('nan')}, 'finite'),
])
def test_malformed_dicts(bad, match):
    with pytest.raises(ValueError, match=match):
        Subnet.from_dict(bad)


@pytest.mark.parametrize('bad, match', [
    ({'depths': [2] * 5, 'kernels': [3] * 20, 'expands': [3] * 20, 'foo': 1}, r"values for \['foo'\].*dimensions are"),
    ({'kernels': [3] * 20, 'expands': [3] * 20}, "no 'depths'"),
    ({'depths': [2.5] * 5, 'kernels': [3] * 20, 'expands': [3] * 20}, r'depths\[0\] \(stage 0\) = 2.5 is not allowed'),
    ({'depths': [2] * 5, 'kernels': [4] * 20, 'expands': [3] * 20}, r'kernels\[0\] \(stage 0 block 0\) = 4'),
    ({'depths': 2, 'kernels': [3] * 20, 'expands': [3] * 20}, 'is a list of 5 values'),
    ({'depths': [2] * 5, 'kernels': [3] * 20, 'expands': [3] * 20, 'resolution': [128]}, 'is one number'),
])
def test_the_space_rejects_what_it_does_not_declare(bad, match):
    with pytest.raises(ValueError, match=match):
        SPACE.validate(Subnet.from_dict(bad))


def test_parse_errors(tmp_path):
    with pytest.raises(ValueError, match='does not exist'):
        Subnet.parse(tmp_path / 'missing.json')
    (tmp_path / 'bad.json').write_text('{not json')
    with pytest.raises(ValueError, match='not valid JSON'):
        Subnet.parse(tmp_path / 'bad.json')
    with pytest.raises(ValueError, match='Cannot read a subnet'):
        Subnet.parse(42)


@pytest.mark.parametrize('change, match', [
    (lambda s: s.replace(kernels=(9,) + s.kernels[1:]), r'kernels\[0\] \(stage 0 block 0\) = 9 is not allowed: '
                                                         r'allowed \[3, 5, 7\]'),
    (lambda s: s.replace(kernels=s.kernels[:-1]), r'kernels has 19 entries, but the space has 20 block slots'),
    (lambda s: s.replace(expands=s.expands[:5] + (5.0,) + s.expands[6:]),
     r'expands\[5\] \(stage 1 block 1\) = 5.0 is not allowed'),
    (lambda s: s.replace(depths=(2, 5, 2, 2, 2)), r'depths\[1\] \(stage 1\) = 5 is not allowed: .*max 4'),
    (lambda s: s.replace(depths=(2, 2, 2, 2)), r'depths has 4 entries, but the space has 5 stages'),
    (lambda s: s.replace(resolution=300), r'resolution = 300 is not allowed: allowed 128\.\.224 \(step 4\)'),
    (lambda s: s.replace(widths=(1.0,)), r"values for \['widths'\], which this space does not have"),
])
def test_validate_errors(change, match):
    with pytest.raises(ValueError, match=match):
        SPACE.validate(change(SPACE.max()))
    assert change(SPACE.max()) not in SPACE


def test_space_dict_round_trip():
    assert SearchSpace.from_dict(json.loads(json.dumps(SPACE.to_dict()))) == SPACE


def test_active_positions():
    s = SPACE.min().replace(depths=(2, 3, 4, 2, 2))
    assert SPACE.active(s, 'kernels') == [0, 1, 4, 5, 6, 8, 9, 10, 11, 12, 13, 16, 17]
    assert SPACE.active(s, 'depths') == [0, 1, 2, 3, 4]


def test_classic_space_dict_of_0_2_0_reads_as_the_declared_dimensions():
    old = {'stages': [{'depths': [1, 2], 'kernels': [[3, 5], [3]], 'expands': [[3.0], [3.0, 4.0]]}, {'depths': [1]}],
           'widths': [[0.5, 1.0]], 'resolutions': [32, 64]}
    space = SearchSpace.from_dict(old)
    assert space.names == ('depths', 'kernels', 'expands', 'widths', 'resolution')
    assert space['kernels'].stages == (0, 0) and space['expands'].choices == ((3.0,), (3.0, 4.0))
    assert SearchSpace.from_dict(space.to_dict()) == space and space.to_dict()['version'] == 2
    with pytest.raises(ValueError, match='format 3 is not one this release reads'):
        SearchSpace.from_dict({'version': 3, 'dimensions': []})


def vit_like_space(constraints=()) -> SearchSpace:
    """A space with dimensions no CNN family has: per-block heads, a network-scope embedding width."""
    return SearchSpace([
        Dimension.per_stage('depths', [(2, 3)], shrink_order=1),
        Dimension.per_block('heads', {(0, b): (2, 3, 4) for b in range(3)}, shrink_order=2, ranked=True),
        Dimension.network('embed_dim', (96, 128, 192), shrink_order=3),
        Dimension.network('resolution', (32, 48), shrink_order=0),
    ], constraints)


def test_declared_dimensions_drive_sampling_encoding_and_files(tmp_path):
    space = vit_like_space()
    assert space.size() == (3 ** 2 + 3 ** 3) * 3 * 2
    assert space.max() == Subnet(depths=[3], heads=[4, 4, 4], embed_dim=192, resolution=48)
    assert space.min().embed_dim == 96 and space['heads'].label == 'head' and space.elastic == space.names
    subnets = [space.sample(i) for i in range(30)]
    assert space.decode(space.encode(subnets)) == subnets
    assert [g.name for g in space.genes] == ['depths[0]', 'heads[0]', 'heads[1]', 'heads[2]', 'embed_dim',
                                             'resolution']
    assert list(space.gene_groups) == [0, 1, 2, 3, 4, 5]
    path = tmp_path / 'vit.json'
    subnets[0].to_json(path)
    assert json.loads(path.read_text())['embed_dim'] in (96, 128, 192)
    assert space.resolve(path) == subnets[0]
    assert SearchSpace.from_dict(json.loads(json.dumps(space.to_dict()))) == space
    restricted = space.restrict({'head': 2, 'resolution': 'all'})
    assert restricted['heads'].choices == ((3, 4),) * 3 and restricted['embed_dim'].choices == ((192,),)
    assert space.corner(['head']) == space.max().replace(heads=[2, 2, 2])


def test_constraints_are_kept_by_sampling_validation_and_encoding():
    space = vit_like_space([Constraint('heads', 'divides', 'embed_dim')])
    samples = [space.sample(i) for i in range(100)]
    assert all(s.embed_dim % h == 0 for s in samples for h in s.heads)
    assert any(s.embed_dim == 128 for s in samples)  # only the combinations that break it are redrawn
    bad = space.max().replace(embed_dim=128, heads=[2, 3, 4])
    with pytest.raises(ValueError, match=r'breaks the constraint heads divides embed_dim \(heads\[1\]'):
        space.validate(bad)
    assert bad not in space
    ok = space.encode(space.max().replace(embed_dim=128, heads=[2, 4, 4]))
    codes = np.stack([ok, ok])
    codes[1, 2] = 1  # heads[1] = 3
    assert space.feasible(codes).tolist() == [True, False]
    with pytest.raises(ValueError, match='max subnet of the space breaks'):
        SearchSpace(space.dimensions, [Constraint('embed_dim', '<=', 'heads')])
    with pytest.raises(ValueError, match="names 'width'"):
        SearchSpace(space.dimensions, [Constraint('width', '<=', 'heads')])


def test_declarations_are_checked():
    with pytest.raises(ValueError, match="needs a 'depths' dimension"):
        SearchSpace([Dimension.per_block('heads', {(0, 0): (1, 2)})])
    with pytest.raises(ValueError, match='outside the stages'):
        SearchSpace([Dimension.per_stage('depths', [(1, 2)]), Dimension.per_block('heads', {(0, 2): (1, 2)})])
    with pytest.raises(ValueError, match='repeats a choice'):
        Dimension.network('embed_dim', (96, 96))
    with pytest.raises(ValueError, match='scope'):
        Dimension('x', 'layer', ((1,),))
    with pytest.raises(ValueError, match='unique'):
        SearchSpace([Dimension.network('x', (1,)), Dimension.network('x', (2,))])


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2 ** 32 - 1))
def test_property_samples_are_valid_and_round_trip(seed):
    s = SPACE.sample(seed)
    assert SPACE.validate(s) == s
    assert Subnet.from_dict(json.loads(json.dumps(s.to_dict()))) == s


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2 ** 32 - 1), field=st.sampled_from(['depths', 'kernels', 'expands']),
       value=st.integers(-3, 12), data=st.data())
def test_property_out_of_space_values_are_rejected(seed, field, value, data):
    s = SPACE.sample(seed)
    values = list(getattr(s, field))
    idx = data.draw(st.integers(0, len(values) - 1))
    allowed = {'depths': (2, 3, 4), 'kernels': (3, 5, 7), 'expands': (3, 4, 6)}[field]
    values[idx] = value
    try:
        bad = s.replace(**{field: values})
    except ValueError as e:  # rejected by the type check already (a negative value)
        assert field in str(e)
        return
    if value in allowed:
        assert bad in SPACE
    else:
        with pytest.raises(ValueError, match=rf'{field}\[{idx}\] \([^)]*\) = {value}'):
            SPACE.validate(bad)
