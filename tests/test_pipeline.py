"""The one-command pipeline (``ofa_timm.run`` / ``ofa-timm run``): artefacts, honest splits, resumes, reruns of only
what changed, finalists chosen by measurement, one writer per folder, and sharding under torchrun."""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch

from ofa_timm.example_data import make_shapes_dataset
from ofa_timm.pipeline import STEPS, PipelineInterrupted, RunConfig, carve_test_split, run
from ofa_timm.pipeline import core as pipeline_core
from ofa_timm.pipeline.report import report_markdown
from ofa_timm.training import PRESETS, Schedule, Stage, TrainConfig, TrainingInterrupted

MODEL = 'ofa_mobilenetv3_small_100'
ALL = {'kernel': 'all', 'depth': 'all', 'expand': 'all', 'resolution': 'all'}


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp('pipe')
    shapes = make_shapes_dataset(root / 'data', num_classes=3, train_per_class=12, val_per_class=8, image_size=32)
    schedule = Schedule((Stage('full', 2, 0.05), Stage('shrink', 2, 0.01, ALL, subnets_per_step=2,
                                                        sampling='sandwich')))
    schedule.to_yaml(root / 'schedule.yaml')
    return root, shapes


def config(data, out, **kwargs) -> RunConfig:
    root, shapes = data
    base = dict(model=MODEL, data_dir=str(shapes), budgets='40%flops,70%flops', out=str(out), latency=None,
                resolutions=(24, 32), image_size=32, schedule=str(root / 'schedule.yaml'), min_steps=0, subnets=12,
                finalists=3, formats=('timm',), progress=False,
                train=TrainConfig(batch_size=9, workers=0, calib_images=18, val_every=100, log_every=1))
    return RunConfig(**{**base, **kwargs})


def _current_step() -> str:
    """The pipeline step on the call stack ('' outside one)."""
    import inspect
    for frame in inspect.stack():
        if frame.function.startswith('_step_') and frame.function != '_step_':
            return frame.function[len('_step_'):]
    return ''


@pytest.fixture(scope='module')
def base(data, tmp_path_factory):
    """One uninterrupted run, recording which split each step evaluated on and the splits themselves."""
    from ofa_timm.training import evaluate
    out = tmp_path_factory.mktemp('base') / 'run'
    seen, captured = [], {}
    real_init, real_prepare = evaluate.SubnetEvaluator.__init__, pipeline_core.Pipeline._prepare

    def spy(self, calib_set, eval_set, *args, **kwargs):
        seen.append((_current_step(), eval_set))
        real_init(self, calib_set, eval_set, *args, **kwargs)

    def prepare(self):
        real_prepare(self)
        captured['splits'] = self.splits
    with pytest.MonkeyPatch.context() as m:
        m.setattr(evaluate.SubnetEvaluator, '__init__', spy)
        m.setattr(pipeline_core.Pipeline, '_prepare', prepare)
        result = run(config(data, out))
    return out, result, seen, captured['splits']


def finished(out: Path) -> dict:
    return {s: json.loads((out / 'steps' / f'{s}.json').read_text()).get('finished') for s in STEPS
            if (out / 'steps' / f'{s}.json').is_file()}


def outcome(result) -> list:
    return [(b.label, b.subnet, b.val_top1, b.test_top1) for b in result.budgets]


@pytest.mark.slow
def test_every_artefact_is_written_and_loads(base):
    out, result, _, _ = base
    for rel in ('train/supernet.safetensors', 'train/last.pth', 'accuracy/accuracy.jsonl', 'predictor.safetensors',
                'search.json', 'finalists/finalists.json', 'results.json', 'report.md', 'pareto.png'):
        assert (out / rel).is_file(), rel
    assert [b.label for b in result.budgets] == ['flops_40pct', 'flops_70pct']
    report = result.report.read_text()
    assert 'held-out' in report and 'Spearman' in report and 'test top-1' in report and 'pareto.png' in report
    assert '--hflip 0 turns them off' in report  # flips, which digits and text must not have, are named
    for b in result.budgets:
        assert b.costs['flops'] <= b.limits['flops'] and 0 <= b.test_top1 <= 100
        assert b.random_best is not None and 'test_top1' in b.random_best
        folder = out / 'export' / b.label
        model = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()  # what b.load says
        assert f'local-dir:{folder}' in b.load
        x = torch.randn(2, 3, b.subnet.resolution, b.subnet.resolution)
        assert model(x).shape == (2, 3)
    search = json.loads((out / 'search.json').read_text())
    assert all(len(s['candidates']) == 3 for s in search)  # the finalists: distinct candidates
    assert all(len({json.dumps(c['subnet'], sort_keys=True) for c in s['candidates']}) == 3 for s in search)


