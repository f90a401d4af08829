"""NNI plugin: the OFA strategy in NasExperiment, search over a trained supernet, label round trips, shims."""
import pytest

pytest.importorskip('nni')

import timm  # noqa: E402
import torch  # noqa: E402

import ofa_timm  # noqa: E402,F401  registers the models
from ofa_timm import Subnet  # noqa: E402
from ofa_timm.plugins.nni import (  # noqa: E402
    OFAProgressiveShrinking, SharedSubnet, SupernetSpace, fresh_trainer, quiet_nni_import, run_experiment)
from ofa_timm.plugins.nni.search import flops_cost, save_top_subnets, search_config, subnet_evaluator  # noqa: E402
from ofa_timm.training import PRESETS, Schedule, Stage  # noqa: E402

with quiet_nni_import():
    from nni.nas.evaluator.pytorch import Classification, DataLoader  # noqa: E402
    from nni.nas.experiment import NasExperiment, NasExperimentConfig  # noqa: E402
    from nni.nas.strategy import TPE, Random, RegularizedEvolution  # noqa: E402

RES = 32
NAME = 'ofa_mobilenetv3_small_100'


def supernet():
    torch.manual_seed(0)
    return timm.create_model(NAME, num_classes=3, resolutions=(24, RES))


@pytest.fixture(scope='module')
def data():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(24, 3, RES, RES, generator=g)
    labels = torch.randint(0, 3, (24,), generator=g)
    return torch.utils.data.TensorDataset(images, labels)


def classification(data, epochs, tmp_path):
    return Classification(
        train_dataloaders=DataLoader(data, batch_size=8, shuffle=True), val_dataloaders=DataLoader(data, batch_size=12),
        max_epochs=epochs, num_classes=3, learning_rate=1e-3, export_onnx=False, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=str(tmp_path / 'pl'))


SCHEDULE = Schedule((
    Stage('full', 1, 1e-3, {}, kd_ratio=0.),
    Stage('kernel', 1, 1e-3, {'kernel': 'all', 'resolution': 'all'}),
    Stage('depth_1', 1, 1e-3, {'kernel': 'all', 'depth': 2, 'resolution': 'all'}, subnets_per_step=2),
    Stage('expand_1', 1, 1e-3, {'kernel': 'all', 'depth': 'all', 'expand': 2, 'resolution': 'all'},
          subnets_per_step=2),
))


def test_labels_round_trip_to_subnet():
    space = SupernetSpace(supernet())
    assert 'stage1.depth' in space.labels and 'stage1.block0.kernel' in space.labels
    assert 'resolution' in space.labels and 'stage0.depth' not in space.labels  # single-choice: not exposed
    for seed in range(5):
        subnet = space.supernet.space.sample(seed)
        sample = space.to_sample(subnet)
        assert set(sample) == set(space.labels)
        assert space.to_subnet(sample) == subnet
    nni_sample = {label: m.random() for label, m in space.simplify().items()}
    frozen = space.freeze(nni_sample)
    assert isinstance(frozen, SharedSubnet) and frozen.supernet is space.supernet  # weight sharing, no copy
    assert frozen.eval()(torch.randn(1, 3, RES, RES)).shape == (1, 3)
    with pytest.raises(ValueError, match="Unknown labels \\['stage9.depth'\\]"):
        space.to_subnet({'stage9.depth': 2})
    with pytest.raises(ValueError, match='is not allowed'):
        space.to_subnet({'stage1.depth': 7})


def test_strategy_builds_the_schedule_as_ofa_timm_train_does():
    """'auto' with a pretrained start is the pretrained recipe (it once ran the from-scratch one), and the recipe's
    floor in optimizer steps applies at the evaluator's steps per epoch."""
    from ofa_timm.training import PRESETS, applicable_stages, build_schedule
    space = SupernetSpace(supernet())
    strategy = OFAProgressiveShrinking('auto', pretrained=True, lr_scale=0.5)
    expected = applicable_stages(build_schedule('fast', space.supernet.space, pretrained=True, lr_scale=0.5),
                                 space.supernet.space, pretrained=True)
    assert strategy.stages_for(space) == expected and 'full' not in [s.name for s in expected.stages]
    fitted = strategy.stages_for(space, steps_per_epoch=3)
    assert fitted.total_steps(3) >= PRESETS['fast'].min_steps
    assert strategy.total_epochs(space, steps_per_epoch=3) > strategy.total_epochs(space)
    scratch = OFAProgressiveShrinking('auto').stages_for(space)
    assert scratch.stages[0].name == 'full' and scratch.min_steps == PRESETS['scratch'].min_steps


