"""GPU benchmark: elastic overhead, one progressive-shrinking step and timm's static throughput, in one run.

Defaults follow the reference's measurements: batch 256, bf16 autocast, channels-last, 224 px, on one GPU.

* Elastic overhead: a supernet set to a subnet / the same subnet extracted as a static timm model, train step
  (forward, cross entropy, backward) and eval forward, for the canonical OFA MobileNetV3 w1.2 and OFA-ResNet50 at the
  max, min and a random subnet. Where the reference implementation (PyPI ``ofa``) is installed, its supernet / its own
  extracted subnet is timed in the same rounds.
* PS step: teacher + 4 subnets of the w1.2 space, against its ideal (teacher forward + the 4 static subnets' train
  steps) and the reference's step for the same subnets on the same card.
* Baseline: timm's ``mobilenetv3_large_100`` and ``resnet50``, train step with an SGD step, in images per second.

Before timing, the compared models are checked to compute the same outputs (float32), and the three PS steps the
same loss.
Prints one table and writes it as JSON (``--json``). Every function is timed interleaved with the one it is compared
to (``harness.Interleaved``), with CUDA synchronised before each clock stops.

Usage:
    python benchmarks/gpu.py [--device cuda] [--batch 256] [--res 224] [--amp bf16] [--json gpu.json]
    python benchmarks/gpu.py --device cpu --batch 8 --res 128 --quick   # smoke run (the test suite's)
"""
import argparse
import datetime
import json
import os
import platform
import sys
from dataclasses import asdict
from typing import Any, Callable, Dict, List, Optional

import timm
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # noqa: E402  harness sits next to this script
from harness import (  # noqa: E402
    HAS_REFERENCE, Interleaved, Precision, PSStep, Row, Space, assert_close, build_space, eval_forward, format_table,
    train_step)

from ofa_timm._malloc import steady_allocator  # noqa: E402

OVERHEAD_TARGET = 1.02
PS_TARGET = 1.02