def test_the_augmentation_is_named_with_the_flags_that_change_it(data, tmp_path):
    plain = config(data, tmp_path).augmentation()
    assert '--hflip 0' in plain and "ImageNet's; --scale 0.6 1" in plain and 'batch 9' in plain
    tuned = config(data, tmp_path, hflip=0., scale=(0.6, 1.0)).augmentation()
    assert tuned == 'random-resized crops of 60%-100% of each image, no flips, batch 9'


def test_the_report_sets_the_teacher_beside_the_winners_with_what_to_try(data, tmp_path):
    budget = dict(label='flops_50pct', limits={'flops': 1e6}, subnet={}, predicted_top1=50, val_top1=61.5,
                  test_top1=60, test_top5=90, costs={'flops': 1e6, 'params': 1e5}, random_best=None, files=[], load='')
    info = dict(model='m', data=dict(train=1, val=1, test=1, classes=2), test_source='t',
                accuracy=dict(n=10, top1_min=1, top1_max=2), predictor=dict(n_train=8, n_val=2, rmse=1, spearman=0.5),
                budgets=[budget, dict(budget, label='flops_30pct', val_top1=58.0)],
                train=dict(steps=10, stages=[dict(stage='full', top1=70.0, min_top1=70.0, max_top1=72.5)]),
                what_to_try=config(data, tmp_path).what_to_try())
    text = report_markdown(info)
    assert 'end of the full stage the best validated subnet' in text
    assert 'had 72.5% validation top-1; the winners have 58.0-61.5%' in text
    assert '`--hflip 0`' in text and '`--scale 0.6 1`' in text and '`--epochs-scale 2`' in text
    tuned = config(data, tmp_path, hflip=0., scale=(0.6, 1.0)).what_to_try()
    assert not any('--hflip' in t or '--scale' in t for t in tuned)
    assert 'Teacher' not in report_markdown(dict(info, train={}))  # a given checkpoint: no stage figures


def test_test_split_is_carved_stratified_disjoint_and_fixed():
    targets = [c for c in range(4) for _ in range(10)] + [4]
    val, test = carve_test_split(targets, 0.3, seed=0)
    assert not set(val) & set(test) and sorted(val + test) == list(range(len(targets)))
    assert [sum(targets[i] == c for i in test) for c in range(5)] == [3, 3, 3, 3, 0]
    assert carve_test_split(targets, 0.3, seed=0) == (val, test)
    assert carve_test_split(targets, 0.3, seed=1) != (val, test)
    with pytest.raises(ValueError, match='test fraction'):
        carve_test_split(targets, 1.0)


@pytest.mark.slow
def test_the_test_split_is_read_by_the_report_alone(base):
    _, _, seen, splits = base
    assert not set(splits.val.indices) & set(splits.test.indices)
    assert {step for step, s in seen if s is splits.test} == {'report'}
    assert {step for step, s in seen if s is splits.val} == {'train', 'accuracy', 'finalists', 'export'}


@pytest.mark.slow
def test_a_rerun_skips_done_steps_and_new_budgets_rerun_only_what_depends_on_them(data, base, tmp_path, capsys):
    out, result, _, _ = base
    copy = tmp_path / 'run'
    shutil.copytree(out, copy)
    before = finished(copy)
    again = run(config(data, copy))
    assert outcome(again) == outcome(result) and finished(copy) == before
    changed = run(config(data, copy, budgets='40%flops,55%flops'))
    after = finished(copy)
    rerun = {s for s in STEPS if after.get(s) != before.get(s)}
    assert rerun == {'search', 'finalists', 'export', 'report'}
    assert [b.label for b in changed.budgets] == ['flops_40pct', 'flops_55pct']


