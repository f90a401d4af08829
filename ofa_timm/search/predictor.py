"""Accuracy predictor: OFA's architecture encoding generated from any space, a resumable dataset builder, an MLP.

The encoding (:class:`ArchEncoder`) is the reference implementation's, generated from the space's declared
dimensions: a one-hot of the resolution, a one-hot per position of every other dimension, those of a block-scoped
dimension (kernel, expand ratio, heads, ...) zeroed where the subnet's depth skips the block, and the depth one-hot only
of stages that have no block-scoped positions (OFA-ResNet's residual stem), whose depth the zeroed blocks do not tell.
For the canonical MobileNetV3 spaces it equals the reference's ``MobileNetArchEncoder`` feature for feature, so its
predictors load unchanged, and the tutorial's published predictor (128 features) loads too
(:meth:`AccuracyPredictor.from_reference`).

    rows = build_accuracy_dataset(supernet, calib_loader, val_loader, 'acc.jsonl', n=1000)   # resumable
    predictor, metrics = fit_predictor(supernet.space, *read_accuracy_dataset('acc.jsonl', supernet.space))
    predictor.save('predictor.safetensors')
    predictor.predict(population)          # top-1 (%) of each subnet, one forward pass
"""
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from .._io import atomic_path, load_weights, write_text_atomic
from ..elastic.mobilenetv3 import TUTORIAL_PREDICTOR_ENCODING
from ..space import DEPTHS, RESOLUTION, SearchSpace, Subnet, SubnetLike
from .cost import SubnetsOrCodes, as_codes

__all__ = [
    'ArchEncoder', 'AccuracyPredictor', 'build_accuracy_dataset', 'read_accuracy_dataset', 'dataset_space',
    'fit_predictor', 'spearman', 'FitConfig', 'EncoderConfig', 'PREDICTOR_FORMAT', 'sample_subnets',
    'write_accuracy_dataset', 'read_accuracy_rows',
]

PREDICTOR_FORMAT = 'ofa_timm.accuracy_predictor.v1'
_DATASET_FORMAT = 'ofa_timm.accuracy_dataset.v1'


@dataclass(frozen=True)
class EncoderConfig:
    """How subnets become features.

    Args:
        order: Dimensions in feature order (None: the resolution, then every other dimension in the space's order).
        resolution_bins: Left edges of the resolution buckets of the one-hot (None: one slot per resolution of the
            space).
    """
    order: Optional[Tuple[str, ...]] = None
    resolution_bins: Optional[Tuple[int, ...]] = None


