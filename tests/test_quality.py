"""Training quality: the digits dataset, and a stage transition that keeps what the full stage learned."""
import json
import math
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image

import ofa_timm
from ofa_timm.example_data import make_digits_dataset
from ofa_timm.training import (
    PRESETS, DataConfig, Schedule, TrainConfig, Trainer, build_datasets, calibrate_bn, load_checkpoint,
    zero_init_residual)
from ofa_timm.training.report import plot_validation, read_metrics, validation_figure


def _counts(root: Path, split: str) -> Counter:
    return Counter({d.name: len(list(d.glob('*.png'))) for d in (root / split).iterdir() if d.is_dir()})


def _names(root: Path, split: str) -> set:
    return {p.name for p in (root / split).rglob('*.png')}


def test_digits_dataset_is_a_fixed_stratified_three_way_split(tmp_path):
    sklearn = pytest.importorskip('sklearn.datasets')
    per_class = Counter(str(t) for t in sklearn.load_digits().target)
    root = make_digits_dataset(tmp_path / 'a', val_per_class=5, test_per_class=7, image_size=16)
    assert _counts(root, 'validation') == Counter({str(c): 5 for c in range(10)})
    assert _counts(root, 'test') == Counter({str(c): 7 for c in range(10)})
    assert _counts(root, 'train') == Counter({c: n - 12 for c, n in per_class.items()})  # 1,677 = 1,797 - 120
    splits = {s: _names(root, s) for s in ('train', 'validation', 'test')}
    assert sum(map(len, splits.values())) == 1797 == len(set().union(*splits.values()))  # disjoint, all used
    with Image.open(next((root / 'train' / '3').glob('*.png'))) as img:
        assert img.size == (16, 16)
    again = make_digits_dataset(tmp_path / 'b', val_per_class=5, test_per_class=7, image_size=16)
    assert {s: _names(again, s) for s in splits} == splits  # fixed by the seed
    other = make_digits_dataset(tmp_path / 'b', val_per_class=5, image_size=16, seed=1)
    assert _names(other, 'validation') != splits['validation']  # rewritten, no stale files
    assert not (other / 'test').exists() and sum(_counts(other, 'validation').values()) == 50
    with pytest.raises(ValueError, match='val_per_class'):
        make_digits_dataset(tmp_path / 'c', val_per_class=100, test_per_class=71)


def test_zero_init_residual_makes_blocks_identities():
    torch.manual_seed(0)
    sn = timm.create_model('ofa_mobilenetv3_small_100', num_classes=4)
    n = zero_init_residual(sn)
    skips = [m for m in sn.modules() if getattr(m, 'has_skip', False)]
    assert n == len(skips) > 0
    block = skips[0].eval()
    x = torch.randn(2, block.bn3.num_features if hasattr(block, 'bn3') else block.bn2.num_features, 8, 8)
    with torch.no_grad():
        assert torch.equal(block(x), x)
    resnet = timm.create_model('ofa_resnet26d', num_classes=4)
    assert zero_init_residual(resnet) == sum(1 for m in resnet.modules() if hasattr(m, 'zero_init_last'))


# --- a stage transition ---------------------------------------------------------------------------------------------
def _max_subnet_loss(trainer: Trainer, images: torch.Tensor, targets: torch.Tensor) -> float:
    """Cross entropy of the BN-recalibrated max subnet on fixed training images, as evaluation sees it."""
    model = trainer.supernet.extract('max')
    calibrate_bn(model, [images], num_images=len(images))
    with torch.no_grad():
        return F.cross_entropy(model.eval()(images), targets).item()


