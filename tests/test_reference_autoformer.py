"""The elastic transformer against AutoFormer as NNI implements it (``nni.nas.hub.pytorch.autoformer``): the same
weights, sliced by NNI's own mixed operations (leading output and input features of a linear layer, leading channels
of a layer norm), run through NNI's self-attention with a fixed head width, give the same outputs as the elastic
attention, norms and MLP of a converted timm ViT at the same embedding width, heads and MLP ratio."""
import pytest
import torch
import torch.nn as nn

pytest.importorskip('nni')

import timm  # noqa: E402

import ofa_timm  # noqa: E402
from ofa_timm.plugins.nni import quiet_nni_import  # noqa: E402
from ofa_timm.testing import assert_close  # noqa: E402

with quiet_nni_import():
    import nni  # noqa: E402
    from nni.nas.hub.pytorch.autoformer import RelativePositionSelfAttention  # noqa: E402
    from nni.nas.oneshot.pytorch.supermodule.operation import MixedLayerNorm, MixedLinear  # noqa: E402

EMBEDS, HEADS, RATIOS = (144, 168, 192), (1, 2, 3), (3.0, 3.5, 4.0)


def _mixed_linear(full: nn.Linear, label: str) -> MixedLinear:
    """NNI's mixed linear over ``full``'s weights (its supernet layer)."""
    mixed = MixedLinear(dict(in_features=nni.choice(f'{label}_in', sorted({full.in_features, 1})),
                             out_features=nni.choice(f'{label}_out', sorted({full.out_features, 1})),
                             bias=full.bias is not None))
    with torch.no_grad():
        mixed.weight.copy_(full.weight)
        mixed.bias.copy_(full.bias)
    return mixed


def _slice(full: nn.Linear, label: str, in_features: int, out_features: int) -> nn.Linear:
    """A plain linear holding what NNI's mixed operation takes of ``full`` at these sizes."""
    sliced = _mixed_linear(full, label).freeze_weight(in_features=in_features, out_features=out_features)
    linear = nn.Linear(in_features, out_features)
    linear.load_state_dict({'weight': sliced['weight'], 'bias': sliced['bias']})
    return linear


@pytest.fixture(scope='module')
def block():
    torch.manual_seed(0)
    source = timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=8, depth=1, num_classes=3).eval()
    supernet = ofa_timm.elasticize(source).eval()
    return source.blocks[0], supernet.blocks[0]


@pytest.mark.parametrize('embed, heads, ratio', [(192, 3, 4.0), (168, 2, 3.5), (144, 1, 3.0), (144, 3, 4.0)])
def test_elastic_block_equals_autoformer_slicing(block, embed, heads, ratio):
    source, elastic = block
    d = source.attn.head_dim
    full_dim = source.attn.qkv.in_features
    q_full, k_full, v_full = (nn.Linear(full_dim, source.attn.attn_dim) for _ in range(3))
    with torch.no_grad():  # timm's one qkv layer, laid out [q | k | v], as AutoFormer's three layers
        for part, linear in enumerate((q_full, k_full, v_full)):
            rows = slice(part * source.attn.attn_dim, (part + 1) * source.attn.attn_dim)
            linear.weight.copy_(source.attn.qkv.weight[rows])
            linear.bias.copy_(source.attn.qkv.bias[rows])
    reference = RelativePositionSelfAttention(embed, heads, head_dim=d, qkv_bias=True)
    reference.q, reference.k, reference.v = (_slice(f, n, embed, heads * d) for f, n in (
        (q_full, 'q'), (k_full, 'k'), (v_full, 'v')))
    reference.proj = _slice(source.attn.proj, 'proj', heads * d, embed)
    hidden = int(embed * ratio)
    fc1, fc2 = _slice(source.mlp.fc1, 'fc1', embed, hidden), _slice(source.mlp.fc2, 'fc2', hidden, embed)
    norms = []
    for norm, label in ((source.norm1, 'n1'), (source.norm2, 'n2')):
        mixed = MixedLayerNorm(dict(normalized_shape=nni.choice(label, list(EMBEDS)), eps=norm.eps))
        with torch.no_grad():
            mixed.weight.copy_(norm.weight)
            mixed.bias.copy_(norm.bias)
        norms.append(mixed)

    x = torch.randn(2, 17, embed)
    with torch.no_grad():
        eps = source.norm1.eps
        y = x + reference.eval()(norms[0].forward_with_args(embed, eps, x))  # AutoFormer's pre-norm block
        expected = y + fc2(source.mlp.act(fc1(norms[1].forward_with_args(embed, eps, y))))
        elastic.attn.set_active(heads, embed)
        elastic.mlp.fc1.set_active(hidden)
        elastic.mlp.fc2.set_active(embed)
        try:
            actual = elastic(x)
        finally:
            elastic.attn.set_active(None, None)
            elastic.mlp.fc1.set_active(None)
            elastic.mlp.fc2.set_active(None)
    assert_close(actual, expected, 1e-5)
