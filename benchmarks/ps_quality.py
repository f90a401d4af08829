"""Subnet quality of progressive shrinking, with the recipe a new user gets (``--schedule auto``), on data and models
it was not tuned on: a matrix per model of ablations, training alone, a pretrained start and a small dataset.

Data: scikit-learn's handwritten digits (1,797 real 8x8 scans, 10 classes) as an ImageFolder with three stratified
splits fixed by the seed: 1,000 test images (100 per class; every figure here is measured on them), 300 validation
images (30 per class; the only split recipes were tuned on, and what training validates on) and the other 497 for
training; the small-data part keeps 20 training images per class (200).

Parts (``--parts``):

- ``scratch``: from one random initialisation, each run with the same data pipeline, optimizer (SGD-Nesterov), batch
  size and seed:
  - **PS**: the ``auto`` schedule (``scratch``: full, then kernel, depth and expand stages with sandwich sampling);
  - **PS, uniform**: the same stages with OFA's uniform sampling and distillation from the full-stage teacher;
  - **No PS, uniform**: OFA's ablation: the same full stage, then the same optimizer steps, learning rates and subnets
    per step with every dimension unlocked at once, uniform sampling and the teacher;
  - **No PS, sandwich**: the same with the sandwich rule (max + min + random, in-place distillation);
  - **Alone**: the min, mid and max subnets, each extracted from the initial supernet and trained alone with the full
    stage's recipe, for as many optimizer steps as PS took (equal steps per subnet) and for a third of them (the three
    together then cost what PS cost in steps).
- ``pretrained``: the source timm model trained alone on the training split until it converges stands in for
  pretrained weights (none can be downloaded here). It is saved as timm weights and converted with ``pretrained=True``
  through ``pretrained_cfg_overlay``; ``auto`` then runs the ``fast`` recipe. Compared: the max subnet with the source,
  and min and mid with the same subnets extracted from the source and fine-tuned alone for as many steps as PS took.
- ``small``: PS with ``auto`` on 200 training images, against each subnet trained alone for as many steps.

Every subnet trained alone tries its stage's lr times each of ``--alone-lr-scales`` (1, 2 and 4) and keeps the one
with the best validation top-1, as PS's recipes were tuned on validation; only the chosen run is measured on test.

Each subnet is BN-recalibrated on 500 training images and evaluated on the 1,000 test images (one image is 0.1 points;
the binomial standard error of a top-1 near 95 % is 0.7 points). Stage-end figures are the max subnet on the test
split at the end of each stage. The tables go into ``docs/results.md`` between markers named after the model and part.
``--floor-scale`` (the budget curve) and ``--ema-decay`` (the PS runs deploy the exponential moving average of their
shared weights, ``TrainConfig.ema_decay``; the subnets trained alone do not) write sections of their own.

Usage: python benchmarks/ps_quality.py --model ofa_mobilenetv3_large_100 [--model-kwargs depth=4 ...]
       [--image-size 32] [--parts scratch pretrained small] [--no-ablations] [--floor-scale 2] [--ema-decay 0.998]
       [--alone-lr-scales 1 2 4]
       [--results docs/results.md]
       [--output /tmp/ps_quality] [--seed 0] [--smoke]
"""
import argparse
import math
import random
import re
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import timm
import torch
from timm.utils import ParseKwargs

import ofa_timm  # noqa: F401  registers the ofa_* models
from ofa_timm.elastic import single_subnet
from ofa_timm.example_data import make_digits_dataset
from ofa_timm.space import Subnet
from ofa_timm.training import (
    DataConfig, Schedule, Stage, SubnetEvaluator, TrainConfig, Trainer, build_datasets, build_schedule,
    zero_init_residual)
from ofa_timm.training.schedule import PRESETS
from ofa_timm.training.sampling import applicable_stages

PARTS = ('scratch', 'pretrained', 'small')
ALONE_LR_SCALES = (1., 2., 4.)  # the subnets trained alone: their stage's lr times each, chosen on validation
SOURCE_STEPS = 1500  # the stand-in pretrained source's training steps
SHARED = 'shared weights, EMA not deployed'  # the row of a run's own weights when --ema-decay deploys their average
ROOT = Path(__file__).resolve().parents[1]


