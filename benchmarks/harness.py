"""What the benchmarks time, defined once for the CPU suite (``pytest benchmarks/``) and ``benchmarks/gpu.py``.

* :func:`build_space`: a supernet under test, the timm model it was converted from, and the reference
  implementation's supernet (PyPI ``ofa``) holding the same weights, where the reference has that space.
* :func:`train_step` / :func:`eval_forward`: the unit of work compared between a supernet set to a subnet and the
  extracted static subnet.
* :class:`PSStep`: one progressive-shrinking step of the package, its ideal (teacher forward + one train step of each
  subnet extracted as a static model) and the reference's own step, all on the same subnets and weights.
* :class:`Interleaved`: runs functions in turns (A, B, A, B, ...; the order flips every round) so drifts in machine
  load hit every function alike, and reports medians.
"""
import contextlib
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.optim import create_optimizer_v2

import ofa_timm
from ofa_timm.elastic import (
    ElasticSupernet, convert_ofa_resnet_state_dict, convert_ofa_state_dict, ofa_mobilenetv3, ofa_resnet50)
from ofa_timm.elastic.resnet import OFA_RESNET50_BASE_DEPTHS, OFA_RESNET_WIDTHS
from ofa_timm.space import Subnet
from ofa_timm.testing import assert_close
from ofa_timm.training import (
    Schedule, SeededDataset, Stage, StepSampler, TrainConfig, Trainer, classification_loss, distillation_loss)

try:
    from ofa.imagenet_classification.elastic_nn.networks import OFAMobileNetV3, OFAResNets
    from ofa.utils import cross_entropy_loss_with_soft_target, cross_entropy_with_label_smoothing
    HAS_REFERENCE = True
except ImportError:  # the reference is a dev dependency; without it the reference columns stay empty
    HAS_REFERENCE = False

__all__ = [
    'SPACES', 'SUBNETS', 'HAS_REFERENCE', 'Space', 'build_space', 'Interleaved', 'Precision', 'train_step',
    'eval_forward', 'PSStep', 'ps_step', 'assert_close', 'Row', 'format_row', 'format_table',
]

# Canonical OFA spaces (with the reference beside them) and timm models converted to supernets.
SPACES: Tuple[str, ...] = ('ofa_mbv3_w12', 'mobilenetv3_large_100', 'resnet50d', 'ofa_resnet50',
                           'vit_small_patch16_224', 'convnext_atto')
# Converted sources and their arguments at the benchmark's resolution (a transformer is built for its image size).
_CONVERTED = {'mobilenetv3_large_100': {}, 'resnet50d': {}, 'vit_small_patch16_224': {'img_size'},
              'convnext_atto': {}}
# Subnets of every space: the corners and three fixed random ones.
SUBNETS: Tuple[str, ...] = ('max', 'min', 'random0', 'random1', 'random2')
NUM_CLASSES = 1000


@dataclass
class Precision:
    """Device, autocast dtype and memory format shared by everything a run times."""
    device: torch.device
    amp: Optional[torch.dtype] = None
    channels_last: bool = False

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp)

    def sync(self) -> None:
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)

    def place(self, model: nn.Module) -> nn.Module:
        return model.to(self.device, memory_format=self.memory_format)

    def inputs(self, batch: int, res: int, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, 3, res, res, generator=g)
        y = torch.randint(0, NUM_CLASSES, (batch,), generator=g)
        return x.to(self.device).contiguous(memory_format=self.memory_format), y.to(self.device)