def test_strategy_refuses_an_evaluator_too_short_for_the_floor(data, tmp_path):
    space = SupernetSpace(supernet())
    strategy = OFAProgressiveShrinking('auto', pretrained=True)
    strategy.mutate_model(space)
    floor = PRESETS['fast'].min_steps
    with pytest.raises(ValueError, match=rf'floor of {floor} optimizer steps at 3 per epoch\): set max_epochs='):
        strategy.mutate_evaluator(classification(data, 5, tmp_path))


@pytest.mark.slow
def test_ofa_strategy_in_nas_experiment(data, tmp_path):
    net = supernet()
    space = SupernetSpace(net)
    strategy = OFAProgressiveShrinking(SCHEDULE, calib_images=8)
    assert strategy.total_epochs(space) == 4
    evaluator = classification(data, strategy.total_epochs(space), tmp_path)
    exp = run_experiment(NasExperiment(space, evaluator, strategy, NasExperimentConfig('sequential', 'raw')),
                         tmp_path / 'exp')
    module = strategy.oneshot_module
    by_stage = {}
    for stage, subnet in module.sampled:
        by_stage.setdefault(stage, []).append(subnet)
    assert list(by_stage) == ['full', 'kernel', 'depth_1', 'expand_1']
    mx = net.space.max()
    for subnet in by_stage['full']:
        assert subnet.replace(resolution=None) == mx.replace(resolution=None) and subnet.resolution == RES
    assert all(s.depths == mx.depths and s.expands == mx.expands for s in by_stage['kernel'])
    assert any(s.kernels != mx.kernels for s in by_stage['kernel'])
    assert all(s.expands == mx.expands for s in by_stage['depth_1'])
    assert any(s.depths != mx.depths for s in by_stage['depth_1'])
    assert len(by_stage['expand_1']) == 2 * 3  # 2 subnets per step, 3 steps
    assert module.last_validation and all(0 <= r['top1'] <= 100 for r in module.last_validation)
    # export_top_models gives usable subnets
    sample = exp.export_top_models(formatter='dict')[0]
    best = space.to_subnet(sample)
    assert best in net.space
    # Weights trained through NNI load into timm's registry
    path = tmp_path / 'nni_supernet.pth'
    torch.save({'state_dict': net.state_dict()}, path)
    again = timm.create_model(NAME, num_classes=3, resolutions=(24, RES), checkpoint_path=str(path)).eval()
    x = torch.randn(2, 3, RES, RES)
    net.eval().set_active(None)
    with torch.no_grad():
        assert torch.equal(again(x), net(x))
    # The strategy's state round-trips for NNI experiment checkpoints
    state = strategy.state_dict()
    assert state['schedule'] == SCHEDULE.to_dict()
    other = OFAProgressiveShrinking('fast')
    other.mutate_model(space)
    with pytest.raises(ValueError, match='another progressive-shrinking schedule'):
        other.load_state_dict(state)


def test_strategy_trains_the_min_subnet_at_its_own_resolution(data, tmp_path):
    """Stage.min_resolution under NNI: the evaluator's training step sees the min subnet's batch at the smallest
    resolution, as ``ofa-timm train`` feeds it."""
    net = supernet()
    stage = Stage('kernel', 1, 1e-3, {'kernel': 'all', 'resolution': 'all'}, subnets_per_step=2,
                  sampling='sandwich', min_resolution=True)
    strategy = OFAProgressiveShrinking(Schedule((stage,)), calib_images=8)
    sizes = []
    net.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[-1])
                                  if torch.is_grad_enabled() else None)
    run_experiment(NasExperiment(SupernetSpace(net), classification(data, 1, tmp_path), strategy,
                                 NasExperimentConfig('sequential', 'raw')), tmp_path / 'exp')
    sampled = strategy.oneshot_module.sampled
    assert len(sampled) == 2 * 3 and len(sizes) == len(sampled)  # 3 steps of 2 subnets
    assert [s.resolution for _, s in sampled[1::2]] == [24] * 3 and sizes[1::2] == [24] * 3  # the min subnet
    assert sizes[0::2] == [s.resolution for _, s in sampled[0::2]]  # the max subnet at each step's drawn resolution


