import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from data2vec.nn import attention
from data2vec.nn.attention import Attention, attention_mask, split_heads
from data2vec.nn.block import PostLNBlock
from data2vec.nn.drop_path import DropPath
from data2vec.nn.positions import sincos_2d


def naive_attention(attn: Attention, x, pad=None, bias=None):
    B, T, C = x.shape
    H = attn.num_heads
    q, k, v = attn.qkv(x).view(B, T, 3, H, C // H).permute(2, 0, 3, 1, 4)
    logits = q @ k.transpose(-1, -2) / math.sqrt(C // H)
    if bias is not None:
        logits = logits + bias
    if pad is not None:
        logits = logits.masked_fill(pad[:, None, None, :], float("-inf"))
    out = logits.softmax(-1) @ v
    return attn.proj(out.transpose(1, 2).reshape(B, T, C))


def test_attention__matches_naive_softmax_with_padding_and_bias():
    attn = Attention(16, 4).eval()
    x = torch.randn(2, 5, 16)
    pad = torch.tensor([[False] * 5, [False, False, False, True, True]])
    bias = torch.randn(1, 4, 5, 5)
    got = attn(x, attention_mask(pad, bias, x.dtype))
    torch.testing.assert_close(got, naive_attention(attn, x, pad, bias), atol=1e-5, rtol=1e-5)


def test_attention__padded_keys_do_not_influence_outputs():
    attn = Attention(8, 2).eval()
    x = torch.randn(1, 4, 8)
    pad = torch.tensor([[False, False, True, True]])
    y1 = attn(x, attention_mask(pad, None, x.dtype))
    x2 = x.clone()
    x2[:, 2:] = torch.randn(1, 2, 8) * 100
    y2 = attn(x2, attention_mask(pad, None, x.dtype))
    torch.testing.assert_close(y1[:, :2], y2[:, :2])


def test_attention_mask__none_without_padding_or_bias():
    assert attention_mask(None, None, torch.float32) is None
    assert attention_mask(torch.zeros(2, 3, dtype=torch.bool), None, torch.float32) is None


def test_post_ln_block__formula_and_ffn_output():
    block = PostLNBlock(8, 2, mlp_ratio=2.0).eval()
    x = torch.randn(3, 4, 8)
    y, f = block(x)
    h = block.norm1(x + block.attn(x))
    f_ref = block.mlp(h)
    torch.testing.assert_close(f, f_ref)
    torch.testing.assert_close(y, block.norm2(h + f_ref))


def test_drop_path__identity_in_eval_and_drops_whole_samples_in_train():
    dp = DropPath(0.5)
    x = torch.ones(2000, 3)
    assert torch.equal(dp.eval()(x), x)
    y = dp.train()(x)
    rows = y[:, 0]
    assert set(rows.unique().tolist()) <= {0.0, 2.0}  # kept rows scaled by 1/(1-p)
    assert (y == y[:, :1]).all()  # the whole sample is kept or dropped
    assert abs(float(y.mean()) - 1.0) < 0.1


def test_sincos_2d__column_first_then_row():
    pos = sincos_2d(8, 3, 4)  # 3 rows x 4 cols, D=8 -> 2 freqs per quarter
    assert pos.shape == (12, 8)
    omega = 1.0 / 10000 ** (np.arange(2) / 2)
    r, c = 2, 3
    p = pos[r * 4 + c].numpy()
    np.testing.assert_allclose(p[:2], np.sin(c * omega), rtol=1e-6)
    np.testing.assert_allclose(p[2:4], np.cos(c * omega), rtol=1e-6)
    np.testing.assert_allclose(p[4:6], np.sin(r * omega), rtol=1e-6)
    np.testing.assert_allclose(p[6:], np.cos(r * omega), rtol=1e-6)


def test_init__bert_linear_xavier_patch_and_normal_cls(tmp_path):
    from data2vec.models.registry import build_model
    from tests.conftest import tiny_config

    cfg = tiny_config("model.embed_dim=256", "model.num_heads=4", "decoder.dim=64")
    model = build_model(cfg).requires_grad_(False)
    enc = model.encoder
    w = enc.blocks[0].mlp.fc1.weight
    assert abs(float(w.std()) - 0.02) < 0.002 and float(enc.blocks[0].mlp.fc1.bias.abs().max()) == 0
    conv = enc.modality.local_encoder.proj.weight
    bound = math.sqrt(6.0 / (conv.shape[0] + conv[0].numel()))  # xavier on (D, C*p*p)
    assert float(conv.abs().max()) <= bound and float(conv.abs().max()) > 0.9 * bound
    assert abs(float(enc.modality.extra_tokens.std()) - 1.0) < 0.2
    proj = model.decoder.proj.weight  # PyTorch default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    bound = 1 / math.sqrt(proj.shape[1])
    assert float(proj.abs().max()) <= bound + 1e-6
    assert abs(float(proj.std()) - bound / math.sqrt(3)) < 0.1 * bound  # not N(0, 0.02²)


@pytest.mark.parametrize("p", [-0.1, 1.0])
def test_drop_path__rejects_bad_probability(p):
    with pytest.raises(ValueError):
        DropPath(p)


def test_layer_norm_eps_is_configurable():
    from data2vec.models.registry import build_encoder
    from tests.conftest import tiny_config

    enc = build_encoder(tiny_config("model.norm_eps=0.001"))
    norms = [m for m in enc.modules() if isinstance(m, nn.LayerNorm)]
    assert norms and all(m.eps == 0.001 for m in norms)


def test_attention__gradient_reaches_a_learned_bias():
    # ALiBi scales are learned through the additive mask: SDPA must pass their gradient.
    attn = Attention(8, 2).eval()
    x = torch.randn(2, 5, 8)
    scale = torch.tensor([0.7, 1.3], requires_grad=True)
    dist = torch.arange(5.0)[:, None].sub(torch.arange(5.0)[None]).abs()
    bias = -scale[None, :, None, None] * dist
    attn(x, attention_mask(None, bias, x.dtype)).sum().backward()
    got = scale.grad.clone()
    scale.grad = None
    bias = -scale[None, :, None, None] * dist
    naive_attention(attn, x, None, bias).sum().backward()
    torch.testing.assert_close(got, scale.grad, atol=1e-5, rtol=1e-4)
    assert float(got.abs().min()) > 0


def test_split_heads__views_and_one_copy_in_backward():
    # Reference: the (B, T, 3, H, d) reading of [q; k; v], heads moved before tokens.
    from torch.utils._python_dispatch import TorchDispatchMode

    B, T, H, d = 2, 5, 3, 4
    qkv = torch.randn(B, T, 3 * H * d, requires_grad=True)
    q, k, v = split_heads(qkv, H)
    ref = qkv.detach().view(B, T, 3, H, d)
    for i, part in enumerate((q, k, v)):
        assert part.shape == (B, H, T, d)
        assert part.data_ptr() == qkv.data_ptr() + i * H * d * qkv.element_size()
        torch.testing.assert_close(part, ref[:, :, i].transpose(1, 2), rtol=0, atol=0)

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.__name__)
            return func(*args, **(kwargs or {}))

    gq, gk, gv = (torch.randn(B, H, T, d) for _ in range(3))
    with Ops() as ops:
        torch.autograd.backward((q, k, v), (gq, gk, gv))
    grad = torch.stack([g.transpose(1, 2) for g in (gq, gk, gv)], dim=2).reshape(B, T, -1)
    torch.testing.assert_close(qkv.grad, grad, rtol=0, atol=0)
    copies = [
        n for n in ops.names if n.split(".")[0] in ("cat", "stack", "clone", "copy_", "_to_copy")
    ]
    assert len(copies) == 1, ops.names  # the stack alone, no copy back to (B, T, 3C)


def test_sdpa__efficient_kernel_first_for_short_cuda_sequences_only():
    """The rule, on stand-ins for CUDA queries (the kernels themselves need a GPU:
    benchmarks/gpu_check.py): short sequences, every backend enabled, not compiling."""
    from types import SimpleNamespace

    from torch.nn.attention import SDPBackend, sdpa_kernel

    def q(tokens, cuda=True):
        return SimpleNamespace(is_cuda=cuda, shape=(2, 3, tokens, 8))

    assert attention.prefers_efficient(q(attention.SHORT_SEQUENCE))
    assert not attention.prefers_efficient(q(attention.SHORT_SEQUENCE + 1))
    assert not attention.prefers_efficient(q(40, cuda=False))
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]):  # the caller's own choice
        assert not attention.prefers_efficient(q(40))
    assert attention.prefers_efficient(q(40))  # and restored after it
    backends = attention.short_backends()
    assert backends[0] == SDPBackend.EFFICIENT_ATTENTION
    assert SDPBackend.MATH in backends  # always something to fall back on
    # cuDNN's kernel (off by default in torch 2.4) does not decide the rule, and a caller who
    # switched it off does not get it back as a fallback.
    everything_but_cudnn = [
        SDPBackend.EFFICIENT_ATTENTION,
        SDPBackend.FLASH_ATTENTION,
        SDPBackend.MATH,
    ]
    with sdpa_kernel(everything_but_cudnn):
        assert attention.prefers_efficient(q(40))
        assert SDPBackend.CUDNN_ATTENTION not in attention.short_backends()
    x = torch.randn(2, 3, 5, 8)
    torch.testing.assert_close(
        attention.sdpa(x, x, x, None, 0.0), F.scaled_dot_product_attention(x, x, x)
    )
