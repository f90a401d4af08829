"""Progressive shrinking vs training the same subnets from scratch, on the generated shapes dataset.

1. Progressive shrinking (the ``demo`` schedule, AdamW) of ``ofa_mobilenetv3_large_100`` from random init; then the
   min, mid and max subnets are BN-recalibrated and evaluated.
2. Each of those three subnets, extracted from the same random initial supernet, is trained alone from scratch with
   the same data pipeline, optimizer and peak lr (the schedule's ``full`` stage), for as many optimizer steps as the
   whole progressive-shrinking run took, then BN-recalibrated and evaluated the same way.

Usage: python benchmarks/ps_vs_scratch.py [--output /tmp/ps_vs_scratch] [--epochs-scale 1.0] [--seed 0]
"""
import argparse
from dataclasses import replace
from pathlib import Path

import timm
import torch

import ofa_timm
from ofa_timm.training import (
    DataConfig, Schedule, TrainConfig, Trainer, build_datasets, load_schedule, make_shapes_dataset)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument('--output', default='/tmp/ps_vs_scratch')
    parser.add_argument('--epochs-scale', type=float, default=1.0)
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    out = Path(args.output)
    root = make_shapes_dataset(out / 'data', num_classes=4, image_size=64)
    train, val, calib, num_classes = build_datasets(DataConfig(str(root), image_size=64, scale=(0.6, 1.0)),
                                                    seed=args.seed)
    resolutions = (48, 56, 64)

    def config(name: str) -> TrainConfig:
        run = out / name
        for f in ('last.pth', 'metrics.jsonl'):
            (run / f).unlink(missing_ok=True)
        return TrainConfig(output=str(run), batch_size=32, workers=0, opt='adamw', weight_decay=0.01,
                           calib_images=128, seed=args.seed, progress=False)

    torch.manual_seed(args.seed)
    initial = timm.create_model('ofa_mobilenetv3_large_100', num_classes=num_classes, resolutions=resolutions)
    subnets = {'min': initial.space.min(), 'mid': initial.space.mid(), 'max': initial.space.max()}
    initial_subnets = {k: initial.extract(s) for k, s in subnets.items()}

    schedule = load_schedule('demo', args.epochs_scale)
    ps = Trainer(initial, schedule, train, val, calib, config('ps'))
    ps.run()
    ps_acc = {k: ps.evaluate_subnet(s)['top1'] for k, s in subnets.items()}
    steps = ps.position.global_step

    full = schedule.stages[0]
    scratch_acc = {}
    for name, model in initial_subnets.items():
        res = subnets[name].resolution
        alone = ofa_timm.elasticize(model, kernels=(), expands=(), depths=(), resolutions=(res,))  # nothing elastic
        epochs = steps / ps.steps_per_epoch
        trainer = Trainer(alone, Schedule((replace(full, epochs=epochs),)), train, val, calib,
                          config(f'scratch_{name}'))
        trainer.run()
        assert trainer.position.global_step == steps
        scratch_acc[name] = trainer.evaluate_subnet(alone.space.max())['top1']

    print(f'Shapes dataset, {len(train)} training / {len(val)} validation images, {steps} optimizer steps each')
    print('| subnet | resolution | progressive shrinking top-1 | from scratch top-1 |')
    print('|---|---:|---:|---:|')
    for name in subnets:
        print(f'| {name} | {subnets[name].resolution} | {ps_acc[name]:.2f} | {scratch_acc[name]:.2f} |')


if __name__ == '__main__':
    main()