class Bench:
    """The data, the evaluator on the test split and the run settings of one model."""

    def __init__(self, args: argparse.Namespace, train_per_class: Optional[int] = None):
        self.args = args
        size = args.image_size
        self.resolutions = bench_resolutions(args)
        # The smoke run checks the plumbing, not the figures: a tenth of the test images, a sixth of the validation
        # images (validation at each stage end was most of its time) and 500 training images.
        test_per_class, val_per_class = (10, 5) if args.smoke else (100, 30)
        train_per_class = train_per_class or (50 if args.smoke else None)
        tag = f'{size}_{train_per_class or "all"}_{test_per_class}' + ('_smoke' if args.smoke else '')
        root = make_digits_dataset(Path(args.output) / f'digits_{tag}', val_per_class=val_per_class,
                                   test_per_class=test_per_class,
                                   train_per_class=train_per_class, image_size=size, seed=args.seed)
        cfg = DataConfig(str(root), image_size=size, scale=(0.6, 1.0), hflip=0.)  # digits are not mirror-symmetric
        self.train, self.val, self.calib, self.num_classes = build_datasets(cfg, seed=args.seed)
        self.test = build_datasets(replace(cfg, val_split='test'), seed=args.seed)[1]
        self.calib_images = 64 if args.smoke else 500  # the smoke run checks the plumbing, not the figures
        self.evaluator = SubnetEvaluator(self.calib, self.test, calib_images=self.calib_images, batch_size=64,
                                         seed=args.seed)
        self.val_evaluator = SubnetEvaluator(self.calib, self.val, calib_images=self.calib_images, batch_size=64,
                                             seed=args.seed)  # chooses the baselines' lr; nothing reported is on it
        self.schedule_scale = 1.0  # the schedule's epoch scale (it multiplies a stage's warmup), for the runs alone

    def config(self, name: str, resolution: Optional[int] = None, **kwargs: Any) -> TrainConfig:
        run = Path(self.args.output) / self.args.model / name
        for f in ('last.pth', 'metrics.jsonl'):
            (run / f).unlink(missing_ok=True)
        # Validation (on the validation split) at stage ends only, at one resolution: the tables measure on test.
        return TrainConfig(output=str(run), batch_size=32, workers=0, calib_images=self.calib_images,
                           val_resolutions=[resolution or self.resolutions[-1]], val_every=10_000, seed=self.args.seed,
                           progress=False, **kwargs)

    def test_top1(self, supernet: torch.nn.Module, subnet: Subnet) -> float:
        return self.evaluator(supernet, subnet)['top1']

    def val_top1(self, supernet: torch.nn.Module, subnet: Subnet) -> float:
        return self.val_evaluator(supernet, subnet)['top1']


def deployed(trainer: Trainer) -> torch.nn.Module:
    """The weights a run deploys: the EMA of the shared weights when it keeps one (``--ema-decay``), else them."""
    return trainer.ema.module if trainer.ema is not None else trainer.supernet


def _run_by_stage(bench: Bench, trainer: Trainer,
                  measure: Optional[Callable[[Trainer], Any]] = None) -> List[Tuple[str, Any]]:
    """Run ``trainer`` stage by stage (stop at each stage end, resume exactly) and measure the max subnet after each
    stage: with ``measure(trainer)``, or by default the deployed weights on the test split."""
    measure = measure or (lambda t: bench.test_top1(deployed(t), t.supernet.space.max()))
    ends, total = [], 0
    for stage in trainer.schedule.stages:
        total += trainer.stage_steps(stage)
        ends.append((stage.name, total))
    out = []
    for name, end in ends:
        trainer.run(stop_after=end)
        out.append((name, measure(trainer)))
        trainer.resume()  # continue from the checkpoint, bitwise as one run would
    return out


def _train_ps(bench: Bench, trainer: Trainer, randoms: Sequence[Subnet]
              ) -> Tuple[Dict[str, Any], Optional[Dict[str, Any]]]:
    """Run PS stage by stage: the figures of the deployed weights and, when the run keeps an EMA, of its shared
    weights too. The average never feeds back into training, so the second is the same run without the EMA."""
    kept = trainer.ema is not None

    def measure(t: Trainer) -> Tuple[float, Optional[float]]:
        largest = t.supernet.space.max()
        return bench.test_top1(deployed(t), largest), bench.test_top1(t.supernet, largest) if kept else None

    ends = _run_by_stage(bench, trainer, measure)
    steps = trainer.position.global_step
    ps = dict(_evaluate(bench, deployed(trainer), randoms), steps=steps, stages=[(n, a) for n, (a, _) in ends])
    if not kept:
        return ps, None
    return ps, dict(_evaluate(bench, trainer.supernet, randoms), steps=steps, stages=[(n, b) for n, (_, b) in ends])