@dataclass
class Space:
    """A supernet under test, with what it is compared against."""
    name: str
    supernet: ElasticSupernet
    source: Optional[nn.Module] = None  # the timm model the supernet was converted from
    reference: Optional[nn.Module] = None  # the reference's supernet, same weights

    def subnet(self, which: str) -> Subnet:
        """``'max'``, ``'min'`` or ``'random<seed>'``."""
        if which.startswith('random'):
            return self.supernet.space.sample(int(which[len('random'):]))
        return self.supernet.space.resolve(which)

    def reference_kwargs(self, subnet: Subnet) -> Dict[str, Any]:
        """The reference's ``set_active_subnet`` arguments for ``subnet``."""
        if self.name == 'ofa_mbv3_w12':
            return dict(ks=list(subnet.kernels), e=[int(e) for e in subnet.expands], d=list(subnet.depths))
        # OFA-ResNet50: stem depth 2 keeps the residual stem conv, stage depths are offsets on the base depths, and
        # widths are indices into the width multipliers.
        d = [2 if subnet.depths[0] else 0] + [n - b for n, b in zip(subnet.depths[1:], OFA_RESNET50_BASE_DEPTHS)]
        return dict(d=d, e=list(subnet.expands), w=[OFA_RESNET_WIDTHS.index(w) for w in subnet.widths])

    def set_reference(self, subnet: Subnet) -> None:
        self.reference.set_active_subnet(**self.reference_kwargs(subnet))

    def extract_reference(self, subnet: Subnet) -> nn.Module:
        """The reference's extraction: ``set_active_subnet`` then ``get_active_subnet(preserve_weight=True)``."""
        self.set_reference(subnet)
        return self.reference.get_active_subnet(preserve_weight=True)


def build_space(name: str, res: int, reference: bool = True, seed: int = 0) -> Space:
    """Build a space on the CPU, its supernet's resolutions fixed to ``res``.

    Args:
        name: One of :data:`SPACES`.
        res: Input resolution (every subnet gets it, so a PS step never resizes).
        reference: Build the reference's supernet too, where it has the space and is installed.
        seed: Seed of the random initialisation.
    """
    torch.manual_seed(seed)
    if name in _CONVERTED:
        source = timm.create_model(name, num_classes=NUM_CLASSES, **{k: res for k in _CONVERTED[name]})
        return Space(name, ofa_timm.elasticize(source, resolutions=(res,)), source=source)
    ref = None
    if name == 'ofa_mbv3_w12':
        supernet = ofa_mobilenetv3(1.2, num_classes=NUM_CLASSES, resolutions=(res,))
        if reference and HAS_REFERENCE:
            ref = OFAMobileNetV3(
                n_classes=NUM_CLASSES, width_mult=1.2, ks_list=[3, 5, 7], expand_ratio_list=[3, 4, 6],
                depth_list=[2, 3, 4], dropout_rate=0)
            supernet.load_state_dict(convert_ofa_state_dict(ref.state_dict()))
    elif name == 'ofa_resnet50':
        supernet = ofa_resnet50(num_classes=NUM_CLASSES, resolutions=(res,))
        if reference and HAS_REFERENCE:
            ref = OFAResNets(
                n_classes=NUM_CLASSES, depth_list=[0, 1, 2], expand_ratio_list=[0.2, 0.25, 0.35],
                width_mult_list=[0.65, 0.8, 1.0], dropout_rate=0)
            supernet.load_state_dict(convert_ofa_resnet_state_dict(ref.state_dict()))
    else:
        raise ValueError(f'Unknown space {name!r}; known: {list(SPACES)}')
    return Space(name, supernet, reference=ref)


# --- results ---------------------------------------------------------------------------------------------------------
@dataclass
class Row:
    """One line of the summary table."""
    case: str
    value: Optional[float]  # None: not measured
    target: Optional[float] = None  # value <= target is met
    unit: str = 'x'  # 'x' (a ratio) or 'ms'
    reference: Optional[float] = None  # the reference implementation's figure for the same work
    note: str = ''

    @property
    def met(self) -> Optional[bool]:
        return None if self.value is None or self.target is None else self.value <= self.target


def _fmt(value: Optional[float], unit: str) -> str:
    if value is None:
        return '-'
    return f'{value:.3f}' if unit == 'x' else f'{value:.1f} {unit}'


def format_row(row: Row) -> str:
    """One row as a line, printed as its case finishes."""
    target = '' if row.target is None else f'<= {_fmt(row.target, row.unit)}'
    met = {None: '', True: 'met', False: 'NOT MET'}[row.met]
    ref = f'  reference {_fmt(row.reference, row.unit)}' if row.reference is not None else ''
    note = f'  ({row.note})' if row.note else ''
    return f'{row.case}: {_fmt(row.value, row.unit)} {target} {met}{ref}{note}'


