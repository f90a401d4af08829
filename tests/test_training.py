"""Progressive shrinking: schedule, sampling, losses, BN calibration, channel sorting, the loop, resume, DDP."""
import json
import math
import os
import socket
from dataclasses import replace

import pytest
import timm
import torch
import torch.multiprocessing as mp
import torch.nn as nn

import ofa_timm
from ofa_timm.example_data import make_shapes_dataset
from ofa_timm.space import RESOLUTION
from ofa_timm.training import (
    PRESETS, DataConfig, NonFiniteLossError, Schedule, ShrinkingConfig, Stage, StepSampler, TrainConfig, Trainer,
    alpha_divergence, band_permutation, build_datasets, build_schedule, calibrate_bn, distillation_loss,
    distills_from_teacher, load_checkpoint, load_schedule, restrict_space)
from ofa_timm.training.report import source_check_lines
from ofa_timm.training.sampling import applicable_stages, unknown_unlocks
from ofa_timm.training.trainer import _Position


RES = 32


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    root = make_shapes_dataset(tmp_path_factory.mktemp('shapes'), num_classes=4, train_per_class=8, val_per_class=4,
                               image_size=RES)
    return build_datasets(DataConfig(str(root), image_size=RES, scale=(0.5, 1.0)), seed=0)


def tiny_supernet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    source = timm.create_model('mobilenetv3_small_050', num_classes=4, drop_rate=0.1)
    return ofa_timm.elasticize(source, resolutions=(24, 32))


TINY = Schedule((
    Stage('full', 1, 1e-2, {}, kd_ratio=0.),
    Stage('kernel', 1, 1e-2, {'kernel': 'all', 'resolution': 'all'}),
    Stage('expand_1', 1, 5e-3, {'kernel': 'all', 'depth': 'all', 'expand': 2, 'resolution': 'all'},
          subnets_per_step=2),
))


def config(tmp_path, **kw) -> TrainConfig:
    return TrainConfig(output=str(tmp_path), batch_size=8, workers=0, calib_images=8, progress=False, log_every=1,
                       **kw)


# --- schedule -----------------------------------------------------------------------------------------------------
def mbv3_space():
    return timm.create_model('ofa_mbv3').space


def test_presets_follow_the_reference_order():
    ofa = PRESETS['ofa'].schedule(mbv3_space())
    assert [s.name for s in ofa.stages] == ['full', 'kernel', 'depth_1', 'depth_2', 'expand_1', 'expand_2']
    table = {s.name: (s.epochs, s.lr, s.subnets_per_step) for s in ofa.stages}
    assert table['kernel'] == (120, 3e-2, 1)
    assert table['depth_1'] == (25, 2.5e-3, 2) and table['depth_2'] == (120, 7.5e-3, 2)
    assert table['expand_1'] == (25, 2.5e-3, 4) and table['expand_2'] == (120, 7.5e-3, 4)
    assert all(s.kd_ratio == 1.0 for s in ofa.stages[1:])


def test_schedule_yaml_round_trip_and_scale(tmp_path):
    path = tmp_path / 's.yaml'
    fast = PRESETS['fast'].schedule(mbv3_space())
    fast.to_yaml(path)
    again = load_schedule(str(path), epochs_scale=0.5)
    assert again.stages == fast.stages and again.epochs_scale == 0.5 and again.min_steps == fast.min_steps
    assert again.stage_epochs(again.stages[1]) == fast.stages[1].epochs * 0.5


@pytest.mark.parametrize('bad, match', [
    (dict(name='x', epochs=1, lr=0.1, unlock={'not a name': 'all'}), 'unlock keys are dimension labels'),
    (dict(name='x', epochs=1, lr=0.1, unlock={'depth': 0}), "must be 'all' or a positive int"),
    (dict(name='x', epochs=1, lr=-1), 'lr must be > 0'),
    (dict(name='x', epochs=1, lr=0.1, sampling='random'), "sampling 'random' not in"),
    (dict(name='x', epochs=1, lr=0.1, added_lr_scale=0), 'added_lr_scale must be > 0'),
    (dict(name='x', epochs=1, lr=0.1, labels_max_only=True), "labels_max_only needs in-place distillation .*'uniform'"),
    (dict(name='x', epochs=1, lr=0.1, sampling='sandwich', kd_ratio=0, labels_max_only=True), 'kd_ratio 0'),
])
def test_bad_stages(bad, match):
    with pytest.raises(ValueError, match=match):
        Stage(**bad)


def test_bad_schedule_inputs(tmp_path):
    with pytest.raises(ValueError, match='Unknown schedule'):
        load_schedule('fastest')
    with pytest.raises(ValueError, match='pass space=supernet.space'):
        load_schedule('ofa')
    (tmp_path / 'bad.yaml').write_text('stages:\n  - {name: a, epochs: 1, lr: 0.1, foo: 2}\n')
    with pytest.raises(ValueError, match="stage 0: .*'foo'"):
        load_schedule(str(tmp_path / 'bad.yaml'))


