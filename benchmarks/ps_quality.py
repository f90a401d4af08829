"""Subnet quality of progressive shrinking on real data, against its ablations and against training from scratch.

Every run starts from the same random initial ``ofa_mobilenetv3_large_100`` (10 classes, resolutions 24/28/32) and
trains on scikit-learn's handwritten digits, written as a 32 px ImageFolder with the split of ``ofa-timm demo`` (797
training / 1,000 validation images, stratified), with the same data pipeline, optimizer (SGD-Nesterov), batch size and
seed:

- **PS**: the ``demo`` schedule: full -> kernel -> depth 1/2 -> expand 1/2, sandwich sampling, in-place distillation.
- **PS, uniform** (``--all``): the same stages with OFA's uniform sampling and distillation from the full-stage
  teacher.
- **No PS**: the same full stage, then the same optimizer steps, learning rates and subnets per step with every
  dimension unlocked at once (OFA's ablation), OFA's uniform sampling and teacher distillation.
- **Sandwich**: No PS with BigNAS's sandwich rule (max + min + random) and in-place distillation.
- **Scratch**: the min, mid and max subnets, each extracted from the initial supernet and trained alone with the full
  stage's recipe, for as many optimizer steps as PS took (equal steps per subnet) and for a third of them (the three
  together then cost what PS cost in steps).

Each subnet is BN-recalibrated on 500 training images, then evaluated on the 1,000 validation images (one image is
0.1 points). The table and the targets go into ``docs/results.md`` between the ``ps_quality`` markers.

Usage: python benchmarks/ps_quality.py [--output /tmp/ps_quality] [--results docs/results.md] [--epochs-scale 1.0]
       [--all] [--seed 0]
"""
import argparse
import math
import random
import re
import time
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Tuple

import timm
import torch

import ofa_timm
from ofa_timm.space import Subnet
from ofa_timm.training import (
    DataConfig, Schedule, TrainConfig, Trainer, build_datasets, load_schedule, make_digits_dataset,
    zero_init_residual)
from ofa_timm.training.report import read_metrics
from ofa_timm.training.sampling import applicable_stages

RESOLUTIONS = (24, 28, 32)
MARKERS = ('<!-- ps_quality:begin -->', '<!-- ps_quality:end -->')


def _variants(ps: Schedule, with_uniform: bool) -> Dict[str, Schedule]:
    """PS and its ablations: the same full stage, then the same steps, lrs and subnets per step."""
    full, rest = ps.stages[0], ps.stages[1:]
    everything = dict(rest[-1].unlock)  # the last stage unlocks every dimension

    def unlocked(sampling: str) -> Schedule:
        return replace(ps, stages=(full,) + tuple(
            replace(s, name=f'all_{s.name}', unlock=everything, sampling=sampling) for s in rest))

    variants = {'PS': ps}
    if with_uniform:
        variants['PS, uniform'] = replace(ps, stages=(full,) + tuple(replace(s, sampling='uniform') for s in rest))
    variants['No PS'] = unlocked('uniform')
    variants['Sandwich'] = unlocked('sandwich')
    return variants


def _stage_end_max(run_dir: Path) -> List[Tuple[str, float]]:
    """Top-1 of the max subnet at the last validation of each stage (the grid corner with every dimension at max)."""
    last: Dict[str, float] = {}
    for r in read_metrics(run_dir / 'metrics.jsonl'):
        if r['type'] == 'val' and '=min' not in r['subnet']:
            last[r['stage']] = r['top1']
    return list(last.items())