class ArchEncoder:
    """OFA's one-hot architecture encoding of a space, vectorised over encoded populations.

    Args:
        space: The search space.
        config: Feature order and resolution buckets (default: the reference ``MobileNetArchEncoder`` layout).
    """

    def __init__(self, space: SearchSpace, config: EncoderConfig = EncoderConfig()):
        # A segment the space lacks encodes nothing (0.2.0's files list the five classic ones for every space).
        order = config.order or (RESOLUTION, *(n for n in space.names if n != RESOLUTION))
        self.space = space
        self.config = config
        genes = space.genes
        # Stages whose depth no block-scoped position encodes (OFA-ResNet's residual stem): their depth is one-hot.
        slotted = {s for d in space.dimensions if d.scope == 'block' for s in d.stages}
        columns: List[Tuple[int, int, int, int]] = []  # (gene, first feature, depth gene or -1, block position)
        self.n_features = 0
        res_width = 0
        self._res_gene = None
        for segment in order:
            if segment == RESOLUTION:
                if space.resolutions:
                    res_width = len(config.resolution_bins) if config.resolution_bins else len(space.resolutions)
                    self._res_gene, self._res_start = space.gene_index(RESOLUTION), self.n_features
                    self.n_features += res_width
                continue
            if not space.has(segment):
                continue
            d = space[segment]
            for p, g in enumerate(space.genes_of(segment)):
                if segment == DEPTHS and p in slotted:
                    continue
                depth_gene, position = -1, 0
                if d.scope == 'block':
                    stage, position = d.owner(p)
                    depth_gene = space.gene_index(DEPTHS, stage)
                columns.append((g, self.n_features, depth_gene, position))
                self.n_features += len(genes[g].choices)
        self._columns = np.array(columns, dtype=np.int64).reshape(-1, 4)
        # A block slot is active where its stage's depth exceeds its position: depth value (by code) > position.
        depth_values = np.zeros((len(genes), int(space.choice_counts.max())), dtype=np.int64)
        for g, gene in enumerate(genes):
            if gene.field == DEPTHS:
                depth_values[g, :len(gene.choices)] = gene.choices
        self._depth_values = depth_values
        self._slotted = np.nonzero(self._columns[:, 2] >= 0)[0]
        if self._res_gene is not None:
            res = np.array(space.resolutions)
            if config.resolution_bins:
                bins = np.asarray(config.resolution_bins)
                slot = np.searchsorted(bins, res, side='right') - 1
                if (slot < 0).any() or (res >= bins[-1] + (bins[-1] - bins[-2] if len(bins) > 1 else 1)).any():
                    raise ValueError(f'Resolutions {space.resolutions} fall outside the encoder buckets '
                                     f'{list(config.resolution_bins)}')
                self._res_slot = slot
            else:
                self._res_slot = np.arange(len(res))

    def __call__(self, subnets: SubnetsOrCodes) -> np.ndarray:
        """Features of each subnet, float32 array of shape ``(N, n_features)``."""
        codes = as_codes(self.space, subnets)
        n = codes.shape[0]
        out = np.zeros((n, self.n_features), dtype=np.float32)
        rows = np.arange(n)
        cols = self._columns
        if len(cols):
            idx = cols[:, 1][None, :] + codes[:, cols[:, 0]]
            active = np.ones(idx.shape, dtype=bool)
            depth_genes, positions = cols[self._slotted, 2], cols[self._slotted, 3]
            active[:, self._slotted] = self._depth_values[depth_genes, codes[:, depth_genes]] > positions
            r, c = np.nonzero(active)
            out[rows[r], idx[r, c]] = 1.0
        if self._res_gene is not None:
            out[rows, self._res_start + self._res_slot[codes[:, self._res_gene]]] = 1.0
        return out

    encode = __call__