def test_min_steps_floor_lengthens_every_stage_in_proportion():
    schedule = Schedule(TINY.stages, min_steps=30)
    assert schedule.total_steps(5) == 15  # 3 stages of 1 epoch at 5 steps/epoch
    fitted = schedule.fit(5)
    steps = [fitted.stage_steps(s, 5) for s in fitted.stages]
    assert sum(steps) == 30 and max(steps) - min(steps) <= 1  # the stages keep their shares
    assert fitted.fit(5) == fitted
    assert schedule.fit(40) is schedule  # a large dataset reaches the floor in its epochs: unchanged
    assert Schedule.from_dict(fitted.to_dict()) == fitted  # the floor travels in YAML and checkpoints
    with pytest.raises(ValueError, match='min_steps'):
        Schedule(TINY.stages, min_steps=-1)
    with pytest.raises(ValueError, match="'kernel': floor_weight must be > 0"):
        replace(TINY.stages[1], floor_weight=0.)


def test_floor_weights_share_the_floor_and_never_shorten_a_stage():
    full, *shared = TINY.stages
    weighted = Schedule((full, *(replace(s, floor_weight=2., warmup_epochs=0.5) for s in shared)), min_steps=50)
    fitted = weighted.fit(5)  # 15 steps at 5 steps/epoch: the floor binds
    assert [fitted.stage_steps(s, 5) for s in fitted.stages] == [10, 20, 20]  # shares 1 : 2 : 2 per epoch
    assert [s.warmup_epochs / s.epochs for s in fitted.stages] == pytest.approx([0, 0.5, 0.5])
    # A floor that barely binds lengthens the heavy stages only: none runs below its own epochs.
    barely = replace(weighted, min_steps=19).fit(5)
    assert [barely.stage_steps(s, 5) for s in barely.stages] == [5, 7, 7]
    with pytest.raises(ValueError, match='0 epochs cannot be lengthened to the floor of 5 steps'):
        Schedule((Stage('empty', 0, 0.1),), min_steps=5).fit(3)


def test_auto_picks_fast_for_a_pretrained_start_and_scratch_otherwise():
    space = mbv3_space()
    assert load_schedule('auto', pretrained=True, space=space) == PRESETS['fast'].schedule(space)
    assert load_schedule('auto', pretrained=False, space=space) == PRESETS['scratch'].schedule(space)
    assert load_schedule('auto', epochs_scale=0.5, space=space).epochs_scale == 0.5
    assert PRESETS['fast'].min_steps > 0 and PRESETS['scratch'].min_steps > 0
    assert PRESETS['ofa'].min_steps == 0  # the reference recipe is left as it is
    assert all(s.sampling == 'uniform' and not s.carry_optimizer for s in PRESETS['ofa'].schedule(space).stages)
    # from pretrained weights the min subnet trains where it is deployed (docs/results.md); from scratch it did not gain
    assert all(s.min_resolution for s in PRESETS['fast'].schedule(space).stages[1:])
    assert not any(s.min_resolution for s in PRESETS['scratch'].schedule(space).stages)


@pytest.mark.parametrize('preset', sorted(PRESETS))
def test_every_shrinking_stage_trains_a_subnet_smaller_than_the_max(preset):
    # Under the sandwich rule a stage's first subnet is the max: with one subnet per step a stage fine-tunes the max
    # and trains nothing it unlocks (the pretrained recipe's kernel stage once did).
    space = mbv3_space()
    mx = space.max()
    for stage in PRESETS[preset].schedule(space).stages[1:]:
        sampler = StepSampler(space, stage, seed=0)
        drawn = [s for step in range(20) for s in sampler.sample(step)]
        for label in stage.unlock:
            name = space.by_label(label).name
            if name != RESOLUTION:
                assert any(s[name] != mx[name] for s in drawn), f'{preset}: stage {stage.name} never trains {label}'


def test_build_schedule_applies_every_override():
    space = mbv3_space()
    plain = build_schedule('auto', space, pretrained=True)
    assert plain == PRESETS['fast'].schedule(space)
    built = build_schedule('auto', space, pretrained=True, epochs_scale=0.5, min_steps=7, lr_scale=2.0,
                           sampling='uniform')
    assert built.epochs_scale == 0.5 and built.min_steps == 7
    assert [s.lr for s in built.stages] == [2.0 * s.lr for s in plain.stages]
    assert {s.sampling for s in built.stages} == {'uniform'}
    with pytest.raises(ValueError, match='lr_scale'):
        build_schedule('ofa', space, lr_scale=0)


@pytest.mark.parametrize('name, order', [
    ('ofa_mbv3', ['full', 'kernel', 'depth_1', 'depth_2', 'expand_1', 'expand_2']),
    ('ofa_resnet50', ['full', 'depth_1', 'depth_2', 'expand_1', 'expand_2', 'width_1', 'width_2']),
])
def test_recipes_are_written_from_the_declared_dimensions(name, order):
    """The stages come from each dimension's shrink order and phases; the k-th two-phase dimension trains
    min(4, 2**k) subnets per step, as OFA's depth (2) and expand (4) stages do."""
    space = timm.create_model(name).space
    schedule = PRESETS['ofa'].schedule(space)
    assert [s.name for s in schedule.stages] == order
    by_name = {s.name: s for s in schedule.stages}
    assert by_name['depth_1'].subnets_per_step == 2 and by_name['expand_2'].subnets_per_step == 4
    assert by_name['depth_1'].unlock == {**({'kernel': 'all'} if 'kernel' in by_name else {}), 'depth': 2,
                                         'resolution': 'all'}
    assert all('resolution' in s.unlock for s in schedule.stages[1:])


