"""Evidence for the EfficientNet-builder families: one markdown table row per timm model, measured side by side.

Per model:
  * space size: architectures (depth x kernel x expand choices) and input resolutions;
  * max vs source: max absolute difference between the supernet at its max subnet and the source timm model (eval);
  * super vs extracted: max relative difference between the supernet at its max subnet and that subnet extracted;
  * extraction time of the max and the min subnet (median);
  * elastic overhead: supernet set to a subnet / the same subnet extracted as a stock timm model, eval forward, at
    the max, the min and a random subnet (ratio of medians of interleaved calls).

Models are randomly initialised with random batch-norm statistics (weights do not change the timings, and non-trivial
statistics make the differences meaningful). Every forward runs at ``--res`` whatever the subnet's resolution.

Everything runs under ``ofa_timm._malloc.steady_allocator`` (glibc's thresholds pinned, see there), as the CPU suite
does.

Usage: python benchmarks/families.py [--batch 8] [--res 160] [--repeats 15] [--models ...]
"""
import argparse
import platform
from typing import Callable, Dict

import timm
import torch

import ofa_timm
from ofa_timm._malloc import steady_allocator
from ofa_timm.testing import randomize_bn
from harness import Interleaved

MODELS = [
    'efficientnet_b0', 'efficientnet_b1', 'efficientnet_b3', 'efficientnet_lite0', 'mobilenetv2_100', 'mobilenetv2_140',
    'mnasnet_100', 'fbnetc_100', 'spnasnet_100', 'tinynet_a', 'lcnet_100', 'mobilenetv4_conv_small',
    'mobilenetv3_large_100']


def interleaved(fns: Dict[str, Callable[[], object]], repeats: int) -> Dict[str, float]:
    timer = Interleaved(fns)
    timer.warmup(3)
    return timer.run(repeats)


@torch.no_grad()
def row(name: str, batch: int, res: int, repeats: int) -> str:
    torch.manual_seed(0)
    source = randomize_bn(timm.create_model(name)).eval()
    supernet = ofa_timm.elasticize(source).eval()
    space = supernet.space
    x = torch.randn(batch, 3, res, res)
    expected = source(x)
    max_vs_source = (supernet(x) - expected).abs().max().item()
    extracted = supernet.extract('max')
    out = supernet(x)
    super_vs_extracted = ((out - extracted(x)).abs().max() / out.abs().max()).item()
    times = interleaved({k: (lambda s=s: supernet.extract(s)) for k, s in (('max', 'max'), ('min', 'min'))}, repeats)
    overhead = {}
    for label, subnet in (('max', space.max()), ('min', space.min()), ('random', space.sample(0))):
        supernet.set_active(subnet)
        static = supernet.extract(subnet).eval()
        t = interleaved({'super': lambda: supernet(x), 'static': lambda: static(x)}, repeats)
        overhead[label] = t['super'] / t['static']
    supernet.set_active(None)
    archs = space.size() // max(1, len(space.resolutions))
    return (f'| {name} | {type(source).__name__} | {archs:.2e} x {len(space.resolutions)} | {max_vs_source:.1g} | '
            f'{super_vs_extracted:.1g} | {times["max"] * 1e3:.1f} | {times["min"] * 1e3:.1f} | '
            f'{overhead["max"]:.3f} | {overhead["min"]:.3f} | {overhead["random"]:.3f} |')


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--res', type=int, default=160)
    parser.add_argument('--repeats', type=int, default=15)
    parser.add_argument('--models', nargs='+', default=MODELS)
    args = parser.parse_args()
    with steady_allocator() as pinned:
        run(args, pinned)


def run(args: argparse.Namespace, pinned: bool) -> None:
    print(f'batch {args.batch}, {args.res}px, CPU ({torch.get_num_threads()} threads, {platform.machine()}), '
          f'torch {torch.__version__}, timm {timm.__version__}, {args.repeats} interleaved repeats, '
          f'malloc thresholds pinned: {pinned}\n')
    print('| model | timm class | space (archs x resolutions) | max vs source (abs) | super vs extracted max (rel) '
          '| extract max (ms) | extract min (ms) | overhead max | overhead min | overhead random |')
    print('|---|---|---|---|---|---|---|---|---|---|')
    for name in args.models:
        print(row(name, args.batch, args.res, args.repeats), flush=True)


if __name__ == '__main__':
    main()