class Bench:
    """Settings of one run, and the rows it has measured."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        amp = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'none': None}[args.amp]
        self.precision = Precision(torch.device(args.device), amp, channels_last=not args.no_channels_last)
        self.rows: List[Row] = []
        # Outputs are compared in float32 (TF32 convolutions on CUDA); PS-step losses under the run's autocast.
        self.rtol = 1e-4 if args.device == 'cpu' else 1e-2
        self.loss_rtol = 1e-4 if amp is None and args.device == 'cpu' else 3e-2

    def rounds(self, n: int) -> int:
        return 1 if self.args.quick else n

    def time(self, fns: Dict[str, Callable[[], Any]], rounds: int) -> Dict[str, float]:
        timer = Interleaved(fns, sync=self.precision.sync)
        timer.warmup(1 if self.args.quick else 3)
        return timer.run(self.rounds(rounds))

    def add(self, row: Row) -> None:
        self.rows.append(row)
        value = '-' if row.value is None else f'{row.value:.3f}'
        print(f'  {row.case}: {value} {row.note}', flush=True)


def _work(mode: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, p: Precision) -> Callable[[], Any]:
    model.train(mode == 'train')
    return train_step(model, x, y, p) if mode == 'train' else eval_forward(model, x, p)


def overhead(bench: Bench, space: Space) -> None:
    """Supernet at a subnet vs its extracted static subnet (and the reference's pair), train and eval."""
    p, args = bench.precision, bench.args
    supernet = p.place(space.supernet)
    if space.reference is not None:
        p.place(space.reference)
    x, y = p.inputs(args.batch, args.res)
    subnets = {which: space.subnet('random0' if which == 'random' else which) for which in args.subnets}
    # Every subnet is checked before any is timed: bf16 train steps move the two supernets' BN statistics apart.
    for which, subnet in subnets.items():
        supernet.set_active(subnet)
        with torch.no_grad():
            ours = supernet.eval()(x)
            assert_close(ours, p.place(supernet.extract(subnet)).eval()(x), bench.rtol,
                         f'{space.name} {which}: supernet vs extracted')
            if space.reference is not None:
                space.set_reference(subnet)
                assert_close(ours, space.reference.eval()(x), bench.rtol, f'{space.name} {which}: ours vs reference')
    for which, subnet in subnets.items():
        supernet.set_active(subnet)
        models = {'ours': supernet, 'ours_static': p.place(supernet.extract(subnet))}
        if space.reference is not None:
            models['reference_static'] = p.place(space.extract_reference(subnet))
            models['reference'] = space.reference
        for mode in args.modes:
            t = bench.time({k: _work(mode, m, x, y, p) for k, m in models.items()}, 10 if mode == 'train' else 20)
            ref = t['reference'] / t['reference_static'] if 'reference' in t else None
            bench.add(Row(f'overhead {mode} {space.name} {which}', t['ours'] / t['ours_static'], OVERHEAD_TARGET,
                          reference=ref, note=f'static {args.batch / t["ours_static"]:.0f} img/s'))
        for m in models.values():
            m.zero_grad(set_to_none=True)
        del models
    space.supernet.set_active(None)
    if p.device.type == 'cuda':
        torch.cuda.empty_cache()


def ps_step(bench: Bench) -> None:
    """One PS step (teacher + 4 subnets) vs its ideal and the reference's step."""
    p, args = bench.precision, bench.args
    space = build_space('ofa_mbv3_w12', args.res, reference=not args.no_reference)
    ps = PSStep(space, args.batch, args.res, p, output=args.output)
    losses = ps.check(rtol=bench.loss_rtol)
    t = bench.time(ps.functions(), 10)
    note = f'{t["ours"] * 1e3:.1f} ms vs ideal {t["ideal"] * 1e3:.1f} ms; mean losses ' + \
        ', '.join(f'{k} {v:.4f}' for k, v in losses.items())
    bench.add(Row('PS step / ideal, ofa_mbv3_w12, 4 subnets', t['ours'] / t['ideal'], PS_TARGET, note=note,
                  reference=t['reference'] / t['ideal'] if 'reference' in t else None))
    if 'reference' in t:
        bench.add(Row('PS step / reference PS step', t['ours'] / t['reference'], 1.0,
                      note=f'reference {t["reference"] * 1e3:.1f} ms'))


def timm_baseline(bench: Bench) -> None:
    """Images per second of timm's static models: forward, backward and an SGD step."""
    p, args = bench.precision, bench.args
    x, y = p.inputs(args.batch, args.res)
    for name in args.timm_models:
        model = p.place(timm.create_model(name, num_classes=1000)).train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        step = train_step(model, x, y, p)

        def train() -> None:
            step()
            opt.step()
        t = bench.time({name: train}, 10)[name]
        bench.add(Row(f'timm {name} train (img/s)', args.batch / t, unit='img/s', note=f'{t * 1e3:.1f} ms a step'))


def environment(bench: Bench) -> Dict[str, Any]:
    p, args = bench.precision, bench.args
    device = torch.cuda.get_device_name(p.device) if p.device.type == 'cuda' else \
        f'CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)'
    return {
        'date': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'), 'device': device,
        'torch': torch.__version__, 'timm': timm.__version__, 'cuda': torch.version.cuda, 'python':
        platform.python_version(), 'batch': args.batch, 'res': args.res, 'amp': args.amp,
        'channels_last': p.channels_last, 'reference_installed': HAS_REFERENCE, 'quick': args.quick,
    }


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='cuda')
    parser.add_argument('--batch', type=int, default=256)
    parser.add_argument('--res', type=int, default=224)
    parser.add_argument('--amp', choices=('bf16', 'fp16', 'none'), default='bf16')
    parser.add_argument('--no-channels-last', action='store_true')
    parser.add_argument('--spaces', nargs='+', default=['ofa_mbv3_w12', 'ofa_resnet50'])
    parser.add_argument('--subnets', nargs='+', default=['max', 'min', 'random'], choices=('max', 'min', 'random'))
    parser.add_argument('--modes', nargs='+', default=['train', 'eval'], choices=('train', 'eval'))
    parser.add_argument('--timm-models', nargs='+', default=['mobilenetv3_large_100', 'resnet50'])
    parser.add_argument('--no-reference', action='store_true', help='leave the reference implementation out')
    parser.add_argument('--no-ps-step', action='store_true')
    parser.add_argument('--quick', action='store_true', help='one warm-up and one timed round per case (smoke run)')
    parser.add_argument('--json', default='gpu_benchmark.json', help='where the table is written as JSON')
    parser.add_argument('--output', default='/tmp/ofa_timm_gpu_bench', help='scratch folder of the PS trainer')
    args = parser.parse_args(argv)
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        parser.error('no CUDA device here; pass --device cpu for a smoke run')
    bench = Bench(args)
    env = environment(bench)
    print(', '.join(f'{k} {v}' for k, v in env.items()), flush=True)
    torch.backends.cudnn.benchmark = True
    with steady_allocator():  # CPU runs only; CUDA's caching allocator is steady already
        for name in args.spaces:
            print(f'{name}:', flush=True)
            overhead(bench, build_space(name, args.res, reference=not args.no_reference))
        if not args.no_ps_step:
            print('PS step:', flush=True)
            ps_step(bench)
        if args.timm_models:
            print('timm static models:', flush=True)
            timm_baseline(bench)
    print()
    for line in format_table(bench.rows):
        print(line)
    met = [r.met for r in bench.rows if r.met is not None]
    print(f'\n{sum(met)} of {len(met)} targets met; worst overhead '
          f'{max((r.value for r in bench.rows if r.case.startswith("overhead")), default=float("nan")):.3f}')
    result = {'environment': env, 'rows': [dict(asdict(r), met=r.met) for r in bench.rows]}
    with open(args.json, 'w') as f:
        json.dump(result, f, indent=1)
    print(f'written to {args.json}')
    return result


if __name__ == '__main__':
    main()