def format_table(rows: Sequence[Row]) -> List[str]:
    """The summary table: each value next to its target and the reference's figure."""
    width = max(len(r.case) for r in rows)
    lines = [f'{"case":{width}s}  {"ours":>10s}  {"target":>10s}  {"met":>7s}  {"reference":>10s}']
    for r in rows:
        target = '-' if r.target is None else f'<= {_fmt(r.target, r.unit)}'
        met = {None: '-', True: 'yes', False: 'NO'}[r.met]
        lines.append(f'{r.case:{width}s}  {_fmt(r.value, r.unit):>10s}  {target:>10s}  {met:>7s}  '
                     f'{_fmt(r.reference, r.unit):>10s}' + (f'  {r.note}' if r.note else ''))
    return lines


# --- units of work ----------------------------------------------------------------------------------------------------
def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, precision: Precision) -> Callable[[], None]:
    """Forward, cross entropy, backward; gradients set to None first, as an optimizer loop does."""
    def step() -> None:
        model.zero_grad(set_to_none=True)
        with precision.autocast():
            loss = F.cross_entropy(model(x), y)
        loss.backward()
    return step


def eval_forward(model: nn.Module, x: torch.Tensor, precision: Precision) -> Callable[[], torch.Tensor]:
    def forward() -> torch.Tensor:
        with torch.no_grad(), precision.autocast():
            return model(x)
    return forward


class Interleaved:
    """Time functions in turns, A, B, A, B, ..., flipping the order every round so neither always goes first.

    Args:
        fns: Name -> function to time.
        sync: Called after each function before its clock stops (``torch.cuda.synchronize`` on a GPU).
    """

    def __init__(self, fns: Mapping[str, Callable[[], Any]], sync: Callable[[], None] = lambda: None):
        self.fns = dict(fns)
        self.sync = sync
        self.times: Dict[str, List[float]] = {k: [] for k in self.fns}
        self._rounds = 0

    def warmup(self, n: int) -> None:
        for _ in range(n):
            for fn in self.fns.values():
                fn()
        self.sync()

    def round(self) -> None:
        names = list(self.fns) if self._rounds % 2 == 0 else list(self.fns)[::-1]
        self._rounds += 1
        for name in names:
            start = time.perf_counter()
            self.fns[name]()
            self.sync()
            self.times[name].append(time.perf_counter() - start)

    def run(self, rounds: int) -> Dict[str, float]:
        for _ in range(rounds):
            self.round()
        return self.medians()

    def medians(self) -> Dict[str, float]:
        return {k: statistics.median(v) for k, v in self.times.items() if v}


# --- one progressive-shrinking step -----------------------------------------------------------------------------------
def ps_step(trainer: Trainer, stage: Stage, subnets: Sequence[Subnet], images: torch.Tensor,
            targets: torch.Tensor) -> float:
    """The package's progressive-shrinking step (teacher once, each subnet forward/backward, one optimizer step).

    The one place that calls into the trainer, so the benchmarks follow the step wherever it lives.
    """
    return trainer.train_step(stage, list(subnets), images, targets)


