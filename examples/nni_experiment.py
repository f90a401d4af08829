"""OFA progressive shrinking through NNI, then an NNI search over the trained supernet.

1. ``NasExperiment(SupernetSpace(supernet), Classification(...), OFAProgressiveShrinking(...)).run()`` trains the
   supernet with the progressive-shrinking schedule (a tiny one here).
2. ``NasExperiment(space_with_budget, subnet_evaluator(...), RegularizedEvolution(...)).run()`` searches the trained
   supernet for the most accurate subnet under a FLOPs budget; each candidate is BN-recalibrated and evaluated.
3. The best subnet is written as JSON, which ``timm.create_model(..., subnet=path)`` reads.

Runs offline on a generated shapes dataset, in-process (no nnictl, no web server), in a few minutes on 2 CPU cores::

    python examples/nni_experiment.py --output /tmp/ofa_nni
"""
import argparse
import logging
from pathlib import Path

import timm
import torch
import torchvision.transforms as T
from torchvision.datasets import ImageFolder

import ofa_timm  # noqa: F401  registers the ofa_* models
from ofa_timm.example_data import make_shapes_dataset
from ofa_timm.plugins.nni import OFAProgressiveShrinking, SupernetSpace, quiet_nni_import, run_experiment
from ofa_timm.plugins.nni.search import flops_cost, save_top_subnets, search_config, subnet_evaluator

with quiet_nni_import():
    from nni.nas.evaluator.pytorch import Classification, DataLoader
    from nni.nas.experiment import NasExperiment, NasExperimentConfig
    from nni.nas.strategy import RegularizedEvolution

MODEL = 'ofa_mobilenetv3_small_100'


class NesterovSGD(torch.optim.SGD):
    """SGD with Nesterov momentum: the optimizer the 'demo' schedule's learning rates are sized for."""

    def __init__(self, params, lr: float, weight_decay: float = 0.):
        super().__init__(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--output', default='ofa_nni_example')
    parser.add_argument('--epochs-scale', type=float, default=0.5, help="scale of the 'demo' schedule")
    parser.add_argument('--trials', type=int, default=12, help='subnets the evolution evaluates')
    parser.add_argument('--image-size', type=int, default=32)
    args = parser.parse_args()
    out = Path(args.output)
    torch.manual_seed(0)
    # Lightning's banners at every Trainer it builds (GPU/TPU availability, a cloud-logger tip) are not this example's
    logging.getLogger('pytorch_lightning').setLevel(logging.WARNING)

    root = make_shapes_dataset(out / 'data', num_classes=4, train_per_class=32, val_per_class=16,
                               image_size=args.image_size)
    tf = T.Compose([T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    train_set, val_set = ImageFolder(root / 'train', tf), ImageFolder(root / 'validation', tf)
    resolutions = (args.image_size - 8, args.image_size)
    supernet = timm.create_model(MODEL, num_classes=len(train_set.classes), resolutions=resolutions)

    # 1. Progressive shrinking as an NNI one-shot strategy
    space = SupernetSpace(supernet)
    strategy = OFAProgressiveShrinking('demo', epochs_scale=args.epochs_scale, calib_images=64)
    epochs = strategy.total_epochs(space)
    print(f'[1/3] Progressive shrinking through NNI: {len(space.labels)} choices, {epochs} epochs, stages '
          f'{[s.name for s in strategy.stages_for(space).stages]}')
    evaluator = Classification(
        train_dataloaders=DataLoader(train_set, batch_size=32, shuffle=True),
        val_dataloaders=DataLoader(val_set, batch_size=64), max_epochs=epochs, num_classes=len(train_set.classes),
        learning_rate=5e-2, optimizer=NesterovSGD, export_onnx=False, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(out / 'lightning'))
    run_experiment(NasExperiment(space, evaluator, strategy, NasExperimentConfig('sequential', 'raw')),
                   out / 'nni-experiments')
    for r in strategy.oneshot_module.last_validation:
        print(f"      {r['subnet']:28s} top-1 {r['top1']:5.1f}%")
    torch.save({'state_dict': supernet.state_dict()}, out / 'supernet.pth')

    # 2. Multi-trial search over the trained supernet under a FLOPs budget
    cost = flops_cost(supernet)
    budget = (cost(supernet.space.min()) + cost(supernet.space.max())) / 2
    search_space = SupernetSpace(supernet, cost=cost, max_cost=budget)
    calib = torch.utils.data.DataLoader(ImageFolder(root / 'train', tf), batch_size=64)
    val = torch.utils.data.DataLoader(val_set, batch_size=64)
    print(f'[2/3] Regularized evolution over {args.trials} subnets under {budget / 1e6:.2f} MFLOPs')
    exp = NasExperiment(search_space, subnet_evaluator(calib, val, calib_images=64),
                        RegularizedEvolution(population_size=4, sample_size=2, seed=0), search_config(args.trials))
    run_experiment(exp, out / 'nni-experiments')
    best_path = save_top_subnets(exp, search_space, out / 'results', top_k=1)[0]

    # 3. The result is an ordinary timm model
    model = timm.create_model(MODEL, num_classes=len(train_set.classes), resolutions=resolutions, subnet=best_path,
                              pretrained=True, pretrained_cfg_overlay=dict(file=str(out / 'supernet.pth'),
                                                                           num_classes=len(train_set.classes)))
    best = ofa_timm.Subnet.from_json(best_path)
    print(f'[3/3] Best subnet ({cost(best) / 1e6:.2f} MFLOPs <= {budget / 1e6:.2f}): {best.to_dict()}')
    print(f'      {best_path} -> timm.create_model({MODEL!r}, subnet=...) = {type(model).__name__}, '
          f'{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters')


if __name__ == '__main__':
    main()