def test_a_schedule_of_0_2_0_runs_on_a_family_without_some_of_its_dimensions():
    """0.2.0's presets unlocked kernel, depth, expand and width for every family: the dimensions a space lacks unlock
    nothing, and the stages they alone would train are dropped."""
    old = Schedule((Stage('kernel', 1, 0.1, {'kernel': 'all', 'resolution': 'all'}),
                    Stage('depth_1', 1, 0.1, {'kernel': 'all', 'depth': 2, 'resolution': 'all'})))
    r50 = timm.create_model('ofa_resnet50d').space
    assert unknown_unlocks(old, r50) == ['kernel']
    kept = applicable_stages(old, r50, pretrained=True)
    assert [s.name for s in kept.stages] == ['depth_1'] and kept.stages[0].unlock == {'depth': 2, 'resolution': 'all'}


def test_a_short_schedule_says_so_in_one_line(data, tmp_path):
    train, val, calib, _ = data
    short = Trainer(tiny_supernet(), TINY, train, val, calib, config(tmp_path))
    text = short.describe_schedule()
    assert text.splitlines()[0].startswith('Stages (optimizer steps): full 4, kernel 4')
    warning = text.splitlines()[1]
    need = PRESETS['scratch'].min_steps
    assert len(text.splitlines()) == 2 and f'--min-steps {need}' in warning and 'trains 12 optimizer steps' in warning
    floored = Trainer(tiny_supernet(), Schedule(TINY.stages, min_steps=need), train, val, calib, config(tmp_path))
    assert len(floored.describe_schedule().splitlines()) == 1  # the floor holds: no warning
    assert floored.schedule.total_steps(floored.steps_per_epoch) >= need


def test_a_stage_that_trains_only_the_full_network_does_not_distill(data, tmp_path):
    """Its teacher would be a frozen copy of the network at the stage's start: KD towards it only holds it back."""
    train, val, calib, _ = data
    alone = Schedule((Stage('full', 1, 1e-2, {}, kd_ratio=1.0),))  # kd_ratio left at its default
    trainer = Trainer(tiny_supernet(), alone, train, val, calib, config(tmp_path))
    trainer.run()
    assert trainer.teacher is None and not distills_from_teacher(alone.stages[0])
    assert distills_from_teacher(TINY.stages[1]) and not distills_from_teacher(
        replace(TINY.stages[1], sampling='sandwich'))


def test_sandwich_with_a_frozen_teacher_distils_the_max_subnet_too():
    """inplace_kd=False: every subnet of a sandwich step, the max included, is distilled from the frozen teacher (which
    holds a converged max where it started); the default distils the others from the step's max subnet."""
    from ofa_timm.training import shrinking_step

    class Net:
        def set_active(self, subnet):
            pass
    frozen = Stage('s', 1, 0.1, {'kernel': 'all'}, sampling='sandwich', inplace_kd=False, subnets_per_step=2)
    inplace = replace(frozen, inplace_kd=True)
    assert distills_from_teacher(frozen) and not distills_from_teacher(inplace)
    logits, teacher = torch.tensor([[2., 0.]]), torch.tensor([[0., 2.]])
    for stage, expected_first in ((frozen, True), (inplace, False)):
        losses = []
        shrinking_step(Net(), ['max', 'min'], stage, lambda s: (torch.tensor(1.0), logits), losses.append,
                       ShrinkingConfig(), teacher if distills_from_teacher(stage) else None)
        assert (losses[0].item() > 1.0) == expected_first  # KD added to the max subnet's loss
        assert losses[1].item() > 1.0  # the min subnet is distilled either way
    losses = []
    shrinking_step(Net(), ['max', 'min'], inplace, lambda s: (torch.tensor(1.0), logits if s == 'max' else teacher),
                   losses.append, ShrinkingConfig(kd_kind='alpha'))  # the min subnet distils from the max with --kd
    assert torch.allclose(losses[1], 1.0 + alpha_divergence(teacher, logits))


def test_with_labels_for_the_max_only_the_smaller_subnets_learn_from_its_predictions_alone():
    """Stage.labels_max_only (BigNAS): the max subnet's loss is its label loss, the others' the distillation from it
    without their label loss."""
    from ofa_timm.training import shrinking_step

    class Net:
        def set_active(self, subnet):
            pass
    stage = Stage('s', 1, 0.1, {'kernel': 'all'}, sampling='sandwich', subnets_per_step=3, labels_max_only=True)
    max_logits, small = torch.tensor([[2., 0.]]), torch.tensor([[0., 2.]])
    label_loss = torch.tensor(1.5)
    losses = []
    shrinking_step(Net(), ['max', 'mid', 'min'], stage, lambda s: (label_loss, max_logits if s == 'max' else small),
                   losses.append, ShrinkingConfig())
    kd = distillation_loss(small, max_logits, 'ce', ShrinkingConfig().kd_temperature)
    assert losses[0].item() == 1.5
    assert torch.allclose(losses[1], kd) and torch.allclose(losses[2], kd) and kd.item() > 0
    losses.clear()
    shrinking_step(Net(), ['max', 'min'], replace(stage, labels_max_only=False),
                   lambda s: (label_loss, max_logits if s == 'max' else small), losses.append, ShrinkingConfig())
    assert torch.allclose(losses[1], label_loss + kd)  # the default adds both