def _evaluate(trainer: Trainer, named: Dict[str, Subnet], randoms: List[Subnet]) -> Dict[str, float]:
    out = {k: trainer.evaluate_subnet(s)['top1'] for k, s in named.items()}
    accs = [trainer.evaluate_subnet(s)['top1'] for s in randoms]
    out['mean'], out['worst'] = sum(accs) / len(accs), min(accs)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--output', default='/tmp/ps_quality')
    parser.add_argument('--results', default=str(Path(__file__).resolve().parents[1] / 'docs' / 'results.md'),
                        help="Markdown file whose ps_quality section is replaced ('' to only print)")
    parser.add_argument('--epochs-scale', type=float, default=1.0, help="scale of the 'demo' schedule")
    parser.add_argument('--all', action='store_true', help='also run PS with uniform sampling')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    start = time.time()
    out = Path(args.output)
    root = make_digits_dataset(out / 'digits', val_per_class=100, image_size=32, seed=args.seed)
    data_cfg = DataConfig(str(root), image_size=32, scale=(0.6, 1.0), hflip=0.)  # digits are not mirror-symmetric
    train, val, calib, num_classes = build_datasets(data_cfg, seed=args.seed)

    def config(name: str, resolution: int = RESOLUTIONS[-1]) -> TrainConfig:
        run = out / name
        for f in ('last.pth', 'metrics.jsonl'):
            (run / f).unlink(missing_ok=True)
        # Validation at stage ends only, at one resolution: the table needs the max subnet per stage.
        return TrainConfig(output=str(run), batch_size=32, workers=0, calib_images=500, val_resolutions=[resolution],
                           val_every=10_000, seed=args.seed, progress=False)

    torch.manual_seed(args.seed)
    initial = timm.create_model('ofa_mobilenetv3_large_100', num_classes=num_classes, resolutions=RESOLUTIONS)
    zero_init_residual(initial)  # what the trainer does at the start of a run; the scratch subnets share it
    initial_state = {k: v.clone() for k, v in initial.state_dict().items()}
    space = initial.space
    named = {'min': space.min(), 'mid': space.mid(), 'max': space.max()}
    rng = random.Random(args.seed)
    randoms = [space.sample(rng) for _ in range(10)]

    ps = applicable_stages(load_schedule('demo', args.epochs_scale), space, pretrained=False)
    rows: Dict[str, Dict[str, float]] = {}
    stage_max: Dict[str, List[Tuple[str, float]]] = {}
    steps = 0
    for label, schedule in _variants(ps, args.all).items():
        initial.load_state_dict(initial_state)
        trainer = Trainer(initial, schedule, train, val, calib, config(re.sub(r'\W+', '_', label).lower()))
        tick = time.time()
        trainer.run()
        rows[label] = _evaluate(trainer, named, randoms)
        rows[label]['steps'] = trainer.position.global_step
        stage_max[label] = _stage_end_max(trainer.output)
        rows[label]['full'] = stage_max[label][0][1]
        print(f'{label}: {rows[label]} ({time.time() - tick:.0f} s)', flush=True)
        steps = steps or trainer.position.global_step
        assert trainer.position.global_step == steps, 'every variant takes the same optimizer steps'

    full = ps.stages[0]
    spe = trainer.steps_per_epoch
    for label, n in ((f'Scratch, {steps} steps each', steps), (f'Scratch, {math.ceil(steps / 3)} steps each',
                                                              math.ceil(steps / 3))):
        rows[label] = {'steps': n}
        for name, subnet in named.items():
            initial.load_state_dict(initial_state)
            alone = ofa_timm.elasticize(initial.extract(subnet), kernels=(), expands=(), depths=(),
                                        resolutions=(subnet.resolution,))  # nothing elastic: a plain model
            # The full stage's recipe for n steps (epochs are in units of the scaled schedule).
            stage = replace(full, name='scratch', epochs=n / spe / ps.epochs_scale)
            trainer = Trainer(alone, Schedule((stage,), ps.epochs_scale), train, val, calib,
                              config(f'scratch_{name}_{n}', subnet.resolution))
            tick = time.time()
            trainer.run()
            assert trainer.position.global_step == n
            rows[label][name] = trainer.evaluate_subnet(alone.space.max())['top1']
            print(f'{label} {name}: {rows[label][name]:.2f} ({time.time() - tick:.0f} s)', flush=True)

    text = _report(rows, stage_max, steps, len(train), len(val), time.time() - start, args)
    print(text)
    if args.results:
        _write_section(Path(args.results), text)