@pytest.mark.parametrize('fresh,keeps', [
    (False, True),
    # The old recipe's failure, as a control: a fresh optimizer straight at the full stage's peak lr.
    (True, False),
], ids=['demo-recipe', 'fresh-optimizer-at-full-lr'])
def test_stage_transition_does_not_reset_the_max_subnet(tmp_path, fresh, keeps):
    pytest.importorskip('sklearn')
    root = make_digits_dataset(tmp_path / 'digits', val_per_class=150, image_size=16)  # 297 training images
    train, val, calib, _ = build_datasets(DataConfig(str(root), image_size=16, scale=(0.8, 1.0), hflip=0.), seed=0)
    torch.manual_seed(0)
    supernet = ofa_timm.elasticize(timm.create_model('mobilenetv3_small_050', num_classes=10), resolutions=(12, 16))
    full, kernel = PRESETS['demo'].schedule(supernet.space).stages[:2]  # the 'demo' recipe's first transition
    assert kernel.name == 'kernel'
    if fresh:
        kernel = replace(kernel, lr=full.lr, warmup_epochs=0., carry_optimizer=False)
    # A longer full stage at a lower lr, so that on these 297 images it surely learns first.
    schedule = Schedule((replace(full, epochs=20, lr=0.4 * full.lr), kernel))
    config = TrainConfig(output=str(tmp_path / 'run'), batch_size=16, workers=0, calib_images=16, progress=False,
                         val_every=100, val_resolutions=[16])
    images, targets = next(iter(torch.utils.data.DataLoader(calib, batch_size=64)))
    trainer = Trainer(supernet, schedule, train, val, calib, config)
    full_steps = trainer.stage_steps(schedule.stages[0])
    trainer.run(stop_after=full_steps)
    before = _max_subnet_loss(trainer, images, targets)
    chance = math.log(10)
    assert before < 0.7 * chance, f'the full stage did not learn (loss {before:.3f}, chance {chance:.3f})'
    trainer = Trainer(supernet, schedule, train, val, calib, config)
    trainer.resume()
    trainer.run(stop_after=full_steps + 3)  # three steps into the kernel stage
    assert load_checkpoint(tmp_path / 'run' / 'last.pth')['position'] == {
        'stage': 1, 'step': 3, 'global_step': full_steps + 3, 'validate': False}
    after = _max_subnet_loss(trainer, images, targets)
    margin = 0.1 * chance
    assert (after < before + margin) == keeps, f'max subnet loss {before:.3f} -> {after:.3f} across the transition'


def test_plot_names_each_subnet_and_draws_the_mean(tmp_path):
    records = []
    for stage, labels, step in (('full', ['max@32', 'max@24'], 10), ('kernel', ['k=max@32', 'k=min@24'], 20),
                                ('depth_1', ['k=max,d=max@32', 'k=min,d=min@24'], 30)):
        records.append({'type': 'train', 'stage': stage, 'step': 5, 'global_step': step - 5, 'loss': 1.0})
        for i, label in enumerate(labels):
            records.append({'type': 'val', 'stage': stage, 'global_step': step, 'subnet': label, 'top1': 50. + i})
        records.append({'type': 'val_mean', 'stage': stage, 'global_step': step, 'top1': 50.5,
                        'names': {'k': 'kernel', 'd': 'depth'}})
    path = tmp_path / 'metrics.jsonl'
    path.write_text('\n'.join(json.dumps(r) for r in records))
    plot_validation(read_metrics(path), tmp_path / 'val.png')
    assert (tmp_path / 'val.png').is_file()
    fig = validation_figure(read_metrics(path))
    ax = fig.axes[0]
    labels = [text.get_text() for text in ax.get_legend().get_texts()]
    # The max subnet is one line across stages; corners are named over every dimension of the run.
    assert 'max @ 32 px' in labels and 'max @ 24 px' in labels and 'min @ 24 px' in labels
    assert 'k=min d=max @ 24 px' in labels
    assert ax.get_legend().get_title().get_text() == 'subnet (k/d: kernel/depth)'
    mean = [line for line in ax.get_lines() if line.get_label() == 'mean of the validated subnets']
    assert mean and mean[0].get_linewidth() >= 3
    assert [len(line.get_xdata()) for line in ax.get_lines() if line.get_label() == 'max @ 32 px'] == [3]