def test_a_stage_clips_its_gradients_unless_the_run_overrides_it(data, tmp_path, monkeypatch):
    train, val, calib, _ = data
    seen = []
    real = torch.nn.utils.clip_grad_norm_

    def clip(params, max_norm, *args, **kwargs):
        seen.append(max_norm)
        return real(params, max_norm, *args, **kwargs)
    monkeypatch.setattr(torch.nn.utils, 'clip_grad_norm_', clip)
    schedule = Schedule((Stage('full', 1, 1e-2, kd_ratio=0., clip_grad=7.0),))
    Trainer(tiny_supernet(), schedule, train, val, calib, config(tmp_path / 'a')).run()
    assert len(seen) == 4 and set(seen) == {7.0}  # every step of the stage
    seen.clear()
    Trainer(tiny_supernet(), schedule, train, val, calib, config(tmp_path / 'b', clip_grad=3.0)).run()
    assert set(seen) == {3.0}
    with pytest.raises(ValueError, match='clip_grad must be > 0'):
        Stage('x', 1, 0.1, clip_grad=0)


def test_stages_that_do_not_apply_are_dropped():
    mbv3 = mbv3_space()
    r50 = timm.create_model('ofa_resnet50d').space
    assert [s.name for s in applicable_stages(PRESETS['ofa'].schedule(mbv3), mbv3, pretrained=True).stages] == [
        'kernel', 'depth_1', 'depth_2', 'expand_1', 'expand_2']
    names = [s.name for s in applicable_stages(PRESETS['ofa'].schedule(r50), r50, pretrained=False).stages]
    assert names[0] == 'full' and 'kernel' not in names and 'width_2' in names


# --- sampling -----------------------------------------------------------------------------------------------------
def test_each_stage_unlocks_only_its_dimensions():
    space = mbv3_space()
    mx = space.max()
    for stage in PRESETS['ofa'].schedule(space).stages:
        sampler = StepSampler(space, stage, seed=0)
        seen = {'kernels': set(), 'expands': set(), 'depths': set(), 'resolution': set()}
        for step in range(40):
            subnets = sampler.sample(step)
            assert len(subnets) == stage.subnets_per_step
            assert len({s.resolution for s in subnets}) == 1  # one resolution per batch
            for s in subnets:
                space.validate(s)
                seen['kernels'].update(s.kernels)
                seen['expands'].update(s.expands)
                seen['depths'].update(s.depths)
                seen['resolution'].add(s.resolution)
        unlock = stage.unlock
        assert seen['kernels'] == ({3, 5, 7} if 'kernel' in unlock else set(mx.kernels))
        expected_e = {'all': {3.0, 4.0, 6.0}, 2: {4.0, 6.0}}.get(unlock.get('expand'), {6.0})
        assert seen['expands'] == expected_e
        expected_d = {'all': {2, 3, 4}, 2: {3, 4}}.get(unlock.get('depth'), {4})
        assert seen['depths'] == expected_d
        assert len(seen['resolution']) > 1 if 'resolution' in unlock else seen['resolution'] == {224}


def test_sampling_is_seeded_by_step_and_sandwich_rule():
    space = mbv3_space()
    stage = PRESETS['ofa'].schedule(space).stages[5]
    a, b = StepSampler(space, stage, seed=1), StepSampler(space, stage, seed=1)
    assert a.sample(7) == b.sample(7) and a.sample(7) != a.sample(8)  # what every rank and a resumed run draw
    sandwich = StepSampler(space, Stage('s', 1, 0.1, stage.unlock, subnets_per_step=4, sampling='sandwich'))
    subnets = sandwich.sample(0)
    restricted = restrict_space(space, stage.unlock)
    assert subnets[0].replace(resolution=None) == restricted.max().replace(resolution=None)
    assert subnets[1].replace(resolution=None) == restricted.min().replace(resolution=None)


def test_sandwich_min_subnet_keeps_its_own_resolution():
    """Stage.min_resolution: the min subnet of each sandwich step at the smallest resolution, the others at the step's
    drawn one; without it every subnet of the step shares the drawn resolution."""
    space = mbv3_space()
    unlock = {'kernel': 'all', 'depth': 'all', 'expand': 'all', 'resolution': 'all'}
    shared = Stage('s', 1, 0.1, unlock, subnets_per_step=4, sampling='sandwich')
    smallest = min(space.resolutions)
    drawn_larger = False
    for step in range(12):
        plain, own = StepSampler(space, shared).sample(step), StepSampler(
            space, replace(shared, min_resolution=True)).sample(step)
        assert len({s.resolution for s in plain}) == 1
        assert own[1] == restrict_space(space, unlock).min() and own[1].resolution == smallest
        assert [own[0], *own[2:]] == [plain[0], *plain[2:]]  # the others as before, at the drawn resolution
        drawn_larger |= plain[0].resolution != smallest
    assert drawn_larger  # so the min's own resolution was not the drawn one by chance
    with pytest.raises(ValueError, match='min_resolution must be true or false'):
        Stage('x', 1, 0.1, min_resolution='yes')


def test_the_min_subnet_trains_on_images_at_its_own_resolution(data, tmp_path):
    train, val, calib, _ = data
    stage = Stage('kernel', 1, 1e-2, {'kernel': 'all', 'resolution': 'all'}, subnets_per_step=2, sampling='sandwich',
                  min_resolution=True)
    supernet = tiny_supernet()
    seen = []
    # Training forwards are the ones with gradients (BN calibration and evaluation run without).
    supernet.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[-1])
                                       if torch.is_grad_enabled() else None)
    cfg = config(tmp_path)
    Trainer(supernet, Schedule((stage,)), train, val, calib, cfg, pretrained=True).run()
    assert len(seen) == 8  # 4 steps of 2 subnets
    assert seen[1::2] == [24] * 4  # the min subnet, every step at the smallest resolution
    drawn = [StepSampler(supernet.space, stage, cfg.seed).sample(step)[0].resolution for step in range(4)]
    assert seen[0::2] == drawn  # the max subnet at each step's drawn resolution