def _report(rows: Dict[str, Dict[str, float]], stage_max: Dict[str, List[Tuple[str, float]]], steps: int,
            n_train: int, n_val: int, seconds: float, args: argparse.Namespace) -> str:
    def cell(row: Dict[str, float], key: str) -> str:
        return f'{row[key]:.1f}' if key in row else ''

    lines = [
        '## Progressive shrinking vs its ablations vs training from scratch (scikit-learn digits)',
        '',
        f'`python benchmarks/ps_quality.py{" --all" if args.all else ""}'
        f'{f" --epochs-scale {args.epochs_scale}" if args.epochs_scale != 1 else ""}` '
        f'({seconds / 60:.1f} minutes on this machine) — scikit-learn\'s handwritten digits, 10 classes, '
        f'{n_train:,} training / {n_val:,} validation images of 32 px (stratified); `ofa_mobilenetv3_large_100` at '
        f'resolutions {"/".join(map(str, RESOLUTIONS))}, all runs from the same random initial weights, SGD-Nesterov, '
        f'batch 32, seed {args.seed}. PS is the `demo` schedule (full, then kernel, depth and expand stages with '
        'sandwich sampling); No PS and Sandwich run the same full stage, then the same optimizer steps, learning '
        'rates and subnets per step with every dimension unlocked at once (uniform sampling with distillation from '
        'the full-stage teacher, or the sandwich rule with in-place distillation); Scratch trains each subnet alone '
        'with the full stage\'s recipe. Top-1 (%) after BN recalibration on 500 training images; "random" is 10 '
        f'fixed random subnets. One validation image is {100 / n_val:.2f} points; the binomial standard error of a '
        f'top-1 near 95 % is {100 * math.sqrt(0.95 * 0.05 / n_val):.1f} points.',
        '',
        '| run | optimizer steps | min | mid | max | random mean | random worst | max at end of full stage |',
        '|---|---:|---:|---:|---:|---:|---:|---:|',
    ]
    for label, row in rows.items():
        lines.append(f"| {label} | {int(row['steps'])} | {cell(row, 'min')} | {cell(row, 'mid')} | "
                     f"{cell(row, 'max')} | {cell(row, 'mean')} | {cell(row, 'worst')} | {cell(row, 'full')} |")
    lines += ['', 'Max subnet at the end of each stage:', '', '| run | ' + ' | '.join(
        name for name, _ in stage_max['PS']) + ' |', '|---|' + '---:|' * len(stage_max['PS'])]
    for label, per_stage in stage_max.items():
        lines.append(f'| {label} | ' + ' | '.join(f'{acc:.1f}' for _, acc in per_stage) + ' |')

    ps = rows['PS']
    equal, third = (r for label, r in rows.items() if label.startswith('Scratch'))
    worst_stage = min(acc for _, acc in stage_max['PS'][1:])

    def verdict(ok: bool) -> str:
        return 'met' if ok else '**not met**'

    lines += [
        '', 'Targets:', '',
        f"- PS ≥ No PS on the mean of random subnets: {ps['mean']:.1f} vs {rows['No PS']['mean']:.1f}, "
        f"{verdict(ps['mean'] >= rows['No PS']['mean'])} (Sandwich: {rows['Sandwich']['mean']:.1f}).",
        '- PS within 1 point of Scratch at equal steps per subnet: ' + ', '.join(
            f"{k} {ps[k]:.1f} vs {equal[k]:.1f} ({verdict(ps[k] >= equal[k] - 1)})" for k in ('min', 'mid', 'max'))
        + '.',
        '- PS above Scratch at equal total steps: ' + ', '.join(
            f"{k} {ps[k]:.1f} vs {third[k]:.1f} ({verdict(ps[k] > third[k])})" for k in ('min', 'mid', 'max')) + '.',
        f"- No PS stage ends with its max subnet more than 1 point below the full stage's ({ps['full']:.1f}): lowest "
        f"{worst_stage:.1f}, {verdict(worst_stage >= ps['full'] - 1)}.",
    ]
    return '\n'.join(lines)


def _write_section(path: Path, text: str) -> None:
    """Replace the text between the ps_quality markers of ``path`` (appending the section if they are missing)."""
    begin, end = MARKERS
    block = f'{begin}\n{text}\n{end}'
    doc = path.read_text() if path.is_file() else '# Measured results\n'
    pattern = re.compile(re.escape(begin) + '.*?' + re.escape(end), re.S)
    doc = pattern.sub(lambda _: block, doc) if pattern.search(doc) else doc.rstrip('\n') + '\n\n' + block + '\n'
    path.write_text(doc)
    print(f'Wrote {path}')


if __name__ == '__main__':
    main()
