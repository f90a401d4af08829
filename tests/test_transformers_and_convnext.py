"""Vision transformers and ConvNeXt: the variants each family converts (layer scale, average pooling, register
tokens, a class-free position embedding, q/k norms, a channels-last MLP), what it refuses, the schedule written from
their dimensions, training, and a latency kit of token-shaped blocks. The contract test covers the rest."""
import pytest
import timm
import torch
from timm.layers import resample_abs_pos_embed

import ofa_timm
from ofa_timm.search import count_params, flops_model, params_model
from ofa_timm.testing import assert_close, cost_mismatches
from ofa_timm.training import PRESETS, Trainer, TrainConfig, build_schedule
from ofa_timm.training.sampling import StepSampler

RES = 32


def vit(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model('vit_tiny_patch16_224', img_size=RES, patch_size=8, depth=3, num_classes=5,
                             **kwargs).eval()


@pytest.mark.parametrize('kwargs', [
    dict(init_values=1e-2),  # layer scale (DeiT-III, CaiT style)
    dict(global_pool='avg', fc_norm=True),  # average pooling with the norm after it
    dict(reg_tokens=2, no_embed_class=True),  # register tokens, a position embedding without the prefix
    dict(qk_norm=True, class_token=True),
], ids=['layer-scale', 'avg-pool', 'registers', 'qk-norm'])
def test_vit_variants_convert_extract_and_count_exactly(kwargs):
    source = vit(**kwargs)
    supernet = ofa_timm.elasticize(source).eval()
    x = torch.randn(2, 3, RES, RES)
    with torch.no_grad():
        assert torch.equal(supernet(x), source(x))
        for subnet in [supernet.space.min(), supernet.space.sample(0), supernet.space.sample(1)]:
            supernet.set_active(subnet)
            model = supernet.extract(subnet).eval()
            xs = torch.randn(2, 3, subnet.resolution, subnet.resolution)
            assert_close(model(xs), supernet(xs), what=str(subnet))
    supernet.set_active(None)
    subnets = [supernet.space.max(), supernet.space.min()] + [supernet.space.sample(i) for i in range(4)]
    assert cost_mismatches(supernet, subnets) == []


@pytest.mark.parametrize('kwargs, match', [
    (dict(global_pool='map'), "Global pool 'map' is not supported"),
    (dict(dynamic_img_pad=True), 'dynamic image padding'),
    (dict(pos_embed='none'), 'without a learned position embedding'),
])
def test_vit_refuses_what_it_cannot_shrink(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ofa_timm.elasticize(vit(**kwargs))


def test_vit_resolutions_are_multiples_of_the_patch():
    source = vit()
    assert ofa_timm.elasticize(source).space.resolutions == (24, 32)  # from 4/7 of 32 up, in patches of 8
    with pytest.raises(ValueError, match=r'Resolutions \[30\] are not multiples of the patch size 8'):
        ofa_timm.elasticize(source, resolutions=(24, 30, 32))


def test_each_resolution_but_the_sources_has_a_position_embedding_of_its_own():
    """Trained alone, a subnet learns the position embedding of its own grid; sharing the source's, resampled, each
    resolution would pull it its own way."""
    source = vit()
    supernet = ofa_timm.elasticize(source).eval()
    assert list(supernet.pos_embed_delta) == ['24']  # 32 px is the source's own
    delta = supernet.pos_embed_delta['24']
    assert delta.shape == (1, 1 + 3 * 3, 192) and not delta.any()  # zero at conversion: the source is unchanged
    assert list(supernet.added_state()) == ['pos_embed_delta.24']  # what Stage.added_lr_scale reaches
    supernet.load_state_dict(supernet.complete_state(source.state_dict()))  # strict: the source's weights load
    with torch.no_grad():
        delta.normal_()
    x = torch.randn(2, 3, 24, 24)
    for subnet in (supernet.space.min(), supernet.space.max().replace(resolution=24)):
        supernet.set_active(subnet)
        model = supernet.extract(subnet).eval()
        c = subnet.embed_dim
        resampled = resample_abs_pos_embed(supernet.pos_embed[..., :c], new_size=[3, 3], old_size=[4, 4],
                                           num_prefix_tokens=1)
        assert torch.equal(model.pos_embed, resampled + delta[..., :c])
        with torch.no_grad():
            assert_close(model(x), supernet(x), what=str(subnet))
    assert torch.equal(supernet.extract(supernet.space.max()).pos_embed, supernet.pos_embed)
    with torch.no_grad():  # ranking the embedding's channels moves this embedding's with them
        before = supernet(x)
        supernet.rank('embed_dim', len(supernet.space['embed_dim'].choices[0]))
        assert_close(supernet(x), before, what='the max subnet at 24 px after ranking')


def test_convnext_channels_last_mlp_and_its_limits():
    torch.manual_seed(0)
    source = timm.create_model('convnext_atto', num_classes=5, conv_mlp=False).eval()  # Linear MLP on NHWC
    supernet = ofa_timm.elasticize(source, resolutions=(32, 48, 64)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(supernet(x), source(x))
        subnet = supernet.space.sample(0)
        supernet.set_active(subnet)
        assert_close(supernet.extract(subnet).eval()(x), supernet(x))
    supernet.set_active(None)
    assert cost_mismatches(supernet, [supernet.space.min(), subnet]) == []
    with pytest.raises(ValueError, match=r'Resolutions \[24\] are below 32'):
        ofa_timm.elasticize(source, resolutions=(24, 32))
    with pytest.raises(ValueError, match='GRN'):
        ofa_timm.elasticize(timm.create_model('convnextv2_atto'))


def test_no_batch_norm_means_no_recalibration():
    supernet = ofa_timm.elasticize(vit())
    assert not supernet.has_batchnorm and ofa_timm.elasticize(timm.create_model('resnet18')).has_batchnorm
    from ofa_timm.training import calibrate_bn
    assert calibrate_bn(supernet.extract('min'), [torch.randn(2, 3, 24, 24)], 2) == 0  # nothing run, nothing changed


@pytest.mark.parametrize('name, kwargs, order', [
    ('ofa_vit_tiny_patch16_224', dict(img_size=RES, patch_size=8, depth=4),
     ['full', 'depth_1', 'depth_2', 'heads_1', 'heads_2', 'mlp_ratio_1', 'mlp_ratio_2', 'embed_dim_1',
      'embed_dim_2']),
    ('ofa_convnext_atto', {}, ['full', 'kernel', 'depth_1', 'depth_2', 'mlp_ratio_1', 'mlp_ratio_2']),
])
def test_the_recipe_is_written_from_the_new_dimensions(name, kwargs, order):
    space = timm.create_model(name, **kwargs).space
    schedule = PRESETS['ofa'].schedule(space)
    assert [s.name for s in schedule.stages] == order
    stage = schedule.stages[-1]
    sampler = StepSampler(space, stage)
    seen = [s for step in range(10) for s in sampler.sample(step)]
    assert all(s in space for s in seen) and len(set(seen)) > 1


def test_a_small_vit_trains_through_every_stage(tmp_path):
    from ofa_timm.example_data import make_shapes_dataset
    from ofa_timm.training import DataConfig, build_datasets
    root = make_shapes_dataset(tmp_path / 'shapes', num_classes=3, train_per_class=8, val_per_class=4, image_size=RES)
    train, val, calib, n = build_datasets(DataConfig(str(root), image_size=RES, hflip=0.), seed=0)
    torch.manual_seed(0)
    supernet = timm.create_model('ofa_vit_tiny_patch16_224', num_classes=n, img_size=RES, patch_size=8, depth=3)
    schedule = build_schedule('scratch', supernet.space, epochs_scale=0.02, min_steps=0)
    trainer = Trainer(supernet, schedule, train, val, calib, TrainConfig(
        output=str(tmp_path / 'run'), batch_size=8, workers=0, calib_images=8, progress=False, val_every=100))
    assert 'No batch norm in this supernet' in trainer.describe_schedule()
    summaries = trainer.run()
    assert [s['stage'] for s in summaries] == [s.name for s in trainer.schedule.stages]
    assert all(0 <= s['top1'] <= 100 for s in summaries)


def test_token_shaped_latency_entries_and_kit(tmp_path):
    pytest.importorskip('onnxruntime')
    import json
    from ofa_timm.search.kit import make_kit
    supernet = ofa_timm.elasticize(vit()).eval()
    kit = make_kit(supernet, tmp_path / 'kit', calibrate=2, validate=0, progress=False)
    manifest = json.loads((kit / 'manifest.json').read_text())
    shapes = {tuple(m['input']) for m in manifest['models'] if m['part'] == 'blocks'}
    assert (1, 3, 24, 24) in shapes and (1, 3, 32, 32) in shapes  # the stem, at each resolution
    assert (1, 10, 192) in shapes and (1, 17, 144) in shapes  # blocks and head: tokens x embedding width
    params = params_model(supernet)
    for subnet in (supernet.space.min(), supernet.space.max()):
        assert params(subnet)[0] == count_params(supernet.extract(subnet))  # position embeddings grow with size
    assert flops_model(supernet)(supernet.space.min())[0] > 0


@pytest.mark.slow
@pytest.mark.parametrize('name, kwargs, resolutions', [
    ('ofa_vit_tiny_patch16_224', dict(img_size=RES, patch_size=8, depth=2), (24, 32)),
    ('ofa_convnext_atto', {}, (32, 40)),  # 32: the network's stride
], ids=['vit', 'convnext'])
def test_run_finishes_end_to_end_with_a_report(name, kwargs, resolutions, tmp_path):
    pytest.importorskip('onnxruntime')
    from ofa_timm.example_data import make_shapes_dataset
    from ofa_timm.pipeline import RunConfig, run
    size = max(resolutions)
    shapes = make_shapes_dataset(tmp_path / 'data', num_classes=3, train_per_class=8, val_per_class=6, image_size=size)
    out = tmp_path / 'run'
    result = run(RunConfig(
        model=name, model_kwargs=kwargs, data_dir=str(shapes), budgets='60%flops', out=str(out), latency=None,
        resolutions=resolutions, image_size=size, epochs_scale=0.02, min_steps=0, subnets=10, finalists=2,
        formats=('timm', 'onnx'), progress=False, train=TrainConfig(batch_size=8, workers=0, calib_images=8)))
    (b,) = result.budgets
    assert b.costs['flops'] <= b.limits['flops'] and 0 <= b.test_top1 <= 100
    report = (out / 'report.md').read_text()
    assert f'# {name}: one subnet per budget' in report and 'Teacher:' in report
    folder = out / 'export' / b.label
    model = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    assert isinstance(model, timm.models.VisionTransformer if 'vit' in name else timm.models.ConvNeXt)
    x = torch.randn(1, 3, b.subnet.resolution, b.subnet.resolution)
    import onnxruntime as ort
    session = ort.InferenceSession(str(folder / 'model.onnx'), providers=['CPUExecutionProvider'])
    with torch.no_grad():
        assert_close(torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]), model(x),
                     rtol=1e-4, what='ONNX Runtime against the exported timm model')