def _interrupt_at(monkeypatch, target, attribute, calls: int) -> None:
    """SIGINT this process on the ``calls``-th call of ``target.attribute`` (the real signal path)."""
    real = getattr(target, attribute)
    count = [0]

    def wrapper(*args, **kwargs):
        count[0] += 1
        if count[0] == calls:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)
    monkeypatch.setattr(target, attribute, wrapper)


# (step, where to send SIGINT: module, attribute, on which call once the step is under way)
INTERRUPTS = [
    ('train', 'ofa_timm.training.trainer', 'Trainer.train_step', 3),
    ('accuracy', 'ofa_timm.training.evaluate', 'SubnetEvaluator.__call__', 5),
    ('predictor', 'ofa_timm.search', 'fit_predictor', 1),
    ('search', 'ofa_timm.search', 'specialize', 1),
    ('finalists', 'ofa_timm.training.evaluate', 'SubnetEvaluator.__call__', 2),
    ('export', 'ofa_timm.search.export', 'export_subnet', 2),
    ('report', 'ofa_timm.training.evaluate', 'SubnetEvaluator.__call__', 2),
]


@pytest.mark.slow
def test_an_interrupt_in_each_step_then_a_rerun_continues(data, base, tmp_path, monkeypatch):
    """SIGINT in each step in turn (the real signal path), each time followed by a rerun of the same command, which
    continues the step; the result is the uninterrupted run's."""
    import importlib
    out, result, _, _ = base
    copy = tmp_path / 'run'
    for step, module, attribute, calls in INTERRUPTS:
        owner = importlib.import_module(module)
        *path, name = attribute.split('.')
        for part in path:
            owner = getattr(owner, part)
        with monkeypatch.context() as m:
            real_step = getattr(pipeline_core.Pipeline, f'_step_{step}')

            def armed(self, index, real_step=real_step, owner=owner, name=name, calls=calls, m=m):
                _interrupt_at(m, owner, name, calls)
                return real_step(self, index)
            m.setattr(pipeline_core.Pipeline, f'_step_{step}', armed)
            with pytest.raises((PipelineInterrupted, TrainingInterrupted)):
                run(config(data, copy))
        record = json.loads((copy / 'steps' / f'{step}.json').read_text())
        assert not record['complete'], step
        if step == 'accuracy':  # what it measured before the signal is kept and not measured again
            shard = copy / 'accuracy' / 'evaluated' / 'evaluated.rank0.jsonl'
            assert 1 < len(shard.read_text().splitlines()) < 13
        if step == 'train':
            assert (copy / 'train' / 'last.pth').is_file()
    resumed = run(config(data, copy))
    assert outcome(resumed) == outcome(result)


@pytest.mark.slow
def test_finalists_pick_the_best_measured_candidate_when_the_predictor_ranks_wrongly(data, base, tmp_path,
                                                                                      monkeypatch):
    from ofa_timm.search import AccuracyPredictor
    out = base[0]
    shutil.copytree(out, tmp_path / 'run')
    real = AccuracyPredictor.predict
    monkeypatch.setattr(AccuracyPredictor, 'predict', lambda self, codes: -real(self, codes))  # best ranked worst
    result = run(config(data, tmp_path / 'run', finalists=4))  # reruns search and what follows
    finalists = json.loads((tmp_path / 'run' / 'finalists' / 'finalists.json').read_text())
    for b, r in zip(finalists, result.budgets):
        best = max(c['val_top1'] for c in b['candidates'])
        assert r.val_top1 == best == b['winner']['val_top1']
        tied = [c for c in b['candidates'] if c['val_top1'] == best]
        assert b['winner']['predicted'] == max(c['predicted'] for c in tied)