class AccuracyPredictor(nn.Module):
    """An MLP from OFA features to top-1 (%): the reference's shape (3 hidden layers of 400, ReLU) by default.

    The state-dict keys are the reference ``ofa.nas.accuracy_predictor.AccuracyPredictor``'s (``layers.*``,
    ``base_acc``), so its checkpoints load as they are.

    Args:
        space: The search space the predictor scores.
        hidden_size: Width of the hidden layers.
        n_layers: Number of hidden layers.
        encoder: Feature layout (default: the reference's).
        output_scale: Multiplies the network's output (100 for the reference's checkpoints, which predict
            fractions).
        final_bias: Whether the output layer has a bias (the reference's tutorial predictor has one).
    """

    def __init__(
            self,
            space: SearchSpace,
            hidden_size: int = 400,
            n_layers: int = 3,
            encoder: EncoderConfig = EncoderConfig(),
            output_scale: float = 1.0,
            final_bias: bool = False,
    ):
        super().__init__()
        self.space = space
        self.encoder = ArchEncoder(space, encoder)
        self.hidden_size = hidden_size
        self.n_layers = n_layers
        self.output_scale = output_scale
        self.final_bias = final_bias
        layers: List[nn.Module] = []
        width = self.encoder.n_features
        for _ in range(n_layers):
            layers.append(nn.Sequential(nn.Linear(width, hidden_size), nn.ReLU(inplace=True)))
            width = hidden_size
        layers.append(nn.Linear(width, 1, bias=final_bias))
        self.layers = nn.Sequential(*layers)
        self.base_acc = nn.Parameter(torch.zeros(1), requires_grad=False)
        self.metrics: Dict[str, float] = {}
        self.eval()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return (self.layers(features).squeeze(-1) + self.base_acc) * self.output_scale

    @torch.inference_mode()
    def predict(self, subnets: SubnetsOrCodes) -> np.ndarray:
        """Predicted top-1 (%) of each subnet (subnets or encoded ``(N, G)`` codes): one forward pass."""
        features = torch.from_numpy(self.encoder(subnets)).to(self.base_acc.device)
        return self(features).double().cpu().numpy()

    # --- files --------------------------------------------------------------------------------------------------
    def config(self) -> Dict[str, Any]:
        return dict(hidden_size=self.hidden_size, n_layers=self.n_layers, encoder=asdict(self.encoder.config),
                    output_scale=self.output_scale, final_bias=self.final_bias)

    def save(self, path: Union[str, os.PathLike], model: str = '') -> Path:
        """Write the weights as safetensors, with the space, the architecture and the metrics as metadata."""
        from safetensors.torch import save_file
        metadata = dict(format=PREDICTOR_FORMAT, space=json.dumps(self.space.to_dict()),
                        config=json.dumps(self.config()), metrics=json.dumps(self.metrics), model=model)
        with atomic_path(path) as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(tmp),
                      metadata=metadata)
        return Path(path)

    @classmethod
    def load(cls, path: Union[str, os.PathLike], space: Optional[SearchSpace] = None) -> 'AccuracyPredictor':
        """Read a predictor written by :meth:`save`.

        Args:
            path: The ``.safetensors`` file.
            space: The space it must have been made for (checked when given).

        Raises:
            ValueError: If the file is not a predictor, or was made for another space.
        """
        from safetensors import safe_open
        try:
            with safe_open(str(path), framework='pt') as f:
                metadata = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}
        except (OSError, Exception) as e:  # safetensors raises its own error types on malformed files
            raise ValueError(f'Cannot read the predictor {os.fspath(path)!r}: {e}') from None
        if metadata.get('format') != PREDICTOR_FORMAT:
            raise ValueError(f'{os.fspath(path)} is not an ofa_timm accuracy predictor (no {PREDICTOR_FORMAT!r} '
                             f'metadata); reference checkpoints load with AccuracyPredictor.from_reference')
        own_space = SearchSpace.from_dict(json.loads(metadata['space']))
        if space is not None and own_space != space:
            raise ValueError(f'The predictor {os.fspath(path)} was made for another space: '
                             f'{_space_diff(own_space, space)}')
        config = json.loads(metadata['config'])
        config['encoder'] = EncoderConfig(**{k: tuple(v) if isinstance(v, list) else v
                                             for k, v in config['encoder'].items()})
        predictor = cls(own_space, **config)
        predictor.load_state_dict(state)
        predictor.metrics = json.loads(metadata.get('metrics') or '{}')
        return predictor

    @classmethod
    def from_reference(
            cls, checkpoint: Union[str, os.PathLike, Dict[str, torch.Tensor]], space: SearchSpace,
    ) -> 'AccuracyPredictor':
        """Read a predictor of the reference implementation for a MobileNetV3 space.

        Two formats are recognised by their keys:

        * ``ofa.nas.accuracy_predictor.AccuracyPredictor`` (``layers.*``, ``base_acc``) with the reference
          ``MobileNetArchEncoder`` over the space's resolutions;
        * the tutorial's published ``acc_predictor.pth`` (``0.weight`` ... ``6.bias``: 128 features, 8 resolution
          buckets of 16 px from 112).

        Predictions come out in % (the reference predicts fractions).

        Raises:
            ValueError: If the keys are neither format, or the feature count does not fit ``space``.
        """
        state = checkpoint
        if not isinstance(state, dict):
            state = load_weights(checkpoint)[0]
        if isinstance(state.get('state_dict'), dict):
            state = state['state_dict']
        if 'base_acc' in state and any(k.startswith('layers.') for k in state):
            linear = sorted({int(k.split('.')[1]) for k in state if k.startswith('layers.')})
            hidden = state['layers.0.0.weight'].shape[0]
            predictor = cls(space, hidden, len(linear) - 1, output_scale=100.0)
        elif '0.weight' in state:
            linear = sorted({int(k.split('.')[0]) for k in state})
            predictor = cls(space, state['0.weight'].shape[0], len(linear) - 1, output_scale=100.0, final_bias=True,
                            encoder=EncoderConfig(**TUTORIAL_PREDICTOR_ENCODING))
            # nn.Sequential(Linear, ReLU, ...) numbering -> layers.i.0 / layers.n
            state = {(f'layers.{int(k.split(".")[0]) // 2}.0.{k.split(".")[1]}'
                      if int(k.split('.')[0]) < linear[-1] else f'layers.{len(linear) - 1}.{k.split(".")[1]}'): v
                     for k, v in state.items()}
            state['base_acc'] = torch.zeros(1)
        else:
            raise ValueError(f'Not a reference accuracy predictor: keys {sorted(state)[:6]}')
        expected = predictor.encoder.n_features
        got = state['layers.0.0.weight'].shape[1]
        if got != expected:
            raise ValueError(f'The reference predictor takes {got} features, but the space encodes to {expected}')
        predictor.load_state_dict(state)
        return predictor


