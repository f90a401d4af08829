"""Keeping the source: ways to train the shrinking stages without losing the max subnet, measured on the validation
split.

From a pretrained start the max subnet *is* the user's model, and it must come out of every stage within 0.5 points
of the source; from scratch, no stage should lower it by more than a point below the full stage. With ``--start
pretrained`` this benchmark converts one source (``ps_quality.py``'s stand-in for pretrained weights, trained here
on the digits, or reused from an earlier run with the same settings) and runs the ``auto`` recipe's stages for a
pretrained start (``fast``); with ``--start scratch`` it trains the ``scratch`` recipe's full stage once and runs its
later stages. Each variant starts from the same weights, with the same data, batch, seed and optimizer steps:

- ``recipe``: the recipe as it is (sandwich sampling, in-place distillation from the max subnet of the same step);
- ``frozen KD``: every subnet, the max included, distils from the frozen start (``Stage.inplace_kd=False``);
- ``lr x2`` / ``lr x0.3`` / ``lr x0.1``: every stage's learning rate scaled (the source ended its own training
  near lr 0; the subnets fine-tuned alone in ``ps_quality.py`` choose theirs from 1, 2 and 4x on validation);
- ``frozen KD, lr x0.3``: both;
- ``EMA``: the same run as ``recipe``, deploying the exponential moving average of the shared weights
  (``TrainConfig.ema_decay``, timm's ``ModelEmaV3``);
- ``kernel lr x0.5``: only the kernel stage's learning rate halved (the stage that costs the max most from scratch);
- ``shrinking x2``: every stage after the start twice as long (warmup included), the start unchanged: a floor that
  lengthens only the stages whose steps the subnets share;
- ``min at min res``: the sandwich's min subnet trained at the smallest resolution at every step, where it is
  deployed and where it is trained alone (``Stage.min_resolution``), instead of at the step's drawn resolution
  (``fast`` already does: from a pretrained start it is the recipe);
- ``alpha KD``: the smaller subnets distil from the max subnet with AlphaNet's adaptive alpha-divergence
  (``--kd alpha``) instead of soft-target cross entropy;
- ``added lr x10``: what conversion adds to the source (kernel transforms, a ViT's per-resolution position
  embeddings) at 10x the stage's learning rate (``Stage.added_lr_scale``), the shared weights at 1x;
- ``labels max only``: only the max subnet learns from the labels (label smoothing included), the smaller ones from
  its predictions alone (``Stage.labels_max_only``; BigNAS regularizes only the max subnet);
- ``kernel sandwich``: the kernel stage trains the max and the min subnet at every step (``subnets_per_step=2``),
  where one subnet per step is, under the sandwich rule, the max subnet alone (``fast`` now does, as ``scratch``
  did: for either start it is the recipe).

Every figure is top-1 on the 300 validation images (30 per class, one image is 0.33 points), which is what a recipe
may be chosen on; the chosen recipe is then measured on the test split by ``ps_quality.py --parts pretrained``. The
table goes into ``docs/results.md`` between the ``keep_source:MODEL:START`` markers.

Usage: python benchmarks/keep_source.py --model ofa_mobilenetv3_large_100 [--image-size 24] [--start scratch]
       [--variants recipe "frozen KD" ...] [--floor-scale 0.5] [--results docs/results.md] [--output /tmp/ps_quality]
       [--smoke]
"""
import argparse
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Dict, Tuple

import timm
import torch

from ps_quality import (
    Bench, _evaluate, _randoms, _run_by_stage, _smoke, _stage_line, bench_parser, bench_schedule, deployed,
    setting_flags, setting_key, model_kwargs_flag, parse_bench_args, pretrained_supernet, write_section)

from ofa_timm.training import Schedule, SubnetEvaluator, Trainer

# name -> (schedule change, TrainConfig overrides)
Variant = Tuple[Callable[[Schedule], Schedule], Dict[str, Any]]


def _stages(lr_scale: float = 1.0, only: str = '', length: float = 1.0, **changes: Any
            ) -> Callable[[Schedule], Schedule]:
    """Every shrinking stage (or those whose name starts with ``only``) with its lr scaled, its length (warmup
    included) multiplied by ``length`` and ``changes`` made. A stage that unlocks nothing (``full``, which a
    pretrained start skips) stays as it is."""
    return lambda s: replace(s, stages=tuple(
        replace(st.lengthened(length), lr=st.lr * lr_scale, **changes) if st.unlock and st.name.startswith(only)
        else st for st in s.stages))


VARIANTS: Dict[str, Variant] = {
    'recipe': (lambda s: s, {}),
    'frozen KD': (_stages(inplace_kd=False), {}),
    'lr x2': (_stages(2.0), {}),
    'lr x0.3': (_stages(0.3), {}),
    'lr x0.1': (_stages(0.1), {}),
    'frozen KD, lr x0.3': (_stages(0.3, inplace_kd=False), {}),
    'EMA': (lambda s: s, dict(ema_decay=0.998)),
    'kernel lr x0.5': (_stages(0.5, only='kernel'), {}),
    'shrinking x2': (_stages(length=2.0), {}),
    'min at min res': (_stages(min_resolution=True), {}),
    'alpha KD': (lambda s: s, dict(kd_kind='alpha')),
    'added lr x10': (_stages(added_lr_scale=10.), {}),
    'labels max only': (_stages(labels_max_only=True), {}),
    'kernel sandwich': (_stages(only='kernel', subnets_per_step=2), {}),
}