class PSStep:
    """One PS step of a space, its ideal and the reference's step, on the same subnets, batch and initial weights.

    * ``ours``: :func:`ps_step` on the supernet.
    * ``ideal``: the same teacher forward, then for each subnet extracted as a static timm model one train step with
      the same loss (label-smoothed CE + KD) and its own optimizer step.
    * ``reference``: the reference's training loop for the same subnets: teacher forward, then per subnet
      ``set_active_subnet``, forward, CE + KD, backward, then one optimizer step.

    Args:
        space: The space (its reference is used when it has one).
        batch: Images per step.
        res: Resolution (the space's only one).
        precision: Device, autocast and memory format.
        subnets_per_step: Subnets per step (4 in OFA's expand stage).
        output: Folder the trainer may write to.
    """
    LR = 1e-3

    def __init__(self, space: Space, batch: int, res: int, precision: Precision, subnets_per_step: int = 4,
                 output: str = '/tmp/ofa_timm_bench'):
        self.precision = p = precision
        supernet = space.supernet
        self.stage = Stage('expand_2', 1, self.LR, {'kernel': 'all', 'depth': 'all', 'expand': 'all'},
                           subnets_per_step=subnets_per_step)
        fake = torch.utils.data.TensorDataset(
            torch.zeros(batch, 3, 8, 8), torch.zeros(batch, dtype=torch.long))
        amp = {None: 'none', torch.bfloat16: 'bf16', torch.float16: 'fp16'}[p.amp]
        self.config = cfg = TrainConfig(
            output=output, batch_size=batch, workers=0, amp=amp, channels_last=p.channels_last, progress=False)
        self.trainer = Trainer(supernet, Schedule((self.stage,)), SeededDataset(fake), fake, fake, cfg,
                               pretrained=True, device=p.device)
        weights = {k: v.clone() for k, v in supernet.state_dict().items()}
        self.trainer.prepare_stage(self.stage)  # teacher, optimizer and scheduler, as a run creates them
        # Entering an expand stage sorts channels (once per stage, not per step): undo it, so that the reference's step
        # trains the same subnets of the same weights.
        supernet.load_state_dict(weights)
        self.subnets = StepSampler(supernet.space, self.stage, seed=0).sample(0)
        self.images, self.targets = p.inputs(batch, res)

        self.teacher = self.trainer.teacher
        self.statics = [p.place(supernet.extract(s)).train() for s in self.subnets]
        self.optimizers = [self._optimizer(m) for m in self.statics]

        self.space = space
        self.reference = None
        if space.reference is not None:
            self.reference = p.place(space.reference).train()
            self.reference_teacher = p.place(space.extract_reference(supernet.space.max())).eval()
            self.reference_teacher.requires_grad_(False)
            self.reference_optimizer = self._optimizer(self.reference)
            self.reference_subnets = [space.reference_kwargs(s) for s in self.subnets]

    def _optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        cfg = self.config
        return create_optimizer_v2(model, opt=cfg.opt, lr=self.LR, weight_decay=cfg.weight_decay,
                                   momentum=cfg.momentum)

    def ours(self) -> float:
        return ps_step(self.trainer, self.stage, self.subnets, self.images, self.targets)

    def ideal(self) -> float:
        p, cfg = self.precision, self.config
        with torch.no_grad(), p.autocast():
            teacher_logits = self.teacher(self.images)
        total = 0.
        for model, opt in zip(self.statics, self.optimizers):
            opt.zero_grad(set_to_none=True)
            with p.autocast():
                logits = model(self.images)
                loss = classification_loss(logits, self.targets, cfg.label_smoothing) + self.stage.kd_ratio * \
                    distillation_loss(logits, teacher_logits, cfg.kd_kind, cfg.kd_temperature)
            loss.backward()
            opt.step()
            total += loss.item()
        return total / len(self.statics)

    def reference_step(self) -> float:
        p, net = self.precision, self.reference
        with torch.no_grad(), p.autocast():
            soft_label = F.softmax(self.reference_teacher(self.images).float(), dim=1)
        self.reference_optimizer.zero_grad()
        total = 0.
        for kwargs in self.reference_subnets:
            net.set_active_subnet(**kwargs)
            with p.autocast():
                output = net(self.images).float()
                loss = cross_entropy_with_label_smoothing(output, self.targets, self.config.label_smoothing)
                loss = loss + self.stage.kd_ratio * cross_entropy_loss_with_soft_target(output, soft_label)
            loss.backward()
            total += loss.item()
        self.reference_optimizer.step()
        return total / len(self.reference_subnets)

    def check(self, rtol: float = 1e-4) -> Dict[str, float]:
        """Run each step once from the shared initial weights and check they compute the same mean loss."""
        losses = {'ours': self.ours(), 'ideal': self.ideal()}
        if self.reference is not None:
            losses['reference'] = self.reference_step()
        for name, loss in losses.items():
            assert abs(loss - losses['ours']) <= rtol * abs(losses['ours']), f'PS step losses differ: {losses}'
        return losses

    def functions(self) -> Dict[str, Callable[[], float]]:
        fns = {'ours': self.ours, 'ideal': self.ideal}
        if self.reference is not None:
            fns['reference'] = self.reference_step
        return fns