def _evaluate(bench: Bench, supernet: torch.nn.Module, randoms: Sequence[Subnet],
              top1: Optional[Callable[[torch.nn.Module, Subnet], float]] = None) -> Dict[str, float]:
    """Min, mid, max, and the mean and worst of ``randoms``: with ``top1(supernet, subnet)``, by default on test."""
    top1 = top1 or bench.test_top1
    space = supernet.space
    out = {k: top1(supernet, s) for k, s in (('min', space.min()), ('mid', space.mid()), ('max', space.max()))}
    accs = [top1(supernet, s) for s in randoms]
    out['mean'], out['worst'] = sum(accs) / len(accs), min(accs)
    return out


def _variants(ps: Schedule) -> Dict[str, Schedule]:
    """PS and its like-for-like ablations: the same full stage, then the same steps, lrs and subnets per step."""
    full, rest = ps.stages[0], ps.stages[1:]
    everything = dict(rest[-1].unlock)  # the last stage unlocks every dimension

    def unlocked(sampling: str) -> Schedule:
        return replace(ps, stages=(full,) + tuple(
            replace(s, name=f'all_{s.name}', unlock=everything, sampling=sampling) for s in rest))

    return {'PS': ps, 'PS, uniform': replace(ps, stages=(full,) + tuple(replace(s, sampling='uniform') for s in rest)),
            'No PS, uniform': unlocked('uniform'), 'No PS, sandwich': unlocked('sandwich')}


class Alone(NamedTuple):
    """A subnet trained alone at each learning rate of a sweep: the test top-1 at the lr validation chose."""
    top1: float
    lr: float
    val: Dict[float, float]  # validation top-1 at each lr tried


def _alone(bench: Bench, supernet: torch.nn.Module, subnet: Subnet, steps: int, stage: Stage, name: str,
           from_weights: bool) -> Alone:
    """``subnet`` extracted from ``supernet`` and trained alone for ``steps`` optimizer steps with ``stage``'s warmup
    (no distillation), one forward and backward per step (a stage's ``subnets_per_step`` would accumulate the one
    subnet's gradient that many times, multiplying its learning rate), at ``stage.lr`` times each of
    ``--alone-lr-scales``. The baseline gets the tuning PS's recipes got: its lr is chosen on the validation split,
    the lower on a tie, and only the chosen run is measured on test."""
    # ``extract`` copies the weights, so every lr starts from the same ones and ``supernet`` is left as it was.
    probe = Trainer(single_subnet(supernet.extract(subnet), subnet.resolution), Schedule((replace(stage, unlock={}),)),
                    bench.train, bench.val, bench.calib, bench.config(name))
    epochs = steps / probe.steps_per_epoch
    chosen, val = None, {}
    for scale in bench.args.alone_lr_scales:
        alone = single_subnet(supernet.extract(subnet), subnet.resolution)  # nothing elastic: a plain model
        lr = stage.lr * scale
        alone_stage = replace(stage, name='alone', epochs=epochs, unlock={}, kd_ratio=0., sampling='uniform',
                              subnets_per_step=1, lr=lr,
                              warmup_epochs=min(stage.warmup_epochs * bench.schedule_scale, epochs / 5))
        trainer = Trainer(alone, Schedule((alone_stage,)), bench.train, bench.val, bench.calib,
                          bench.config(f'{name}_lr{lr:g}', subnet.resolution, zero_init_residual=not from_weights))
        trainer.run()
        assert trainer.position.global_step == steps, (trainer.position.global_step, steps)
        val[lr] = bench.val_top1(alone, alone.space.max())
        if chosen is None or val[lr] > val[chosen[0]]:  # strictly better: a tie keeps the lower lr
            chosen = lr, alone
    lr, alone = chosen
    return Alone(top1=bench.test_top1(alone, alone.space.max()), lr=lr, val=val)