def test_the_source_check_warns_of_resolutions_the_source_does_not_know():
    lines = source_check_lines({48: 11.2, 56: 13.7, 64: 94.9}, num_classes=10)  # ConvNeXt-atto's, on test
    assert lines[0] == ('Source (the max subnet before training), validation top-1: 11.2% at 48 px, 13.7% at 56 px, '
                        '94.9% at 64 px')
    assert 'at 48 px and 56 px the source is more than 10 points below its 94.9% at 64 px' in lines[1]
    assert '--resolutions 64' in lines[1] and '--min-steps' in lines[1]  # the two ways to keep the source
    assert len(source_check_lines({160: 80.1, 192: 81.3, 224: 82.0}, num_classes=1000)) == 1  # nothing to warn of
    assert 'near chance' in source_check_lines({24: 30.0, 32: 34.0}, num_classes=3)[1]  # a new classifier


def test_a_pretrained_start_checks_its_source_once_and_trains_as_without_it(data, tmp_path):
    train, val, calib, _ = data
    schedule = Schedule((Stage('kernel', 1, 1e-2, {'kernel': 'all', 'resolution': 'all'}, subnets_per_step=2,
                               sampling='sandwich'),))
    checked = Trainer(tiny_supernet(), schedule, train, val, calib, config(tmp_path / 'checked'), pretrained=True)
    checked.run(stop_after=2)
    checked.resume()
    checked.run()
    records = [json.loads(line) for line in (tmp_path / 'checked' / 'metrics.jsonl').read_text().splitlines()]
    source = [r for r in records if r['type'] == 'source']
    assert len(source) == 1 and source[0] == checked.source_check  # once, though the run was resumed
    fresh = Trainer(tiny_supernet(), schedule, train, val, calib, config(tmp_path / 'fresh'), pretrained=True)
    assert source[0]['top1'] == {  # the max subnet before any step, measured as every validation measures it
        str(r): fresh.evaluate_subnet(fresh.supernet.space.max().replace(resolution=r))['top1'] for r in (24, 32)}
    # The same run without the check (its record already there) draws the same numbers: the same weights.
    unchecked = Trainer(tiny_supernet(), schedule, train, val, calib, config(tmp_path / 'unchecked'), pretrained=True)
    unchecked.history.append(dict(source[0]))
    unchecked.run()
    for (name, a), b in zip(checked.supernet.state_dict().items(), unchecked.supernet.state_dict().values()):
        assert torch.equal(a, b), name
    assert [(s['stage'], s['top1']) for s in checked.summaries()] == [  # the check is no stage
        (s['stage'], s['top1']) for s in unchecked.summaries()] and len(checked.summaries()) == 1
    scratch = Trainer(tiny_supernet(), schedule, train, val, calib, config(tmp_path / 'scratch'))
    scratch.run()
    assert scratch.source_check is None  # nothing to keep from scratch


def test_validation_grid_covers_corners():
    space = mbv3_space()
    grid = StepSampler(space, PRESETS['ofa'].schedule(space).stages[5]).validation_grid()
    assert len(grid) == 2 ** 3 * 2  # kernel/depth/expand min-max corners x min and max resolution
    labels = [label for label, _ in grid]
    assert 'k=max,d=max,e=max@224' in labels and 'k=min,d=min,e=min@128' in labels


# --- losses and calibration -----------------------------------------------------------------------------------------
def test_distillation_loss_values():
    torch.manual_seed(0)
    s, t = torch.randn(4, 10), torch.randn(4, 10)
    p = torch.softmax(t, -1)
    expected = -(p * torch.log_softmax(s, -1)).sum(-1).mean()
    assert torch.allclose(distillation_loss(s, t), expected)
    kl = (p * (p.log() - torch.log_softmax(s, -1))).sum(-1).mean()
    assert torch.allclose(distillation_loss(s, t, 'kl'), kl, atol=1e-6)
    s.requires_grad_(True)
    t.requires_grad_(True)
    distillation_loss(s, t).backward()
    assert t.grad is None  # the teacher is never trained through the loss
    with pytest.raises(ValueError, match="one of .*'alpha'.*got 'js'"):
        distillation_loss(s, t, 'js')
    with pytest.raises(ValueError, match="kd_kind must be one of"):
        ShrinkingConfig(kd_kind='js')


def _alpha_divergence_by_definition(student: torch.Tensor, teacher: torch.Tensor, alpha: float) -> torch.Tensor:
    q, p = torch.softmax(student, -1), torch.softmax(teacher, -1)
    if alpha == 1.:
        return (p * (p.log() - q.log())).sum(-1)  # the limit: KL(p||q)
    return (q * ((p / q) ** alpha - 1)).sum(-1) / (alpha * (alpha - 1))