def _space_diff(a: SearchSpace, b: SearchSpace) -> str:
    for name in dict.fromkeys((*a.names, *b.names)):
        da, db = (s[name].choices if s.has(name) else None for s in (a, b))
        if da != db:
            return f'{name} differ ({_short(da)} vs {_short(db)})'
    return 'the spaces differ'


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[:limit] + '...'


# --- dataset -------------------------------------------------------------------------------------------------------
def build_accuracy_dataset(
        supernet: nn.Module,
        calib_loader: Optional[Iterable],
        val_loader: Optional[Iterable],
        path: Union[str, os.PathLike],
        n: int = 1000,
        seed: int = 0,
        calib_images: int = 2000,
        device: Union[str, torch.device, None] = None,
        progress: bool = True,
        model: str = '',
        subnets: Optional[Sequence[SubnetLike]] = None,
        evaluate: Optional[Callable[[Subnet], Dict[str, float]]] = None,
) -> List[Dict[str, Any]]:
    """Evaluate ``n`` random subnets (BN-recalibrated) and append each result to a JSON-lines file as it comes.

    The subnets are drawn from ``seed``, so a rerun with the same arguments resumes where the last one stopped:
    subnets already in the file are skipped, and a line cut short by an interrupt is dropped.

    Args:
        supernet: The trained supernet.
        calib_loader: Training images for BN recalibration.
        val_loader: Held-out ``(images, targets)`` batches.
        path: The ``.jsonl`` file (its first line records the space).
        n: Number of distinct subnets the dataset holds when done.
        seed: Seed of the subnet draw.
        calib_images: Images for BN recalibration.
        device: Evaluation device.
        progress: Show a progress bar (when the output is a terminal).
        model: Model name, recorded in the header.
        subnets: Evaluate these subnets instead of a random draw.
        evaluate: Returns ``{'top1', 'top5'}`` of a subnet, in place of ``evaluate_subnet`` on the loaders (e.g.
            ``Trainer.evaluate_subnet``, which recalibrates and evaluates exactly as the trainer validates).

    Returns:
        Every row of the dataset (``subnet``, ``top1``, ``top5``, ``seconds``).

    Raises:
        ValueError: If the file holds a dataset of another space.
    """
    from tqdm import tqdm
    from ..training import evaluate_subnet

    space = supernet.space
    path = Path(path)
    rows = read_accuracy_rows(path, space) if path.exists() else []
    done = {Subnet.from_dict(r['subnet']) for r in rows}
    if subnets is None:
        subnets = sample_subnets(space, n, seed)
    todo = [s for s in (space.validate(s) for s in subnets) if s not in done]
    if not path.exists() or path.stat().st_size == 0:
        write_accuracy_dataset(path, space, [], model)
    with open(path, 'a') as f, tqdm(total=len(todo), desc='accuracy dataset', disable=None if progress else True,
                                     unit='subnet') as bar:
        for subnet in todo:
            start = time.perf_counter()
            if evaluate is not None:
                metrics = evaluate(subnet)
            else:
                metrics = evaluate_subnet(supernet, subnet, calib_loader, val_loader, calib_images, device)
            row = dict(subnet=subnet.to_dict(), top1=metrics['top1'], top5=metrics['top5'],
                       seconds=round(time.perf_counter() - start, 3))
            f.write(json.dumps(row) + '\n')
            f.flush()
            os.fsync(f.fileno())
            rows.append(row)
            bar.set_postfix(top1=f"{metrics['top1']:.2f}")
            bar.update()
    return rows