def part_scratch(args: argparse.Namespace) -> Tuple[str, Dict[str, Any]]:
    bench = Bench(args)
    torch.manual_seed(args.seed)
    initial = timm.create_model(args.model, num_classes=bench.num_classes, resolutions=bench.resolutions,
                                **args.model_kwargs)
    zero_init_residual(initial)  # what the trainer does at the start of a run; the subnets trained alone share it
    state = {k: v.clone() for k, v in initial.state_dict().items()}
    space = initial.space
    randoms = _randoms(space, args)
    ps = applicable_stages(bench_schedule(args, space, pretrained=False), space, pretrained=False)
    rows: Dict[str, Dict[str, Any]] = {}
    steps = None
    for label, schedule in _variants(ps).items():
        if (args.smoke or args.no_ablations) and label != 'PS':
            continue
        initial.load_state_dict(state)
        trainer = Trainer(initial, _smoke(schedule, args), bench.train, bench.val, bench.calib,
                          bench.config(re.sub(r'\W+', '_', label).lower(), ema_decay=args.ema_decay))
        tick = time.time()
        rows[label], shared = _train_ps(bench, trainer, randoms)
        if shared is not None:
            rows[f'{label}, {SHARED}'] = shared
        print(f'{label}: {_brief(rows[label])} ({time.time() - tick:.0f} s)', flush=True)
        steps = steps or trainer.position.global_step
        assert trainer.position.global_step == steps, 'every variant takes the same optimizer steps'
        bench.schedule_scale = trainer.schedule.epochs_scale
    full = trainer.schedule.stages[0]
    for label, n in ((f'Alone, {steps} steps each', steps), (f'Alone, {math.ceil(steps / 3)} steps each',
                                                            math.ceil(steps / 3))):
        rows[label] = dict(steps=n, lrs={})
        for name, subnet in (('min', space.min()), ('mid', space.mid()), ('max', space.max())):
            initial.load_state_dict(state)
            tick = time.time()
            result = _alone(bench, initial, subnet, n, full, f'alone_{name}_{n}', from_weights=False)
            rows[label][name], rows[label]['lrs'][name] = result.top1, result.lr
            print(f'{label} {name}: {_brief_alone(result)} ({time.time() - tick:.0f} s)', flush=True)
    return 'scratch', dict(rows=rows, steps=steps, n_train=len(bench.train), schedule=trainer.schedule, lr=full.lr)


def train_source(bench: Bench, args: argparse.Namespace) -> Path:
    """The source timm model trained alone to convergence (the scratch recipe's full stage, for ``--source-steps``
    steps), saved as timm weights: the stand-in for pretrained weights. A file from an earlier run with the same
    settings is reused."""
    kwargs = ''.join(f'_{k}{v}' for k, v in sorted(args.model_kwargs.items()))  # e.g. _depth4_patch_size4
    name = f'source{kwargs}_{args.image_size}px_{args.source_steps}_seed{args.seed}{"_smoke" if args.smoke else ""}'
    path = Path(args.output) / args.model / f'{name}.pth'
    if path.is_file():
        return path
    torch.manual_seed(args.seed)
    source = timm.create_model(args.model[len('ofa_'):], num_classes=bench.num_classes, **args.model_kwargs)
    plain = single_subnet(source, args.image_size)
    full = build_schedule('scratch', plain.space).stages[0]
    probe = Trainer(plain, Schedule((full,)), bench.train, bench.val, bench.calib, bench.config('source'))
    epochs = args.source_steps / probe.steps_per_epoch
    stage = replace(full, epochs=epochs, warmup_epochs=min(full.warmup_epochs, epochs / 10), kd_ratio=0.)
    tick = time.time()
    trainer = Trainer(plain, Schedule((stage,)), bench.train, bench.val, bench.calib, bench.config('source'))
    trainer.run()
    tmp = path.with_suffix('.tmp')
    torch.save(plain.extract('max').state_dict(), tmp)
    tmp.replace(path)  # atomic: an interrupted run leaves no half-written source to reuse
    print(f'source trained alone for {args.source_steps} steps ({time.time() - tick:.0f} s)', flush=True)
    return path


def pretrained_supernet(bench: Bench, args: argparse.Namespace) -> torch.nn.Module:
    """The supernet converted from the source's weights with ``pretrained=True``, as a user converts theirs."""
    weights = train_source(bench, args)
    return timm.create_model(args.model, pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)),
                             num_classes=bench.num_classes, resolutions=bench.resolutions, **args.model_kwargs)


def bench_schedule(args: argparse.Namespace, space: Any, pretrained: bool) -> Schedule:
    """The ``auto`` recipe's stages for this start, with its floor in optimizer steps times ``--floor-scale`` and,
    with ``--floor-weight``, that floor weight on the stages after ``full``."""
    recipe = PRESETS['fast' if pretrained else 'scratch']
    weight = recipe.shrink_floor_weight if args.floor_weight is None else args.floor_weight
    recipe = replace(recipe, min_steps=round(recipe.min_steps * args.floor_scale), shrink_floor_weight=weight)
    return build_schedule(recipe, space, pretrained=pretrained)


