"""Elastic MobileNetV3 benchmarks, measured side by side in one run.

Reports ratios, not absolute times (shared machines are noisy):
  * supernet set to a subnet vs the same subnet extracted as a static timm model: eval forward and train step,
    for MobileNetV3 and ResNet;
  * supernet at its max config vs the source timm model;
  * subnet extraction time, ours vs the reference implementation's ``get_active_subnet`` for the same subnets of
    the canonical w1.2 space (and absolute milliseconds, the issue's target being <= 30 ms on CPU).

Usage: python benchmarks/bench_elastic.py [--batch 8] [--res 160] [--repeats 15] [--device cpu] [--models ...]
"""
import argparse
import statistics
import time
from typing import Callable, Dict, List

import timm
import torch

import ofa_timm
from ofa_timm.elastic import convert_ofa_state_dict, ofa_mobilenetv3


def interleaved(fns: Dict[str, Callable[[], object]], repeats: int, warmup: int = 3, sync=lambda: None) -> Dict[str, float]:
    """Median seconds per call of each function, calls interleaved so drifts in machine load hit all equally."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync()
    times: Dict[str, List[float]] = {k: [] for k in fns}
    names = list(fns)
    for i in range(repeats):
        for name in (names if i % 2 == 0 else names[::-1]):  # alternate the order: no position bias
            fn = fns[name]
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def train_step(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def step():
        model.zero_grad(set_to_none=True)
        model(x).logsumexp(1).mean().backward()
    return step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--res', type=int, default=160)
    parser.add_argument('--repeats', type=int, default=15)
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--models', nargs='+', default=['mobilenetv3_large_100', 'resnet50d'])
    args = parser.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    torch.manual_seed(0)

    for model_name in args.models:
        print(f'== {model_name}: supernet-at-subnet vs extracted static subnet '
              f'(batch {args.batch}, {args.res}px, {device}) ==')
        source = timm.create_model(model_name).to(device)
        supernet = ofa_timm.elasticize(source).to(device)
        x = torch.randn(args.batch, 3, args.res, args.res, device=device)
        subnets = {'max': supernet.space.max(), 'min': supernet.space.min(), 'random': supernet.space.sample(0)}
        print(f'{"subnet":8s} {"eval fwd ratio":>15s} {"train step ratio":>17s}')
        for label, subnet in subnets.items():
            supernet.set_active(subnet)
            static = supernet.extract(subnet)
            with torch.no_grad():
                supernet.eval(), static.eval()
                fwd = interleaved({'super': lambda: supernet(x), 'static': lambda: static(x)}, args.repeats, sync=sync)
            supernet.train(), static.train()
            step = interleaved({'super': train_step(supernet, x), 'static': train_step(static, x)}, args.repeats,
                               sync=sync)
            print(f'{label:8s} {fwd["super"] / fwd["static"]:15.3f} {step["super"] / step["static"]:17.3f}')
        supernet.set_active(None)
        supernet.eval(), source.eval()
        with torch.no_grad():
            r = interleaved({'super': lambda: supernet(x), 'source': lambda: source(x)}, args.repeats, sync=sync)
        print(f'max config vs source timm model, eval fwd: {r["super"] / r["source"]:.3f}')
        t = interleaved({'extract': lambda: supernet.extract(supernet.space.max())}, args.repeats)['extract']
        print(f'max subnet extraction: {t * 1e3:.1f} ms\n')

    print('\n== subnet extraction on CPU, canonical OFA MobileNetV3 w1.2 ==')
    try:
        from ofa.imagenet_classification.elastic_nn.networks import OFAMobileNetV3
    except ImportError:
        OFAMobileNetV3 = None
    ours = ofa_mobilenetv3(1.2).eval()
    ref = None
    if OFAMobileNetV3 is not None:
        ref = OFAMobileNetV3(width_mult=1.2, ks_list=[3, 5, 7], expand_ratio_list=[3, 4, 6], depth_list=[2, 3, 4],
                             dropout_rate=0).eval()
        ours.load_state_dict(convert_ofa_state_dict(ref.state_dict()))
    print(f'{"subnet":8s} {"ours (ms)":>10s} {"reference (ms)":>15s} {"ours/ref":>9s}')
    for label, subnet in (('min', ours.space.min()), ('random', ours.space.sample(0)), ('max', ours.space.max())):
        fns = {'ours': lambda: ours.extract(subnet)}
        if ref is not None:
            def ref_extract(s=subnet):
                ref.set_active_subnet(ks=list(s.kernels), e=[int(e) for e in s.expands], d=list(s.depths))
                return ref.get_active_subnet(preserve_weight=True)
            fns['ref'] = ref_extract
        t = interleaved(fns, args.repeats)
        ref_ms = f'{t["ref"] * 1e3:15.1f}' if 'ref' in t else f'{"n/a":>15s}'
        ratio = f'{t["ours"] / t["ref"]:9.3f}' if 'ref' in t else f'{"n/a":>9s}'
        print(f'{label:8s} {t["ours"] * 1e3:10.1f} {ref_ms} {ratio}')


if __name__ == '__main__':
    main()
