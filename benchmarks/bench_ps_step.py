"""One progressive-shrinking step against its ideal, measured side by side in one run.

PS step (``Trainer._train_step``): teacher forward once, then forward/backward of each of the step's subnets inside
the supernet (weights shared, gradients accumulated), then one optimizer step over the supernet.

Ideal: the same teacher forward, plus, for each of the same subnets extracted as a static timm model, one train step
(forward, the same CE + KD loss, backward, SGD step on that model's own parameters).

Usage (CPU default; on a GPU: --device cuda --amp bf16 --channels-last --batch 256 --res 224):
    python benchmarks/bench_ps_step.py [--model ofa_mbv3_w12] [--subnets 4] [--batch 16] [--res 128]
"""
import argparse
import statistics
import time
from typing import Callable, Dict, List

import timm
import torch

import ofa_timm  # noqa: F401  registers the ofa_* models
from ofa_timm.training import (
    Schedule, SeededDataset, Stage, StepSampler, TrainConfig, Trainer, classification_loss, distillation_loss)


def interleaved(fns: Dict[str, Callable[[], object]], repeats: int, sync: Callable[[], None]) -> Dict[str, float]:
    for fn in fns.values():
        fn(), fn()
    sync()
    times: Dict[str, List[float]] = {k: [] for k in fns}
    names = list(fns)
    for i in range(repeats):
        for name in (names if i % 2 == 0 else names[::-1]):
            start = time.perf_counter()
            fns[name]()
            sync()
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument('--model', default='ofa_mbv3_w12')
    parser.add_argument('--subnets', type=int, default=4)
    parser.add_argument('--batch', type=int, default=16)
    parser.add_argument('--res', type=int, default=128)
    parser.add_argument('--repeats', type=int, default=10)
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--amp', default='none', choices=('none', 'bf16', 'fp16'))
    parser.add_argument('--channels-last', action='store_true')
    args = parser.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    torch.manual_seed(0)

    supernet = timm.create_model(args.model, resolutions=(args.res,))
    stage = Stage('expand_2', 1, 1e-3, {'kernel': 'all', 'depth': 'all', 'expand': 'all'},
                  subnets_per_step=args.subnets)
    fake = torch.utils.data.TensorDataset(torch.zeros(args.batch, 3, 8, 8), torch.zeros(args.batch, dtype=torch.long))
    cfg = TrainConfig(output='/tmp/bench_ps_step', batch_size=args.batch, workers=0, amp=args.amp,
                      channels_last=args.channels_last, progress=False)
    trainer = Trainer(supernet, Schedule((stage,)), SeededDataset(fake), fake, fake, cfg, pretrained=True,
                      device=device)
    trainer._prepare_stage(stage)  # teacher, optimizer and scheduler of the stage, as a run creates them
    subnets = StepSampler(supernet.space, stage, seed=0).sample(0)
    images = torch.randn(args.batch, 3, args.res, args.res, device=device)
    targets = torch.randint(0, supernet.num_classes, (args.batch,), device=device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    images = images.contiguous(memory_format=memory_format)

    statics = [supernet.extract(s).to(device, memory_format=memory_format).train() for s in subnets]
    optims = [torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9, nesterov=True) for m in statics]
    teacher = trainer.teacher

    def ps_step():
        trainer._train_step(stage, subnets, images, targets)

    def ideal_step():
        with torch.no_grad(), trainer._autocast():
            t_logits = teacher(images)
        for model, opt in zip(statics, optims):
            opt.zero_grad(set_to_none=True)
            with trainer._autocast():
                logits = model(images)
                loss = classification_loss(logits, targets, 0.1) + distillation_loss(logits, t_logits)
            loss.backward()
            opt.step()

    t = interleaved({'ps': ps_step, 'ideal': ideal_step}, args.repeats, sync)
    print(f'{args.model}, {args.subnets} subnets, batch {args.batch}, {args.res}px, {device}, amp {args.amp}, '
          f'channels_last {args.channels_last}')
    print(f'PS step {t["ps"] * 1e3:.1f} ms, ideal {t["ideal"] * 1e3:.1f} ms, ratio {t["ps"] / t["ideal"]:.3f}')


if __name__ == '__main__':
    main()
