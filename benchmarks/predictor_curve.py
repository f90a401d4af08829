"""How many evaluated subnets does the accuracy predictor need? Held-out Spearman and RMSE against the size of the
accuracy dataset, on the digits supernet of ``ofa-timm demo``.

The demo's supernet is trained (or reused from ``--work``) with the demo's own settings. Then ``--max`` random subnets
plus ``--held-out`` others are BN-recalibrated and evaluated on the validation split (the demo's, with its test half
held out and unused here). For each size n, predictors are fitted on the first n subnets of ``--repeats`` shuffles of
the pool, with every fitted row used for training, and scored on the same held-out subnets; the table gives the
mean and the spread over the shuffles.

Usage: python benchmarks/predictor_curve.py [--sizes 25 50 100 200 400] [--held-out 100] [--repeats 3]
       [--work /tmp/predictor_curve] [--results docs/search.md]
"""
import argparse
import re
import statistics
import time
from pathlib import Path

import numpy as np

import ofa_timm  # noqa: F401  registers the ofa_* models
from ofa_timm.example_data import make_digits_dataset
from ofa_timm.pipeline import demo_config, run
from ofa_timm.pipeline.data import load_splits
from ofa_timm.search import FitConfig, build_accuracy_dataset, fit_predictor, load_supernet, read_accuracy_dataset
from ofa_timm.search.predictor import sample_subnets, spearman
from ofa_timm.training import DataConfig, SubnetEvaluator

ROOT = Path(__file__).resolve().parents[1]
MARKERS = ('<!-- predictor_curve:begin -->', '<!-- predictor_curve:end -->')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--sizes', type=int, nargs='+', default=[25, 50, 100, 200, 400])
    parser.add_argument('--held-out', type=int, default=100)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--work', default='/tmp/predictor_curve')
    parser.add_argument('--results', default=str(ROOT / 'docs' / 'search.md'),
                        help="Markdown file whose predictor_curve section is replaced ('' to only print)")
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    start = time.time()
    work = Path(args.work)
    size = 32
    root = make_digits_dataset(work / 'data', val_per_class=100, image_size=size, seed=args.seed)
    config = demo_config(root, work / 'run', size, seed=args.seed)
    train = config.train
    run(config, until='train')  # the demo's supernet (reused when the work folder holds it)
    supernet = load_supernet(config.model, work / 'run' / 'train' / 'supernet.safetensors').eval()
    splits = load_splits(DataConfig(str(root), image_size=size), None, config.test_fraction, args.seed)
    evaluator = SubnetEvaluator(splits.calib, splits.val, train.calib_images, 64, args.seed)
    space = supernet.space
    n_pool = max(args.sizes)
    subnets = sample_subnets(space, n_pool + args.held_out, args.seed + 1)
    path = work / 'curve.jsonl'
    build_accuracy_dataset(supernet, None, None, path, subnets=subnets, model=config.model,
                           evaluate=lambda s: evaluator(supernet, s))
    codes, top1 = read_accuracy_dataset(path, space)
    held_codes, held_top1 = codes[n_pool:], top1[n_pool:]
    pool_codes, pool_top1 = codes[:n_pool], top1[:n_pool]
    rows = []
    for n in args.sizes:
        scores = []
        for r in range(args.repeats):
            order = np.random.default_rng(r).permutation(n_pool)[:n]
            predictor, _ = fit_predictor(space, pool_codes[order], pool_top1[order],
                                         FitConfig(val_fraction=0.0, seed=r))
            pred = predictor.predict(held_codes)
            scores.append((spearman(pred, held_top1), float(np.sqrt(np.mean((pred - held_top1) ** 2)))))
        rho = [s[0] for s in scores]
        rmse = [s[1] for s in scores]
        rows.append((n, statistics.mean(rho), min(rho), max(rho), statistics.mean(rmse)))
        print(f'n={n}: Spearman {rows[-1][1]:.3f} ({rows[-1][2]:.3f}-{rows[-1][3]:.3f}), RMSE {rows[-1][4]:.2f}',
              flush=True)
    text = '\n'.join([
        f'`python benchmarks/predictor_curve.py --sizes {" ".join(map(str, args.sizes))}` '
        f'({(time.time() - start) / 60:.1f} minutes on the 2-core machine): '
        f"the supernet of `ofa-timm demo` (`{config.model}`, digits, resolutions 24/28/32); {n_pool + args.held_out} "
        f'random subnets BN-recalibrated on {train.calib_images} training images and evaluated on the '
        f'{len(splits.val)} validation images (top-1 {top1.min():.1f}-{top1.max():.1f}%, std {top1.std():.2f} '
        f'points); predictors fitted on the first n of {args.repeats} shuffles of {n_pool}, scored on the same '
        f'{args.held_out} held-out subnets.', '',
        '| subnets evaluated (n) | held-out Spearman, mean (min-max) | held-out RMSE (points) |', '|---:|---|---:|']
        + [f'| {n} | {m:.3f} ({lo:.3f}-{hi:.3f}) | {e:.2f} |' for n, m, lo, hi, e in rows])
    print(text)
    if args.results:
        path = Path(args.results)
        doc = path.read_text() if path.is_file() else ''
        begin, end = MARKERS
        block = f'{begin}\n{text}\n{end}'
        pattern = re.compile(re.escape(begin) + '.*?' + re.escape(end), re.S)
        doc = pattern.sub(lambda _: block, doc) if pattern.search(doc) else doc.rstrip('\n') + '\n\n' + block + '\n'
        path.write_text(doc)
        print(f'Wrote {path}')


if __name__ == '__main__':
    main()