def test_alpha_divergence_is_the_larger_divergence_per_sample_with_its_gradient():
    """AlphaNet's loss: per sample, max(D_-1, D_1) of teacher p and student q; where no importance weight reaches the
    clip, its gradient is exactly that of the definition."""
    torch.manual_seed(0)
    s, t = 0.3 * torch.randn(16, 10), 0.3 * torch.randn(16, 10)
    ratio = torch.softmax(t, -1) / torch.softmax(s, -1)
    assert ratio.max() < 5 and (1 / ratio).max() < 5  # close: no importance weight (p/q)^alpha reaches the clip
    low, high = _alpha_divergence_by_definition(s, t, -1.), _alpha_divergence_by_definition(s, t, 1.)
    assert (low > high).any() and (high > low).any()  # both branches are taken somewhere in the batch
    reference = s.clone().requires_grad_(True)
    expected = torch.maximum(_alpha_divergence_by_definition(reference, t, -1.),
                             _alpha_divergence_by_definition(reference, t, 1.)).mean()
    expected.backward()
    student = s.clone().requires_grad_(True)
    loss = alpha_divergence(student, t)
    loss.backward()
    assert torch.allclose(loss, expected, atol=1e-6)
    assert torch.allclose(student.grad, reference.grad, atol=1e-6)
    # The temperature and its T^2 scale, as for the other kinds.
    assert torch.allclose(distillation_loss(s, t, 'alpha', temperature=2.), 4 * alpha_divergence(s / 2, t / 2))
    # A student that matches its teacher has nothing left to learn.
    same = torch.randn(4, 10, requires_grad=True)
    loss = alpha_divergence(same, same.detach())
    loss.backward()
    assert loss.abs() < 1e-6 and same.grad.abs().max() < 1e-6
    with pytest.raises(ValueError, match='alpha_min < 0 < alpha_max <= 1'):
        alpha_divergence(s, t, alpha_min=0.5)


def test_alpha_divergence_clips_the_importance_weights_of_a_confident_teacher():
    """A teacher that rules out a class (p ~ e^-60) to which the student gives half its mass: D_-1 is the larger
    divergence, and unclipped its weight for that class, q / p, would be ~e^60; clipped at 5, the loss and its gradient
    stay finite and the gradient still pushes the student off that class."""
    student = torch.tensor([[0., 0., -30.]], requires_grad=True)  # q ~ (0.5, 0.5, 0)
    teacher = torch.tensor([[30., -30., -30.]])  # p ~ (1, 0, 0)
    loss = alpha_divergence(student, teacher)
    loss.backward()
    # D_-1 with q / p clipped at 5: (0.5 * (0.5 - 1) + 0.5 * (5 - 1)) / 2, above KL(p||q) = log 2
    assert abs(loss.item() - 0.875) < 1e-4 and loss.item() > math.log(2)
    assert torch.isfinite(student.grad).all() and student.grad.abs().max() <= 5.
    assert student.grad[0, 1] > 0 and student.grad[0, 0] < 0  # off the ruled-out class, onto the teacher's


def test_calibrate_bn_gives_exact_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Dropout(0.5))
    data = [torch.randn(5, 3, 8, 8) + 2 for _ in range(4)]
    rng_before = torch.get_rng_state()
    model.train()
    calibrate_bn(model, data, num_images=20)
    assert torch.equal(torch.get_rng_state(), rng_before)  # dropout stayed off
    assert model.training and model[1].momentum == 0.1
    feats = torch.cat([model[0](x) for x in data])
    assert torch.allclose(model[1].running_mean, feats.mean((0, 2, 3)), atol=1e-5)
    # per-batch unbiased variances, averaged, as the cumulative moving average computes them
    var = torch.stack([model[0](x).var((0, 2, 3), unbiased=True) for x in data]).mean(0)
    assert torch.allclose(model[1].running_var, var, atol=1e-4)


# --- channel sorting ------------------------------------------------------------------------------------------------
def test_band_permutation():
    imp = torch.tensor([1., 5., 3., 9., 2., 7.])
    assert band_permutation(imp, [6]).tolist() == [3, 5, 1, 2, 4, 0]
    assert band_permutation(imp, [4]).tolist() == [3, 1, 2, 0, 5, 4]


# --- the loop -------------------------------------------------------------------------------------------------------
def test_trainer_runs_logs_and_reports(data, tmp_path):
    train, val, calib, _ = data
    trainer = Trainer(tiny_supernet(), TINY, train, val, calib, config(tmp_path))
    summaries = trainer.run()
    assert [s['stage'] for s in summaries] == ['full', 'kernel', 'expand_1']
    records = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
    assert {r['type'] for r in records} == {'train', 'val', 'val_mean'}
    val_stage = {r['stage'] for r in records if r['type'] == 'val'}
    assert val_stage == {'full', 'kernel', 'expand_1'}
    assert all(0 <= r['top1'] <= 100 for r in records if r['type'] == 'val')
    state = load_checkpoint(tmp_path / 'last.pth')  # weights_only=True
    assert state['position'] == {'stage': 3, 'step': 0, 'global_step': 12, 'validate': False}
    assert state['teacher'] is not None


def test_a_run_validates_at_most_five_times_a_stage_unless_told(data, tmp_path):
    """Each validation recalibrates and evaluates every subnet of the grid: on small data, whose epochs are a few
    steps, validating after every epoch costs more than the training."""
    train, val, calib, _ = data
    twelve_epochs = Schedule((Stage('full', 12, 1e-2, {}, kd_ratio=0.),))
    epochs = {}
    for every in (None, 5):
        out = tmp_path / str(every)
        Trainer(tiny_supernet(), twelve_epochs, train, val, calib, config(out, val_every=every)).run()
        records = map(json.loads, (out / 'metrics.jsonl').read_text().splitlines())
        epochs[every] = [r['epoch'] for r in records if r['type'] == 'val_mean']
    assert epochs == {None: [3, 6, 9, 12], 5: [5, 10, 12]}  # the stage's end always
    with pytest.raises(ValueError, match='val_every must be >= 1 epoch, or None'):
        config(tmp_path, val_every=0)


