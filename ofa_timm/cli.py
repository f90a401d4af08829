"""The ``ofa-timm`` command line."""
import argparse
import sys
import time
from pathlib import Path
from typing import List, Optional

import torch

__all__ = ['main']


def _demo(args: argparse.Namespace) -> int:
    import timm
    from safetensors.torch import save_file

    from .elastic import elasticize

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    print(f'Converting timm {args.model} (random init, {args.num_classes} classes) into an elastic supernet')
    source = timm.create_model(args.model, num_classes=args.num_classes).eval()
    supernet = elasticize(source).eval()
    space = supernet.space
    print(f'  search space: {space.size():.3e} subnets over {len(space.stages)} elastic stages, '
          f'resolutions {space.resolutions[0]}..{space.resolutions[-1]}')
    x = torch.randn(1, 3, args.resolution, args.resolution)
    with torch.no_grad():
        max_err = (supernet(x) - source(x)).abs().max().item()
    print(f'  max subnet vs source model: max |diff| = {max_err:.2e}')

    rows = []
    for label, subnet in (('min', space.min()), ('random', space.sample(args.seed)), ('max', space.max())):
        start = time.perf_counter()
        model = supernet.extract(subnet)
        ms = (time.perf_counter() - start) * 1000
        supernet.set_active(subnet)
        with torch.no_grad():
            err = (model(x) - supernet(x)).abs().max().item()
        params = sum(p.numel() for p in model.parameters()) / 1e6
        rows.append((label, subnet, params, ms, err))
        if label == 'random':
            save_file(model.state_dict(), str(out / 'subnet.safetensors'))
            subnet.to_json(out / 'subnet.json')
    print(f'  {"subnet":8s} {"depths":18s} {"params(M)":>9s} {"extract(ms)":>11s} {"|supernet-extracted|":>21s}')
    for label, subnet, params, ms, err in rows:
        print(f'  {label:8s} {str(list(subnet.depths)):18s} {params:9.2f} {ms:11.1f} {err:21.2e}')
    print(f'Exported the random subnet to {out}/subnet.safetensors with its spec {out}/subnet.json')
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='ofa-timm', description='Once-for-All elastic supernets for timm.')
    sub = parser.add_subparsers(dest='command', required=True)
    demo = sub.add_parser('demo', help='convert a timm model, extract and check subnets, export one')
    demo.add_argument('--model', default='mobilenetv3_large_100', help='timm MobileNetV3 model name')
    demo.add_argument('--num-classes', type=int, default=10)
    demo.add_argument('--resolution', type=int, default=128, help='input resolution for the checks')
    demo.add_argument('--output', default='ofa_timm_demo', help='folder for the exported subnet')
    demo.add_argument('--seed', type=int, default=0)
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        print(f'ofa-timm {args.command}: error: {e}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
