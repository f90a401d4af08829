"""Fine-tune an OFA subnet with timm's own training pieces.

Two modes:
  * default: extract the subnet as a stock timm model and fine-tune it;
  * ``--supernet``: fine-tune the elastic supernet with the subnet active (weights stay shared with all subnets).

Runs offline on a generated shapes dataset unless ``--data-dir`` points at an ImageFolder (``train/`` and
``validation/`` subfolders). ``--pretrained-file`` takes a run of ``ofa-timm train`` (its ``supernet.safetensors``):
the subnet starts from the trained supernet, classifier included. Example::

    python examples/finetune_subnet.py --model ofa_mobilenetv3_large_100 --subnet min --epochs 2
    python examples/finetune_subnet.py --data-dir DIR --pretrained-file runs/mbv3/supernet.safetensors --subnet min

The equivalent with timm's own ``train.py`` (add ``--device cpu`` on a machine without a GPU: its default is cuda)::

    python train.py --data-dir DIR --device-modules ofa_timm --model ofa_mobilenetv3_large_100 \
        --model-kwargs subnet=min --pretrained --pretrained-path runs/mbv3/supernet.safetensors
"""
import argparse
import tempfile
from pathlib import Path

import timm
import torch
from timm.data import create_dataset, create_transform, resolve_model_data_config
from timm.models import load_checkpoint
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, accuracy

import ofa_timm  # noqa: F401  registers the ofa_* models
from ofa_timm.example_data import make_shapes_dataset


def evaluate(model: torch.nn.Module, loader: torch.utils.data.DataLoader) -> float:
    model.eval()
    correct, total = 0.0, 0
    with torch.no_grad():
        for images, targets in loader:
            correct += accuracy(model(images), targets, topk=(1,))[0].item() * images.shape[0] / 100
            total += images.shape[0]
    return 100 * correct / max(total, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default='ofa_mobilenetv3_large_100')
    parser.add_argument('--subnet', default='min', help="'max', 'min' or a subnet JSON file")
    parser.add_argument('--supernet', action='store_true', help='fine-tune the supernet with the subnet active')
    parser.add_argument('--data-dir', default=None, help='ImageFolder root with train/ and validation/')
    parser.add_argument('--pretrained-file', default=None, help='local weights for pretrained_cfg_overlay')
    parser.add_argument('--epochs', type=int, default=2)
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--lr', type=float, default=0.02)
    parser.add_argument('--img-size', type=int, default=64)
    parser.add_argument('--output', default=None)
    args = parser.parse_args()

    work = Path(args.output or tempfile.mkdtemp(prefix='ofa_finetune_'))
    data_dir = Path(args.data_dir) if args.data_dir else make_shapes_dataset(work / 'shapes')
    num_classes = len([p for p in (data_dir / 'train').iterdir() if p.is_dir()])

    pretrained = dict(pretrained=True, pretrained_cfg_overlay=dict(file=args.pretrained_file)) \
        if args.pretrained_file else {}
    if args.supernet:
        model = timm.create_model(args.model, num_classes=num_classes, **pretrained)
        model.set_active(args.subnet)
    else:
        model = timm.create_model(args.model, num_classes=num_classes, subnet=args.subnet, **pretrained)
    print(f'{type(model).__name__}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, '
          f'{model.num_classes} classes')

    data_config = resolve_model_data_config(model)
    data_config['input_size'] = (3, args.img_size, args.img_size)
    train_set = create_dataset('', root=str(data_dir), split='train', is_training=True,
                               transform=create_transform(**data_config, is_training=True))
    val_set = create_dataset('', root=str(data_dir), split='validation', transform=create_transform(**data_config))
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, shuffle=True)
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=args.batch_size)

    print(f'start: val top-1 {evaluate(model, val_loader):.1f}%')
    optimizer = create_optimizer_v2(model, 'sgd', lr=args.lr, weight_decay=4e-5, momentum=0.9)
    scheduler, num_epochs = create_scheduler_v2(optimizer, 'cosine', num_epochs=args.epochs, warmup_epochs=0)
    ema = ModelEmaV3(model, decay=0.9)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    for epoch in range(num_epochs):
        model.train()
        for images, targets in train_loader:
            loss = loss_fn(model(images), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            ema.update(model)
        scheduler.step(epoch + 1)
        print(f'epoch {epoch}: loss {loss.item():.3f}  val top-1 {evaluate(model, val_loader):.1f}%  '
              f'EMA top-1 {evaluate(ema.module, val_loader):.1f}%')

    ckpt = work / 'finetuned.pth'
    torch.save({'state_dict': model.state_dict()}, ckpt)
    # Reload through timm's checkpoint helper into a fresh model of the same architecture
    fresh = timm.create_model(args.model, num_classes=num_classes, **({} if args.supernet else {'subnet': args.subnet}))
    load_checkpoint(fresh, str(ckpt))
    if args.supernet:
        fresh.set_active(args.subnet)
    print(f'reloaded {ckpt}: val top-1 {evaluate(fresh, val_loader):.1f}%')


if __name__ == '__main__':
    main()