def write_accuracy_dataset(path: Union[str, os.PathLike], space: SearchSpace, rows: Sequence[Dict[str, Any]],
                           model: str = '') -> Path:
    """Write a dataset file (the format header, then one JSON line per row), atomically."""
    lines = [json.dumps(dict(format=_DATASET_FORMAT, model=model, space=space.to_dict()))]
    lines += [json.dumps(r) for r in rows]
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return write_text_atomic(path, '\n'.join(lines) + '\n')
    except OSError as e:
        raise ValueError(f'Cannot write {os.fspath(path)}: {e.strerror}') from None


def sample_subnets(space: SearchSpace, n: int, seed: int) -> List[Subnet]:
    """``n`` distinct random subnets of ``space``, the same for the same seed (the subnets a dataset evaluates)."""
    rng = np.random.default_rng(seed)
    out: Dict[Subnet, None] = {}
    for _ in range(100 * n):
        if len(out) >= n:
            break
        out.setdefault(space.sample(rng))
    return list(out)


def read_accuracy_rows(path: Union[str, os.PathLike], space: SearchSpace) -> List[Dict[str, Any]]:
    """Rows of a dataset file, checking its header; a last line cut short by an interrupt is cut off the file.

    Raises:
        ValueError: If the file is not an accuracy dataset, or holds one of another space.
    """
    path = Path(path)
    data = path.read_bytes()
    lines = data.splitlines(keepends=True)
    if not lines:
        return []
    try:
        header = json.loads(lines[0])
    except ValueError:
        header = None
    if not isinstance(header, dict) or header.get('format') != _DATASET_FORMAT:
        raise ValueError(f'{path} is not an ofa_timm accuracy dataset (its first line has no format header)')
    own = SearchSpace.from_dict(header['space'])
    if own != space:
        raise ValueError(f'{path} holds a dataset of another space: {_space_diff(own, space)}')
    rows, good = [], len(lines[0])
    for line in lines[1:]:
        try:
            if not line.endswith(b'\n'):
                raise ValueError('torn line')
            rows.append(json.loads(line))
        except ValueError:
            break
        good += len(line)
    if good < len(data):
        with open(path, 'r+b') as f:
            f.truncate(good)
    return rows


def dataset_space(path: Union[str, os.PathLike]) -> Tuple[SearchSpace, str]:
    """The space and model name recorded in a dataset file's header.

    Raises:
        ValueError: If the file is missing or not an accuracy dataset.
    """
    try:
        with open(path, 'rb') as f:
            header = json.loads(f.readline() or b'null')
    except OSError as e:
        raise ValueError(f'Cannot read the accuracy dataset {os.fspath(path)!r}: {e.strerror}') from None
    except ValueError:
        header = None
    if not isinstance(header, dict) or header.get('format') != _DATASET_FORMAT:
        raise ValueError(f'{os.fspath(path)} is not an ofa_timm accuracy dataset (its first line has no format header)')
    return SearchSpace.from_dict(header['space']), header.get('model', '')