@pytest.mark.slow
def test_pretrained_start_end_to_end(data, tmp_path):
    torch.manual_seed(0)
    source = timm.create_model('mobilenetv3_small_100', num_classes=3)
    path = tmp_path / 'source.pth'
    torch.save(source.state_dict(), path)
    result = run(config(data, tmp_path / 'run', pretrained_file=str(path), schedule='auto', epochs_scale=0.02,
                        lr_scale=0.5, sampling='uniform'))
    train = json.loads((tmp_path / 'run' / 'steps' / 'train.json').read_text())
    fast = PRESETS['fast'].schedule(timm.create_model(MODEL, resolutions=(24, 32)).space)
    # 'auto' picked the pretrained recipe, and lr_scale and sampling apply to every stage
    assert train['inputs']['schedule']['stages'] == [
        dict(s, lr=s['lr'] * 0.5, sampling='uniform') for s in fast.to_dict()['stages']]
    assert 'full' not in [s['stage'] for s in train['summary']['stages']]  # a pretrained start skips the full stage
    assert len(result.budgets) == 2
    # The source, checked before training, stands beside the max subnet at the end in the report.
    assert set(train['summary']['source']) == {'24', '32'}
    report = (tmp_path / 'run' / 'report.md').read_text()
    assert 'Source: before training, the max subnet (the source model) had validation top-1 ' in report


@pytest.mark.slow
def test_one_writer_per_folder(data, tmp_path):
    """A second process writing into a folder a live run holds gets one line naming it and exits 2."""
    out = tmp_path / 'run'
    script = textwrap.dedent(f'''
        import sys, time
        from ofa_timm._lock import folder_lock
        with folder_lock({str(out)!r}, command='ofa-timm run (test holder)'):
            print('held', flush=True)
            time.sleep(60)
    ''')
    holder = subprocess.Popen([sys.executable, '-c', script], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'held'
        root, shapes = data
        cmd = [sys.executable, '-m', 'ofa_timm', 'run', '--model', MODEL, '--data-dir', str(shapes), '--budgets',
               '50%flops', '--latency', 'none', '--out', str(out)]
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2
        assert len(second.stderr.strip().splitlines()) == 1
        assert f'process {holder.pid}' in second.stderr and 'ofa-timm run (test holder)' in second.stderr
    finally:
        holder.kill()
        holder.wait()
    # the OS released the lock with the process: the folder is free again
    from ofa_timm._lock import folder_lock
    with folder_lock(out):
        pass


SHARD = '''
import json, os, sys
import torch
import torch.distributed as dist
torch.set_num_threads(1)
if int(os.environ.get('WORLD_SIZE', '1')) > 1:
    dist.init_process_group('gloo')
from ofa_timm.pipeline import RunConfig, run
from ofa_timm.training import TrainConfig
cfg = json.loads(sys.argv[1])
run(RunConfig(**cfg, train=TrainConfig(batch_size=9, workers=0, calib_images=18)), until='accuracy')
'''


@pytest.mark.slow
def test_the_accuracy_dataset_sharded_over_two_processes_equals_one_process(data, base, tmp_path):
    out = base[0]
    root, shapes = data
    cfg = dict(model=MODEL, data_dir=str(shapes), budgets='50%flops', latency=None,
               checkpoint=str(out / 'train' / 'supernet.safetensors'), image_size=32, subnets=12, progress=False)
    script = tmp_path / 'shard.py'
    script.write_text(SHARD)
    env = dict(os.environ, OMP_NUM_THREADS='1')
    one = subprocess.run([sys.executable, str(script), json.dumps(dict(cfg, out=str(tmp_path / 'one')))], env=env,
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr
    port = str(29500 + os.getpid() % 1000)
    two = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', port,
                          str(script), json.dumps(dict(cfg, out=str(tmp_path / 'two')))],
                         env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]

    def rows(folder):
        lines = (folder / 'accuracy' / 'accuracy.jsonl').read_text().splitlines()[1:]
        return [(json.dumps(r['subnet'], sort_keys=True), r['top1'], r['top5']) for r in map(json.loads, lines)]
    assert rows(tmp_path / 'two') == rows(tmp_path / 'one') and len(rows(tmp_path / 'one')) == 12
    assert (tmp_path / 'two' / 'accuracy' / 'evaluated' / 'evaluated.rank1.jsonl').is_file()  # rank 1's own share