def part_pretrained(args: argparse.Namespace) -> Tuple[str, Dict[str, Any]]:
    bench = Bench(args)
    supernet = pretrained_supernet(bench, args)
    state = {k: v.clone() for k, v in supernet.state_dict().items()}
    space = supernet.space
    source_top1 = bench.test_top1(supernet, space.max())
    randoms = _randoms(space, args)
    schedule = bench_schedule(args, space, pretrained=True)
    trainer = Trainer(supernet, _smoke(schedule, args), bench.train, bench.val, bench.calib,
                      bench.config('ps_fast', ema_decay=args.ema_decay), pretrained=True)
    tick = time.time()
    ps, shared = _train_ps(bench, trainer, randoms)
    print(f'PS from the source: {_brief(ps)} ({time.time() - tick:.0f} s)', flush=True)
    steps, first = ps['steps'], trainer.schedule.stages[0]
    bench.schedule_scale = trainer.schedule.epochs_scale
    alone = {}
    for name, subnet in (('min', space.min()), ('mid', space.mid())):
        supernet.load_state_dict(state)
        tick = time.time()
        alone[name] = _alone(bench, supernet, subnet, steps, first, f'finetune_{name}', from_weights=True)
        print(f'fine-tuned alone {name}: {_brief_alone(alone[name])} ({time.time() - tick:.0f} s)', flush=True)
    return 'pretrained', dict(source=source_top1, ps=ps, shared=shared, alone=alone, steps=steps, first=first,
                              source_steps=args.source_steps, n_train=len(bench.train), schedule=trainer.schedule)


def part_small(args: argparse.Namespace) -> Tuple[str, Dict[str, Any]]:
    bench = Bench(args, train_per_class=20)
    torch.manual_seed(args.seed)
    initial = timm.create_model(args.model, num_classes=bench.num_classes, resolutions=bench.resolutions,
                                **args.model_kwargs)
    zero_init_residual(initial)
    state = {k: v.clone() for k, v in initial.state_dict().items()}
    space = initial.space
    randoms = _randoms(space, args)
    schedule = bench_schedule(args, space, pretrained=False)
    trainer = Trainer(initial, _smoke(schedule, args), bench.train, bench.val, bench.calib,
                      bench.config('small_ps', ema_decay=args.ema_decay))
    tick = time.time()
    ps, shared = _train_ps(bench, trainer, randoms)
    print(f'PS on {len(bench.train)} images: {_brief(ps)} ({time.time() - tick:.0f} s)', flush=True)
    steps, full = ps['steps'], trainer.schedule.stages[0]
    bench.schedule_scale = trainer.schedule.epochs_scale
    alone = {}
    for name, subnet in (('min', space.min()), ('mid', space.mid()), ('max', space.max())):
        initial.load_state_dict(state)
        alone[name] = _alone(bench, initial, subnet, steps, full, f'small_alone_{name}', from_weights=False)
        print(f'alone {name}: {_brief_alone(alone[name])}', flush=True)
    return 'small', dict(ps=ps, shared=shared, alone=alone, steps=steps, n_train=len(bench.train),
                         schedule=trainer.schedule, lr=full.lr)


def _randoms(space: Any, args: argparse.Namespace) -> List[Subnet]:
    """The fixed random subnets whose mean and worst the tables give (two in the smoke run)."""
    return [space.sample(random.Random(args.seed + i)) for i in range(2 if args.smoke else 10)]


def _smoke(schedule: Schedule, args: argparse.Namespace) -> Schedule:
    """The real schedule, or a few steps of it for the test suite's smoke run."""
    return replace(schedule, epochs_scale=0.02, min_steps=0) if args.smoke else schedule


def model_kwargs_flag(args: argparse.Namespace) -> str:
    """``--model-kwargs`` as it was given, for the command line a report quotes ('' without it)."""
    if not args.model_kwargs:
        return ''
    return ' --model-kwargs ' + ' '.join(f'{k}={v}' for k, v in args.model_kwargs.items())


def _brief(row: Dict[str, Any]) -> str:
    return ', '.join(f'{k} {row[k]:.1f}' for k in ('min', 'mid', 'max', 'mean', 'worst') if k in row)


def _brief_alone(result: Alone) -> str:
    tried = ', '.join(f'lr {lr:g}: {top1:.1f}' for lr, top1 in result.val.items())
    return f'test {result.top1:.2f} at lr {result.lr:g} (validation {tried})'


# --- the report ------------------------------------------------------------------------------------------------------
def _verdict(ok: bool, by: float) -> str:
    return 'met' if ok else f'**not met** (by {abs(by):.1f})'


def _stage_line(stages: Sequence[Tuple[str, float]]) -> str:
    return ' → '.join(f'{name} {acc:.1f}' for name, acc in stages)


def _cells(row: Dict[str, Any]) -> str:
    """A row's min, mid, max, random mean and worst as table cells (empty where it has none)."""
    return ' | '.join(f'{row[k]:.1f}' if k in row else '' for k in ('min', 'mid', 'max', 'mean', 'worst'))


def _shared_row(data: Dict[str, Any], label: str) -> List[str]:
    """The table row of the run's own weights, when it deployed their EMA (none otherwise)."""
    return [f"| {label}, {SHARED} | {_cells(data['shared'])} |"] if data.get('shared') else []