def test_a_pretrained_start_checks_its_source_under_nni_as_ofa_timm_train_does(data, tmp_path, capsys):
    stage = Stage('kernel', 1, 1e-3, {'kernel': 'all', 'resolution': 'all'}, subnets_per_step=2, sampling='sandwich')
    strategy = OFAProgressiveShrinking(Schedule((stage,)), pretrained=True, calib_images=8)
    run_experiment(NasExperiment(SupernetSpace(supernet()), classification(data, 1, tmp_path), strategy,
                                 NasExperimentConfig('sequential', 'raw')), tmp_path / 'exp')
    checked = strategy.oneshot_module.source_check
    assert set(checked) == {24, 32} and all(0 <= top1 <= 100 for top1 in checked.values())
    out = capsys.readouterr().out
    assert (f'Source (the max subnet before training), validation top-1: {checked[24]:.1f}% at 24 px, '
            f'{checked[32]:.1f}% at 32 px') in out
    scratch = OFAProgressiveShrinking(Schedule((stage,)), calib_images=8)
    run_experiment(NasExperiment(SupernetSpace(supernet()), classification(data, 1, tmp_path), scratch,
                                 NasExperimentConfig('sequential', 'raw')), tmp_path / 'exp2')
    assert scratch.oneshot_module.source_check is None  # nothing to keep from scratch


def test_strategy_checks_epochs(data, tmp_path):
    space = SupernetSpace(supernet())
    strategy = OFAProgressiveShrinking(SCHEDULE)
    with pytest.raises(ValueError, match='needs 4'):
        run_experiment(NasExperiment(space, classification(data, 2, tmp_path), strategy,
                                     NasExperimentConfig('sequential', 'raw')), tmp_path / 'exp')


@pytest.mark.slow
@pytest.mark.parametrize('strategy', ['evolution', 'random', 'tpe'])
def test_multi_trial_search_respects_the_budget(data, tmp_path, strategy):
    net = supernet().eval()
    cost = flops_cost(net)
    budget = (cost(net.space.min()) + cost(net.space.max())) / 2
    loader = torch.utils.data.DataLoader(data, batch_size=12)
    if strategy == 'tpe':  # TPE cannot take constraints in the space: the evaluator skips infeasible subnets
        space = SupernetSpace(net)
        evaluator = subnet_evaluator(loader, loader, calib_images=12, cost=cost, max_cost=budget)
        algo = TPE(optimize_mode='maximize', seed=0)
    else:
        space = SupernetSpace(net, cost=cost, max_cost=budget)
        evaluator = subnet_evaluator(loader, loader, calib_images=12)
        algo = RegularizedEvolution(population_size=3, sample_size=2, seed=0) if strategy == 'evolution' \
            else Random(seed=0)
    exp = run_experiment(NasExperiment(space, evaluator, algo, search_config(6)), tmp_path / 'exp')
    paths = save_top_subnets(exp, space, tmp_path / 'results', top_k=2)
    assert len(paths) == 2
    for path in paths:
        subnet = Subnet.from_json(path)
        assert cost(subnet) <= budget
        model = timm.create_model(NAME, num_classes=3, resolutions=(24, RES), subnet=str(path))
        assert type(model).__name__ == 'MobileNetV3'
    if strategy != 'tpe':  # every evaluated subnet is within the budget
        for model in exp.strategy.list_models(sort=False):
            assert cost(space.to_subnet(model.sample)) <= budget


def test_nni_files_stay_out_of_home(data, tmp_path, monkeypatch):
    home = tmp_path / 'home'
    monkeypatch.setenv('HOME', str(home))
    loader = torch.utils.data.DataLoader(data, batch_size=12)
    space = SupernetSpace(supernet().eval())
    run_experiment(NasExperiment(space, subnet_evaluator(loader, loader, 12), Random(seed=0), search_config(1)),
                   tmp_path / 'exp')
    assert (tmp_path / 'exp' / '.experiment').is_file()
    assert not (home / 'nni-experiments').exists()


@pytest.mark.slow
def test_fresh_trainer_shim_lets_classification_evaluate_several_models(data, tmp_path):
    space = SupernetSpace(supernet())
    evaluator = fresh_trainer(classification(data, 1, tmp_path))
    exp = run_experiment(NasExperiment(space, evaluator, Random(seed=0), search_config(2)), tmp_path / 'exp')
    metrics = [m.metric for m in exp.strategy.list_models(sort=False)]
    assert len(metrics) == 2 and all(m is not None for m in metrics)