def test_resume_is_bitwise_exact(data, tmp_path):
    train, val, calib, _ = data
    straight = Trainer(tiny_supernet(), TINY, train, val, calib, config(tmp_path / 'a'))
    straight.run()
    first = Trainer(tiny_supernet(), TINY, train, val, calib, config(tmp_path / 'b'))
    first.run(stop_after=6)  # mid-epoch, mid-stage
    assert load_checkpoint(tmp_path / 'b' / 'last.pth')['position']['global_step'] == 6
    second = Trainer(tiny_supernet(seed=123), TINY, train, val, calib, config(tmp_path / 'b'))
    second.resume()
    second.run()
    a, b = straight.supernet.state_dict(), second.supernet.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    assert all(torch.equal(x, y) for x, y in zip(straight.teacher.state_dict().values(),
                                                  second.teacher.state_dict().values()))


CARRIED = Schedule(tuple(s if not s.unlock else replace(s, carry_optimizer=True, warmup_epochs=0.5)
                         for s in TINY.stages))


def _stop_at_stage_boundary(trainer: Trainer, steps: int) -> None:
    """Run ``steps`` steps (a stage's end), then write the checkpoint run() writes when it enters the next stage: what
    a process killed at the transition leaves behind."""
    trainer.run(stop_after=steps)
    trainer.position = _Position(trainer.position.stage + 1, 0, trainer.position.global_step)
    trainer._scheduler = None
    trainer.save()


@pytest.mark.parametrize('stop,boundary', [(4, True), (8, True), (10, False)],
                         ids=['kernel-start', 'expand-start', 'mid-expand'])
def test_carried_optimizer_resumes_bitwise(data, tmp_path, stop, boundary):
    """Optimizer state carried across stages survives a checkpoint at, or after, a stage boundary."""
    train, val, calib, _ = data
    straight = Trainer(tiny_supernet(), CARRIED, train, val, calib, config(tmp_path / 'a'))
    straight.run()
    first = Trainer(tiny_supernet(), CARRIED, train, val, calib, config(tmp_path / 'b'))
    _stop_at_stage_boundary(first, stop) if boundary else first.run(stop_after=stop)
    assert load_checkpoint(tmp_path / 'b' / 'last.pth')['position']['step'] == (0 if boundary else 2)
    second = Trainer(tiny_supernet(seed=123), CARRIED, train, val, calib, config(tmp_path / 'b'))
    second.resume()
    second.run()
    a, b = straight.supernet.state_dict(), second.supernet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    fresh_each_stage = Schedule(tuple(replace(s, carry_optimizer=False) for s in CARRIED.stages))
    fresh = Trainer(tiny_supernet(), fresh_each_stage, train, val, calib, config(tmp_path / 'c'))
    fresh.run()
    c = fresh.supernet.state_dict()
    assert not all(torch.equal(a[k], c[k]) for k in a)  # carrying the state changed the training


@pytest.mark.parametrize('resumed', [False, True], ids=['in-process', 'resumed'])
def test_carried_optimizer_state_skips_weights_that_channel_sorting_moved(data, tmp_path, resumed):
    train, val, calib, _ = data
    trainer = Trainer(tiny_supernet(), CARRIED, train, val, calib, config(tmp_path))
    _stop_at_stage_boundary(trainer, 8)  # the end of the kernel stage: expand_1 sorts channels on entry
    previous = trainer._optimizer.state_dict()['state']
    if resumed:
        trainer = Trainer(tiny_supernet(seed=123), CARRIED, train, val, calib, config(tmp_path))
        trainer.resume()
    before = {n: p.detach().clone() for n, p in trainer.supernet.named_parameters()}
    trainer.prepare_stage(trainer.schedule.stages[2])
    named = dict(trainer.supernet.named_parameters())
    moved = {n for n, p in named.items() if not torch.equal(p, before[n])}
    assert moved, 'sorting permuted no channel'
    optimizer = trainer._optimizer
    index = {id(p): i for g, saved in zip(optimizer.param_groups, optimizer.state_dict()['param_groups'])
             for p, i in zip(g['params'], saved['params'])}
    state = optimizer.state_dict()['state']
    assert any(index[id(p)] in state for p in named.values())  # the rest is carried
    for n, p in named.items():
        i = index[id(p)]
        assert (i in state) == (i in previous and n not in moved), n


ADDED_FAST = Schedule(tuple(replace(s, added_lr_scale=10.) if s.unlock else s for s in CARRIED.stages))