def start(bench: Bench, args: argparse.Namespace) -> Tuple[torch.nn.Module, Schedule]:
    """The weights every variant starts from, and the stages they train.

    ``pretrained``: the supernet converted from the source, and the ``fast`` stages. ``scratch``: the supernet after
    the ``scratch`` recipe's full stage (trained once, at the length the recipe's floor gives it), and the recipe's
    later stages at the same lengths; each variant then starts them from the full stage's end, as a run would (with a
    fresh optimizer and data order, the same for every variant).
    """
    if args.start == 'pretrained':
        supernet = pretrained_supernet(bench, args)
        return supernet, _smoke(bench_schedule(args, supernet.space, pretrained=True), args)
    torch.manual_seed(args.seed)
    supernet = timm.create_model(args.model, num_classes=bench.num_classes, resolutions=bench.resolutions,
                                 **args.model_kwargs)
    schedule = bench_schedule(args, supernet.space, pretrained=False)
    trainer = Trainer(supernet, _smoke(schedule, args), bench.train, bench.val,
                      bench.calib, bench.config('keep_full'))
    full, *rest = trainer.schedule.stages  # fitted to the floor, as the whole run fits them
    tick = time.time()
    trainer.run(stop_after=trainer.stage_steps(full))
    print(f'full stage: {trainer.stage_steps(full)} steps ({time.time() - tick:.0f} s)', flush=True)
    return supernet, replace(trainer.schedule, stages=tuple(rest), min_steps=0)


def run_variant(bench: Bench, supernet: torch.nn.Module, state: Dict[str, torch.Tensor], shrinking: Schedule,
                name: str, evaluator: SubnetEvaluator, args: argparse.Namespace) -> Dict[str, Any]:
    """Train ``name``'s version of the ``shrinking`` stages from the weights ``state``; the max subnet at each stage
    end and the final subnets, on the validation split."""
    change, overrides = VARIANTS[name]
    supernet.load_state_dict(state)
    space = supernet.space
    schedule = change(shrinking)
    # ``pretrained=True``: the trainer starts from these weights (no full stage), with them as the frozen teacher.
    trainer = Trainer(supernet, schedule, bench.train, bench.val, bench.calib,
                      bench.config('keep_' + ''.join(c if c.isalnum() else '_' for c in name), **overrides),
                      pretrained=True)

    tick = time.time()
    stage_max = _run_by_stage(bench, trainer, lambda t: evaluator(deployed(t), space.max())['top1'])
    out: Dict[str, Any] = _evaluate(bench, deployed(trainer), _randoms(space, args),
                                    lambda model, subnet: evaluator(model, subnet)['top1'])
    out.update(stages=stage_max, steps=trainer.position.global_step, seconds=time.time() - tick)
    return out


def report(args: argparse.Namespace, start: float, rows: Dict[str, Dict[str, Any]], seconds: float,
           n_val: int) -> str:
    flags = ''
    if list(rows) != list(VARIANTS):
        flags += ' --variants ' + ' '.join(name if name.isidentifier() else f'"{name}"' for name in rows)
    flags += setting_flags(args) + model_kwargs_flag(args)
    what = 'the source' if args.start == 'pretrained' else "the full stage's max subnet"
    setting = setting_flags(args).strip()  # in the title too, so that each setting's section has its own anchor
    lines = [f'### Keeping the {"source" if args.start == "pretrained" else "full stage"}: `{args.model}`, '
             f'{args.start}' + (f', `{setting}`' if setting else ''), '',
             f'`python benchmarks/keep_source.py --model {args.model} --image-size {args.image_size} --start '
             f'{args.start}{flags}` ({seconds / 60:.1f} minutes on the 2-core machine). "steps": optimizer steps '
             f'after the start. **Validation** top-1 (%, {n_val:,} images); {what} scores {start:.1f}.', '',
             '| variant | steps | max at each stage end | lowest stage end − start | min | mid | max | random mean |',
             '|---|---:|---|---:|---:|---:|---:|---:|']
    for name, r in rows.items():
        low = min(acc for _, acc in r['stages']) - start
        lines.append(f"| {name} | {r['steps']:,} | {_stage_line(r['stages'])} | {low:+.1f} | {r['min']:.1f} | "
                     f"{r['mid']:.1f} | {r['max']:.1f} | {r['mean']:.1f} |")
    return '\n'.join(lines)


def main() -> None:
    parser = bench_parser(__doc__, image_size=24)
    parser.add_argument('--start', choices=('pretrained', 'scratch'), default='pretrained',
                        help="the source's weights, or the scratch recipe's full stage")
    parser.add_argument('--variants', nargs='+', choices=list(VARIANTS), default=list(VARIANTS))
    args = parse_bench_args(parser)
    tick = time.time()
    bench = Bench(args)
    supernet, shrinking = start(bench, args)
    state = {k: v.clone() for k, v in supernet.state_dict().items()}
    evaluator = bench.val_evaluator
    source = evaluator(supernet, supernet.space.max())['top1']
    print(f'{args.start} start: {source:.1f} (validation)', flush=True)
    rows: Dict[str, Dict[str, Any]] = {}
    for name in args.variants:
        rows[name] = run_variant(bench, supernet, state, shrinking, name, evaluator, args)
        r = rows[name]
        print(f"{name}: {_stage_line(r['stages'])}; min {r['min']:.1f} mid {r['mid']:.1f} max {r['max']:.1f} "
              f"mean {r['mean']:.1f} ({r['seconds']:.0f} s)", flush=True)
    text = report(args, source, rows, time.time() - tick, len(bench.val))
    print(text, flush=True)
    if args.results:
        write_section(Path(args.results), f'{args.model}:{args.start}{setting_key(args)}', text,
                      script='keep_source')


if __name__ == '__main__':
    main()