def _stage_ends(data: Dict[str, Any]) -> str:
    """The max subnet at each stage end of the deployed weights and, under an EMA, of the shared weights."""
    line = _stage_line(data['ps']['stages'])
    return f"{line}; {SHARED}: {_stage_line(data['shared']['stages'])}" if data.get('shared') else line


def _lr_text(lrs: Dict[str, float], base: float, scales: Sequence[float]) -> str:
    """Which lr validation chose for each subnet trained alone, from which (or the one lr, when none was chosen)."""
    if len(scales) == 1:
        return f'lr {base * scales[0]:g}, not tuned'
    tried = '/'.join(f'{base * scale:g}' for scale in scales)
    return f'lr chosen on validation from {tried}: ' + ', '.join(f'{k} {lr:g}' for k, lr in lrs.items())


def _schedule_text(schedule: Schedule, steps: int, n_train: int) -> str:
    weights = sorted({s.floor_weight for s in schedule.stages[1:]} - {1.})
    weight = f", the stages after the first weighted {'/'.join(f'{w:g}' for w in weights)} in it" if weights else ''
    return f"{steps:,} optimizer steps on {n_train:,} training images (the recipe's floor of {schedule.min_steps:,} " \
           f"steps{weight})"


def report(part: str, data: Dict[str, Any], args: argparse.Namespace, seconds: float) -> str:
    flags = ' --no-ablations' if args.no_ablations and part == 'scratch' else ''
    flags += setting_flags(args)
    if args.ema_decay:
        flags += f' --ema-decay {args.ema_decay:g}'
    if tuple(args.alone_lr_scales) != ALONE_LR_SCALES:
        flags += ' --alone-lr-scales ' + ' '.join(f'{scale:g}' for scale in args.alone_lr_scales)
    flags += model_kwargs_flag(args)
    cmd = (f'`python benchmarks/ps_quality.py --model {args.model} --image-size {args.image_size} --parts {part}'
           f'{flags}` ({seconds / 60:.1f} minutes on the 2-core machine)')
    res = '/'.join(map(str, bench_resolutions(args))) + ' px'
    title = f"### `{args.model}`, {part}, {data['steps']:,} steps"  # the budget curve's points differ in steps
    if args.resolutions:
        title += f', resolutions {res}'
    if args.ema_decay:
        title += f', EMA {args.ema_decay:g} deployed'
    lines = [title, '', f'{cmd}; resolutions {res}; '
             f"{_schedule_text(data['schedule'], data['steps'], data['n_train'])}. Test top-1 (%).", '']
    if part == 'scratch':
        rows = data['rows']
        lines += ['| run | optimizer steps | min | mid | max | random mean | random worst |',
                  '|---|---:|---:|---:|---:|---:|---:|']
        for label, r in rows.items():
            lines.append(f"| {label} | {r['steps']:,} | {_cells(r)} |")
        lines += [''] + [f"{label}: {_lr_text(r['lrs'], data['lr'], args.alone_lr_scales)}."
                         for label, r in rows.items() if 'lrs' in r]
        lines += ['', 'Max subnet at the end of each stage: ' + '; '.join(
            f"{label}: {_stage_line(r['stages'])}" for label, r in rows.items() if 'stages' in r), '']
        ps = rows['PS']
        alone = [r for label, r in rows.items() if label.startswith('Alone')]
        if alone:
            equal, third = alone
            full_max = ps['stages'][0][1]
            worst = min(acc for _, acc in ps['stages'][1:])
            lines += ['Targets:', '',
                      '- PS at least as good as each subnet alone at equal total steps: ' + ', '.join(
                          f"{k} {ps[k]:.1f} vs {third[k]:.1f} ({_verdict(ps[k] >= third[k], ps[k] - third[k])})"
                          for k in ('min', 'mid', 'max')) + '.',
                      '- PS within 1 point of each subnet alone at equal steps per subnet: ' + ', '.join(
                          f"{k} {ps[k]:.1f} vs {equal[k]:.1f} ({_verdict(ps[k] >= equal[k] - 1, ps[k] - equal[k] + 1)})"
                          for k in ('min', 'mid', 'max')) + '.',
                      f'- No stage lowers the max subnet by more than 1 point: lowest stage end {worst:.1f} against '
                      f'{full_max:.1f} after the full stage ({_verdict(worst >= full_max - 1, worst - full_max + 1)}).']
            if 'No PS, sandwich' in rows:
                lines.append(f"- Like-for-like ablations: PS, uniform {rows['PS, uniform']['mean']:.1f} against No "
                             f"PS, uniform {rows['No PS, uniform']['mean']:.1f} (random mean); PS {ps['mean']:.1f} "
                             f"against No PS, sandwich {rows['No PS, sandwich']['mean']:.1f}.")
    elif part == 'pretrained':
        ps, alone = data['ps'], data['alone']
        low_stage, low = min(ps['stages'], key=lambda stage: stage[1])
        lines += [f"Source `{args.model[4:]}` trained alone for {data['source_steps']:,} steps: {data['source']:.1f}.",
                  '', '| | min | mid | max | random mean | random worst |', '|---|---:|---:|---:|---:|---:|',
                  f"| PS from the source (`fast`) | {_cells(ps)} |", *_shared_row(data, 'PS from the source'),
                  f"| extracted from the source, fine-tuned alone for {data['steps']:,} steps ("
                  f"{_lr_text({k: a.lr for k, a in alone.items()}, data['first'].lr, args.alone_lr_scales)}) | "
                  f"{alone['min'].top1:.1f} | {alone['mid'].top1:.1f} | | | |",
                  f"| the source | | | {data['source']:.1f} | | |", '',
                  f"Max subnet at the end of each stage: {_stage_ends(data)}.", '', 'Targets:', '',
                  f"- Max within 0.5 point of the source: {ps['max']:.1f} vs {data['source']:.1f} "
                  f"({_verdict(ps['max'] >= data['source'] - 0.5, ps['max'] - data['source'] + 0.5)}).",
                  f"- Max within 0.5 point of the source at every stage end: lowest {low:.1f} ({low_stage}) vs "
                  f"{data['source']:.1f} ({_verdict(low >= data['source'] - 0.5 - 1e-6, low - data['source'] + 0.5)}).",
                  '- Min and mid at least as good as fine-tuning each alone: ' + ', '.join(
                      f"{k} {ps[k]:.1f} vs {alone[k].top1:.1f} "
                      f"({_verdict(ps[k] >= alone[k].top1, ps[k] - alone[k].top1)})" for k in ('min', 'mid')) + '.']
    else:
        ps, alone = data['ps'], data['alone']
        lines += ['| | min | mid | max | random mean | random worst |', '|---|---:|---:|---:|---:|---:|',
                  f"| PS (`auto`) | {_cells(ps)} |", *_shared_row(data, 'PS'),
                  f"| each alone, {data['steps']:,} steps ("
                  f"{_lr_text({k: a.lr for k, a in alone.items()}, data['lr'], args.alone_lr_scales)}) | "
                  f"{alone['min'].top1:.1f} | {alone['mid'].top1:.1f} | {alone['max'].top1:.1f} | | |", '',
                  f"Max subnet at the end of each stage: {_stage_ends(data)}.",
                  '', '- Within 2 points of each subnet alone at equal steps: ' + ', '.join(
                      f"{k} {ps[k]:.1f} vs {alone[k].top1:.1f} "
                      f"({_verdict(ps[k] >= alone[k].top1 - 2, ps[k] - alone[k].top1 + 2)})"
                      for k in ('min', 'mid', 'max')) + '.']
    return '\n'.join(lines)


