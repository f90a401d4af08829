"""An interrupt loses nothing: SIGINT/SIGTERM checkpoint the current step, say where it stopped and how to resume, and
the resumed run is bitwise the uninterrupted one. Also the wall-clock checkpoint cadence and the output a user reads
while a run goes (progress lines without a terminal, --resume, summary, --help, data errors)."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from ofa_timm.example_data import make_shapes_dataset
from ofa_timm.cli import build_parser, main
from ofa_timm.training import Schedule, Stage, Trainer, load_checkpoint

MODEL = 'ofa_mobilenetv3_small_100'


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    return make_shapes_dataset(tmp_path_factory.mktemp('int_shapes'), num_classes=3, train_per_class=8,
                               val_per_class=4, image_size=32)


@pytest.fixture(scope='module')
def schedule(tmp_path_factory):
    path = tmp_path_factory.mktemp('int_schedule') / 'tiny.yaml'
    Schedule((Stage('kernel', 2, 1e-2, {'kernel': 'all', 'resolution': 'all'}),
              Stage('depth', 1, 1e-2, {'kernel': 'all', 'depth': 'all', 'resolution': 'all'}, subnets_per_step=2))
             ).to_yaml(path)
    return path  # 3 steps per epoch: kernel steps 1-6, depth steps 7-9


def args_for(shapes, schedule, out, *extra):
    return ['train', '--model', MODEL, '--data-dir', str(shapes), '--schedule', str(schedule), '--resolutions', '24',
            '32', '--batch-size', '8', '--workers', '0', '--calib-images', '8', '--output', str(out), *extra]


@pytest.fixture(scope='module')
def straight(shapes, schedule, tmp_path_factory):
    """The weights of the uninterrupted run."""
    out = tmp_path_factory.mktemp('straight')
    assert main(args_for(shapes, schedule, out, '--no-progress')) == 0
    return load_file(out / 'supernet.safetensors')


def assert_bitwise(out, straight):
    state = load_file(out / 'supernet.safetensors')
    assert state.keys() == straight.keys()
    assert all(torch.equal(state[k], straight[k]) for k in state), [k for k in state
                                                                    if not torch.equal(state[k], straight[k])][:5]


def signal_at(monkeypatch, signals_at):
    """Make the training step deliver signals to this process: {global step (0-based): [signals]}."""
    original = Trainer.train_step

    def step(self, *args, **kwargs):
        for signum in signals_at.get(self.position.global_step, ()):
            os.kill(os.getpid(), signum)
        return original(self, *args, **kwargs)
    monkeypatch.setattr(Trainer, 'train_step', step)


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_a_signal_checkpoints_the_step_and_resume_is_bitwise(shapes, schedule, straight, tmp_path, capfd,
                                                             monkeypatch, signum):
    out = tmp_path / 'run'
    args = args_for(shapes, schedule, out, '--no-progress')
    signal_at(monkeypatch, {1: [signum]})  # during the 2nd step, mid-epoch
    assert main(args) == 128 + signum
    err = capfd.readouterr().err  # the signal handler writes to fd 2
    name = signal.Signals(signum).name
    assert "stopped at stage 'kernel' (1/2), epoch 1/2, step 2/6 (global step 2)" in err, err
    assert f'{name}: stopping after this step' in err and 'Traceback' not in err
    assert err.strip().splitlines()[-1] == f'Resume with: ofa-timm {" ".join(args)} --resume'
    assert load_checkpoint(out / 'last.pth')['position'] == {'stage': 0, 'step': 2, 'global_step': 2,
                                                             'validate': False}
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers are restored

    monkeypatch.undo()
    assert main(args + ['--resume']) == 0
    printed = capfd.readouterr().out
    assert f"Resuming {out / 'last.pth'} at stage 'kernel' (1/2), epoch 1/2, step 2/6 (global step 2)" in printed
    assert_bitwise(out, straight)


def test_a_second_signal_stops_at_once_keeping_the_last_checkpoint(shapes, schedule, tmp_path, capsys, monkeypatch):
    out = tmp_path / 'run'
    args = args_for(shapes, schedule, out, '--no-progress', '--checkpoint-every', '2')
    signal_at(monkeypatch, {4: [signal.SIGINT, signal.SIGINT]})
    assert main(args) == 130
    err = capsys.readouterr().err
    assert 'SIGINT again: stopped at once' in err and f"the last checkpoint is kept at {out / 'last.pth'}" in err
    assert 'Traceback' not in err
    assert load_checkpoint(out / 'last.pth')['position']['global_step'] == 4


def test_checkpoints_on_a_wall_clock_cadence(shapes, schedule, tmp_path, monkeypatch):
    import ofa_timm.training.trainer as trainer_module
    saved = []
    original = trainer_module.save_checkpoint
    monkeypatch.setattr(trainer_module, 'save_checkpoint',
                        lambda state, path: (saved.append(state['position']['global_step']), original(state, path)))
    assert main(args_for(shapes, schedule, tmp_path / 'a', '--no-progress', '--checkpoint-minutes', '0')) == 0
    assert saved == [3, 6, 9]  # epoch and stage ends only
    saved.clear()
    assert main(args_for(shapes, schedule, tmp_path / 'b', '--no-progress', '--checkpoint-minutes', '1e-9')) == 0
    assert saved == [1, 2, 3, 4, 5, 6, 7, 8, 9]


def test_progress_lines_without_a_terminal_and_summary_steps(shapes, schedule, tmp_path, capsys):
    assert main(args_for(shapes, schedule, tmp_path / 'a', '--progress-seconds', '0')) == 0
    out = capsys.readouterr().out
    steps = [line for line in out.splitlines() if ' step ' in line and ' loss ' in line]
    assert len(steps) == 9 and steps[0].startswith('kernel ep 1/2 step 1/6 loss ')
    assert 'kernel ep 2 validation: mean top-1 ' in out
    # By default a line at most every 30 s: here the first and last step of each stage
    assert main(args_for(shapes, schedule, tmp_path / 'b')) == 0
    out = capsys.readouterr().out
    steps = [line.split(' loss ')[0] for line in out.splitlines() if ' step ' in line and ' loss ' in line]
    assert steps == ['kernel ep 1/2 step 1/6', 'kernel ep 2/2 step 6/6', 'depth ep 1/1 step 1/3',
                     'depth ep 1/1 step 3/3']
    summary = (tmp_path / 'b' / 'summary.md').read_text().splitlines()
    assert summary[0].startswith('| stage | epochs | steps |')
    assert summary[2].startswith('| kernel | 2 | 6 |') and summary[3].startswith('| depth | 1 | 3 |')


def test_help_shows_each_default_once(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(['train', '--help'])
    text = ' '.join(capsys.readouterr().out.split())
    assert '(default: )' not in text and '(default: True)' not in text and '(default: False)' not in text
    assert '(default: None)' not in text and not re.search(r'\(default:[^)]*\) \(default:', text)
    assert '--checkpoint-minutes' in text and '(default: 10.0)' in text


def test_data_dir_errors_give_the_reason(tmp_path, capsys):
    assert main(['train', '--data-dir', str(tmp_path / 'missing'), '--output', str(tmp_path / 'out')]) == 2
    assert capsys.readouterr().err.strip().endswith(f"at '{tmp_path / 'missing'}': no such folder")


@pytest.mark.slow
def test_ctrl_c_on_the_command_line_mid_epoch(shapes, schedule, straight, tmp_path):
    """A terminal's Ctrl-C: SIGINT to the whole process group (loader workers included) of a real `ofa-timm train`."""
    out = tmp_path / 'run'
    args = args_for(shapes, schedule, out, '--no-progress', '--log-every', '1')
    args[args.index('--workers') + 1] = '1'
    cmd = [sys.executable, '-c', 'import sys; from ofa_timm.cli import main; sys.exit(main())', *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    metrics = out / 'metrics.jsonl'
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and sum(json.loads(line)['type'] == 'train' for line in metrics.read_text().splitlines()
                                     if line.strip()) >= 1:
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr[-2000:]
    assert 'Traceback' not in stderr and 'Resume with: ofa-timm train' in stderr, stderr[-2000:]
    position = load_checkpoint(out / 'last.pth')['position']
    assert position['global_step'] < 9  # stopped before the end
    assert main(args + ['--resume']) == 0
    assert_bitwise(out, straight)


def test_a_signal_during_validation_stops_it_at_once_and_resume_redoes_it(shapes, schedule, straight, tmp_path,
                                                                        monkeypatch, capfd):
    """A scheduler's SIGTERM leaves about 30 s: validation, BN recalibration and channel sorting stop at once (they are
    cheap to redo); only the training state is saved, and the resumed run is still bitwise the uninterrupted one."""
    from ofa_timm.training import evaluate
    out = tmp_path / 'run'
    args = args_for(shapes, schedule, out, '--no-progress')
    calls = []
    real = evaluate.SubnetEvaluator.__call__

    def call(self, supernet, subnet):
        calls.append(subnet)
        if len(calls) == 2:  # the second subnet of the first validation (end of epoch 1)
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, supernet, subnet)
    monkeypatch.setattr(evaluate.SubnetEvaluator, '__call__', call)
    assert main(args) == 143
    assert len(calls) == 2  # nothing was evaluated after the signal
    err = capfd.readouterr().err
    assert 'SIGTERM: stopping now' in err and 'Resume with: ofa-timm train' in err
    assert '(global step 3, the validation of epoch 1 owed)' in err
    state = load_checkpoint(out / 'last.pth')
    assert state['position'] == {'stage': 0, 'step': 3, 'global_step': 3, 'validate': True}  # the validation is owed
    assert not any(json.loads(line)['type'].startswith('val') for line in (out / 'metrics.jsonl').read_text()
                   .splitlines() if line.strip()) if (out / 'metrics.jsonl').exists() else True
    monkeypatch.undo()
    assert main(args + ['--resume']) == 0
    assert_bitwise(out, straight)
    means = [json.loads(line) for line in (out / 'metrics.jsonl').read_text().splitlines()]
    assert [r['global_step'] for r in means if r['type'] == 'val_mean'] == [3, 6, 9]  # each validation once