def read_accuracy_dataset(path: Union[str, os.PathLike], space: SearchSpace,
                          metric: str = 'top1') -> Tuple[np.ndarray, np.ndarray]:
    """Codes ``(N, G)`` and targets ``(N,)`` of a dataset written by :func:`build_accuracy_dataset`.

    Raises:
        ValueError: If the file is missing, of another space, or empty.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f'Accuracy dataset {os.fspath(path)!r} does not exist')
    rows = read_accuracy_rows(path, space)
    if not rows:
        raise ValueError(f'Accuracy dataset {os.fspath(path)!r} has no rows yet')
    codes = space.encode([Subnet.from_dict(r['subnet']) for r in rows])
    return codes, np.array([float(r[metric]) for r in rows])


# --- fitting -------------------------------------------------------------------------------------------------------
def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (ties get their average rank)."""
    def ranks(x: np.ndarray) -> np.ndarray:
        order = np.argsort(x, kind='stable')
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
        sums = np.bincount(inverse, weights=r)
        return sums[inverse] / counts[inverse]
    ra, rb = ranks(np.asarray(a, float)), ranks(np.asarray(b, float))
    if ra.std() == 0 or rb.std() == 0:
        return float('nan')
    return float(np.corrcoef(ra, rb)[0, 1])


@dataclass
class FitConfig:
    """Training of the predictor.

    Args:
        hidden_size: Hidden width (the reference's 400).
        n_layers: Hidden layers (the reference's 3).
        steps: Optimizer steps.
        batch_size: Rows per step (capped at the training rows).
        lr: Adam learning rate (cosine-decayed to 0).
        weight_decay: Adam weight decay.
        val_fraction: Held-out share of the rows for RMSE and Spearman.
        seed: Seed of the split, the init and the batches.
    """
    hidden_size: int = 400
    n_layers: int = 3
    steps: int = 2000
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    val_fraction: float = 0.2
    seed: int = 0


def fit_predictor(
        space: SearchSpace, codes: np.ndarray, targets: np.ndarray, config: FitConfig = FitConfig(),
        progress: bool = False,
) -> Tuple[AccuracyPredictor, Dict[str, float]]:
    """Train an :class:`AccuracyPredictor` on encoded subnets and their top-1, and score it on a held-out part.

    Returns:
        The predictor (``.metrics`` holds the scores too) and ``{'rmse', 'spearman', 'train_rmse', 'n_train',
        'n_val'}``: RMSE in % points and Spearman rank correlation on the held-out rows.

    Raises:
        ValueError: With fewer than 2 rows, or a held-out share outside [0, 1).
    """
    from tqdm import tqdm
    codes = as_codes(space, codes)
    targets = np.asarray(targets, dtype=np.float64)
    if len(codes) != len(targets) or len(codes) < 2:
        raise ValueError(f'Need at least 2 rows and one target per row, got {len(codes)} rows, {len(targets)} targets')
    if not 0 <= config.val_fraction < 1:
        raise ValueError(f'val_fraction must be in [0, 1), got {config.val_fraction}')
    rng = np.random.default_rng(config.seed)
    order = rng.permutation(len(codes))
    n_val = int(round(len(codes) * config.val_fraction))
    n_val = min(n_val, len(codes) - 1)
    val, train = order[:n_val], order[n_val:]
    torch.manual_seed(config.seed)
    predictor = AccuracyPredictor(space, config.hidden_size, config.n_layers)
    x = torch.from_numpy(predictor.encoder(codes))
    y = torch.from_numpy(targets).float()
    predictor.base_acc.data.fill_(float(targets[train].mean()))
    opt = torch.optim.Adam(predictor.layers.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, config.steps)
    batch = min(config.batch_size, len(train))
    g = torch.Generator().manual_seed(config.seed)
    train_t = torch.from_numpy(train)
    predictor.train()
    for _ in tqdm(range(config.steps), desc='fitting predictor', disable=None if progress else True):
        idx = train_t[torch.randint(len(train_t), (batch,), generator=g)]
        loss = nn.functional.mse_loss(predictor(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    predictor.eval()
    with torch.no_grad():
        pred = predictor(x).double().numpy()
    metrics = dict(train_rmse=_rmse(pred[train], targets[train]), n_train=len(train), n_val=len(val))
    if len(val):
        metrics.update(rmse=_rmse(pred[val], targets[val]), spearman=spearman(pred[val], targets[val]))
    predictor.metrics = metrics
    return predictor, metrics


def _rmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(math.sqrt(np.mean((np.asarray(a) - np.asarray(b)) ** 2)))