def write_section(path: Path, key: str, text: str, script: str = 'ps_quality') -> None:
    """Replace the text between the ``SCRIPT:KEY`` markers of ``path`` (appending the section if missing)."""
    begin, end = f'<!-- {script}:{key}:begin -->', f'<!-- {script}:{key}:end -->'
    block = f'{begin}\n{text}\n{end}'
    doc = path.read_text() if path.is_file() else '# Measured results\n'
    pattern = re.compile(re.escape(begin) + '.*?' + re.escape(end), re.S)
    doc = pattern.sub(lambda _: block, doc) if pattern.search(doc) else doc.rstrip('\n') + '\n\n' + block + '\n'
    path.write_text(doc)
    print(f'Wrote {path} ({key})')


def bench_resolutions(args: argparse.Namespace) -> Tuple[int, ...]:
    """The elastic resolutions: ``--resolutions``, else 3/4, 7/8 and 1 x the image size."""
    size = args.image_size
    return tuple(args.resolutions) if args.resolutions else (size * 3 // 4, size * 7 // 8, size)


def _settings(args: argparse.Namespace) -> List[Tuple[str, str, List[str]]]:
    """The settings a section is measured at that are not the defaults, each as (flag, key label, values):
    ``--floor-scale``, ``--floor-weight``, ``--resolutions``, ``--source-steps`` and ``--seed``. The seed and the
    source's steps change the data split and the source, so a rerun without them measures something else."""
    settings = [('--floor-scale', 'floor', [f'{args.floor_scale:g}'] if args.floor_scale != 1 else []),
                ('--floor-weight', 'weight', [f'{args.floor_weight:g}'] if args.floor_weight is not None else []),
                ('--resolutions', 'res', [str(r) for r in args.resolutions or ()]),
                ('--source-steps', 'source', [str(args.source_steps)] if args.source_steps != SOURCE_STEPS else []),
                ('--seed', 'seed', [str(args.seed)] if args.seed != 0 else [])]
    return [(flag, label, values) for flag, label, values in settings if values]


def setting_flags(args: argparse.Namespace) -> str:
    """Those settings as a section's command line gives them (nothing at the defaults)."""
    return ''.join(f' {flag} ' + ' '.join(values) for flag, _, values in _settings(args))


def setting_key(args: argparse.Namespace) -> str:
    """The results-section key's suffix for the same settings, so that each setting keeps its own section."""
    return ''.join(f':{label}' + '-'.join(values) for _, label, values in _settings(args))


def bench_parser(doc: str, image_size: int) -> argparse.ArgumentParser:
    """The arguments this script and ``keep_source.py`` share: the model, data, source, floor and output."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default='ofa_mobilenetv3_large_100')
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs,
                        help='source model arguments, e.g. depth=4 patch_size=4 img_size=32 for a small ViT')
    parser.add_argument('--image-size', type=int, default=image_size)
    parser.add_argument('--source-steps', type=int, default=SOURCE_STEPS,
                        help='steps the pretrained source is trained for')
    parser.add_argument('--floor-scale', type=float, default=1.0,
                        help="multiplies the auto recipe's floor in optimizer steps (the budget curve: 0.5, 1, 2)")
    parser.add_argument('--floor-weight', type=float, default=None,
                        help="floor weight of the stages after 'full' (default: the recipe's; 1 shares the floor "
                             'in proportion to epochs, as before the scratch recipe weighted it)')
    parser.add_argument('--resolutions', type=int, nargs='+', default=None,
                        help='elastic resolutions, ascending, the largest the image size (default: 3/4, 7/8 and 1 x '
                             'the image size); e.g. the image size alone to keep the resolution fixed')
    parser.add_argument('--output', default='/tmp/ps_quality')
    parser.add_argument('--results', default=str(ROOT / 'docs' / 'results.md'),
                        help="Markdown file whose sections are replaced ('' to only print)")
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--smoke', action='store_true', help='a few steps of each run (the test suite runs it)')
    return parser


def parse_bench_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Parse, check the shared arguments, and make the output folder."""
    args = parser.parse_args()
    if not args.floor_scale > 0:
        parser.error(f'--floor-scale must be > 0, got {args.floor_scale}')
    if args.floor_weight is not None and not args.floor_weight > 0:
        parser.error(f'--floor-weight must be > 0, got {args.floor_weight}')
    if args.resolutions and (sorted(set(args.resolutions)) != args.resolutions or min(args.resolutions) < 1
                             or args.resolutions[-1] != args.image_size):
        parser.error(f'--resolutions must be positive, ascending, without repeats, and end at the image size '
                     f'({args.image_size}), got {args.resolutions}')
    (Path(args.output) / args.model).mkdir(parents=True, exist_ok=True)
    return args


def main() -> None:
    parser = bench_parser(__doc__, image_size=32)
    parser.add_argument('--parts', nargs='+', choices=PARTS, default=list(PARTS))
    parser.add_argument('--ema-decay', type=float, default=None,
                        help='PS runs keep an EMA of the shared weights with this decay and deploy it (the subnets '
                             'alone do not)')
    parser.add_argument('--alone-lr-scales', type=float, nargs='+', default=ALONE_LR_SCALES, metavar='SCALE',
                        help="the subnets trained alone try the stage's lr times each of these and keep the best on "
                             'validation (1 alone: no tuning)')
    parser.add_argument('--no-ablations', action='store_true',
                        help='scratch part: PS and the subnets alone, without the four ablation runs')
    args = parse_bench_args(parser)
    if args.ema_decay is not None and not 0 < args.ema_decay < 1:
        parser.error(f'--ema-decay must be in (0, 1), got {args.ema_decay}')
    if min(args.alone_lr_scales) <= 0 or sorted(set(args.alone_lr_scales)) != list(args.alone_lr_scales):
        parser.error(f'--alone-lr-scales must be positive, ascending and without repeats, got {args.alone_lr_scales}')
    parts = {'scratch': part_scratch, 'pretrained': part_pretrained, 'small': part_small}
    for name in args.parts:
        start = time.time()
        part, data = parts[name](args)
        text = report(part, data, args, time.time() - start)
        print(text, flush=True)
        if args.results:
            ema = f':ema{args.ema_decay:g}' if args.ema_decay else ''
            write_section(Path(args.results), f'{args.model}:{part}{setting_key(args)}{ema}', text)


if __name__ == '__main__':
    main()