@pytest.mark.parametrize('resumed', [False, True], ids=['in-process', 'resumed'])
def test_what_conversion_adds_trains_at_its_own_learning_rate_and_carries_its_state(data, tmp_path, resumed):
    """Stage.added_lr_scale: the kernel transforms step at 10x the shared weights' lr, and the optimizer state
    carried from a stage that grouped the parameters otherwise (the full stage, at 1x) follows each parameter."""
    train, val, calib, _ = data
    trainer = Trainer(tiny_supernet(), ADDED_FAST, train, val, calib, config(tmp_path))
    _stop_at_stage_boundary(trainer, 4)  # the end of the full stage
    assert len(trainer._optimizer.param_groups) == 2  # timm's groups: with and without weight decay
    carried = {n: trainer._optimizer.state[p]['momentum_buffer'].clone()
               for n, p in trainer.supernet.named_parameters() if p in trainer._optimizer.state}
    if resumed:
        trainer = Trainer(tiny_supernet(seed=123), ADDED_FAST, train, val, calib, config(tmp_path))
        trainer.resume()
    trainer.prepare_stage(trainer.schedule.stages[1])
    added = set(trainer.supernet.added_state())
    assert added and all('kernel_transform' in n for n in added)
    named = dict(trainer.supernet.named_parameters())
    optimizer = trainer._optimizer
    trainer._scheduler.step_update(2)
    for group in optimizer.param_groups:
        names = {n for n, p in named.items() if any(p is q for q in group['params'])}
        assert names <= added if 'lr_scale' in group else not names & added
        assert group.get('lr_scale', 1.) in (1., 10.)
    lrs = {group.get('lr_scale', 1.): group['lr'] for group in optimizer.param_groups}
    assert lrs[10.] == pytest.approx(10 * lrs[1.]) and lrs[1.] > 0
    assert carried and {n for n, p in named.items() if p in optimizer.state} == set(carried)
    for n, buffer in carried.items():
        assert torch.equal(optimizer.state[named[n]]['momentum_buffer'], buffer), n
    trainer.run()  # and the run goes on to its end from there


def test_resume_refuses_another_schedule(data, tmp_path):
    train, val, calib, _ = data
    Trainer(tiny_supernet(), TINY, train, val, calib, config(tmp_path)).run(stop_after=2)
    other = Trainer(tiny_supernet(), TINY.scaled(2.0), train, val, calib, config(tmp_path))
    with pytest.raises(ValueError, match='another schedule.*--schedule .*last_schedule.yaml'):
        other.resume()
    # the schedule it names is the run's own: with it the run resumes (a preset that changed since cannot strand it)
    kept = Trainer(tiny_supernet(), load_schedule(str(tmp_path / 'last_schedule.yaml')), train, val, calib,
                   config(tmp_path))
    kept.resume()
    assert kept.position.global_step == 2
    # Before Stage.floor_weight a floor raised the epoch scale; a run checkpointed so resumes under today's fit.
    old = Trainer(tiny_supernet(), TINY.scaled(2.0), train, val, calib, config(tmp_path / 'old'))
    old.run(stop_after=2)
    floor = TINY.total_steps(old.steps_per_epoch) * 2
    today = Trainer(tiny_supernet(), replace(TINY, min_steps=floor), train, val, calib, config(tmp_path / 'old'))
    assert today.schedule.epochs_scale == 1.0 and today.schedule != old.schedule  # the floor lengthened the stages
    today.resume()
    assert today.position.global_step == 2
    with pytest.raises(ValueError, match='No checkpoint'):
        Trainer(tiny_supernet(), TINY, train, val, calib, config(tmp_path / 'empty')).resume()


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(data, tmp_path):
    train, val, calib, _ = data
    Trainer(tiny_supernet(), TINY, train, val, calib, config(tmp_path)).run(stop_after=5)
    good = (tmp_path / 'last.pth').read_bytes()
    trainer = Trainer(tiny_supernet(), TINY, train, val, calib, config(tmp_path))
    trainer.resume()
    with torch.no_grad():
        trainer.supernet.classifier.bias.fill_(float('nan'))
    with pytest.raises(NonFiniteLossError, match=r"stage 'kernel' at step 1 .*for subnet \{.*'kernels'"):
        trainer.run()
    assert (tmp_path / 'last.pth').read_bytes() == good


def test_sandwich_and_amp_and_ema(data, tmp_path):
    train, val, calib, _ = data
    sched = Schedule((Stage('kernel', 1, 1e-2, {'kernel': 'all', 'depth': 'all'}, subnets_per_step=3,
                            sampling='sandwich'),))
    trainer = Trainer(tiny_supernet(), sched, train, val, calib,
                      config(tmp_path, amp='bf16', ema_decay=0.9, clip_grad=1.0, mixup=0.2), pretrained=True)
    trainer.run()
    assert trainer.teacher is None  # in-place distillation from the max subnet, no separate teacher
    assert load_checkpoint(tmp_path / 'last.pth')['ema'] is not None


# --- distributed ----------------------------------------------------------------------------------------------------
def _ddp_worker(rank: int, world: int, port: int, root: str, out: str) -> None:
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.distributed.init_process_group('gloo', rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        train, val, calib, _ = build_datasets(DataConfig(root, image_size=RES, scale=(0.5, 1.0)), seed=0)
        cfg = TrainConfig(output=out, batch_size=4, workers=0, calib_images=8, progress=False)
        trainer = Trainer(tiny_supernet(), TINY, train, val, calib, cfg)
        trainer.run()
        torch.save(trainer.supernet.state_dict(), os.path.join(out, f'rank{rank}.pt'))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_ranks_hold_identical_weights(data, tmp_path):
    root = data[0].dataset.reader.root if hasattr(data[0].dataset, 'reader') else None
    root = os.path.dirname(root.rstrip('/')) if root else None
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, root, str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / 'rank0.pt', weights_only=True)
    r1 = torch.load(tmp_path / 'rank1.pt', weights_only=True)
    params = dict(tiny_supernet().named_parameters())
    for k in params:  # BN running statistics are per rank in DDP (rank 0 writes the checkpoint); weights are shared
        assert torch.equal(r0[k], r1[k]), k
    initial = tiny_supernet().state_dict()
    assert any(not torch.equal(r0[k], initial[k]) for k in params)  # it trained
