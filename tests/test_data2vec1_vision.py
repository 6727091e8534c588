"""data2vec 1.0 for images: the BEiT backbone, block-wise masks, the objective, a short run."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data2vec.config import ConfigError, load_config
from data2vec.data.image_pretrain import ImageMaskGenerator
from data2vec.engine.trainer import pretrain
from data2vec.masking import beit_block_mask, make_rng
from data2vec.models.registry import build_encoder, build_model
from data2vec.nn.beit import LayerScaleBlock, QVBiasAttention, relative_position_index
from tests.conftest import make_image_folder

TINY_V1 = [
    "model.embed_dim=32",
    "model.depth=3",
    "model.num_heads=2",
    "encoder.image_size=16",
    "encoder.patch_size=4",
    "mask.min_block=2",
    "target.top_k=2",
    "data.batch_size=8",
    "data.num_workers=0",
    "optim.warmup_steps=2",
    "train.progress=false",
    "train.tensorboard=false",
    "train.log_every=1",
]


def test_relative_position_index__every_offset_has_its_own_entry():
    h, w = 3, 4
    index = relative_position_index(h, w)
    n = (2 * h - 1) * (2 * w - 1)
    assert index.shape == (1 + h * w, 1 + h * w)
    seen: dict[tuple[int, int], int] = {}
    for i in range(h * w):
        for j in range(h * w):
            offset = (i // w - j // w, i % w - j % w)
            entry = int(index[1 + i, 1 + j])
            assert seen.setdefault(offset, entry) == entry  # one entry per 2-D offset ...
    assert len(set(seen.values())) == len(seen) == n  # ... and distinct offsets, distinct entries
    assert set(index[0, 1:].tolist()) == {n}  # CLS to patch
    assert set(index[1:, 0].tolist()) == {n + 1}  # patch to CLS
    assert int(index[0, 0]) == n + 2


def test_qv_bias_attention__matches_the_formula_and_has_no_key_bias():
    torch.manual_seed(0)
    attn = QVBiasAttention(8, 2)
    with torch.no_grad():
        attn.q_bias.normal_()
        attn.v_bias.normal_()
    x, bias = torch.randn(2, 5, 8), torch.randn(1, 2, 5, 5)
    wq, wk, wv = attn.qkv.weight.chunk(3)
    q = (x @ wq.T + attn.q_bias).view(2, 5, 2, 4).transpose(1, 2)
    k = (x @ wk.T).view(2, 5, 2, 4).transpose(1, 2)
    v = (x @ wv.T + attn.v_bias).view(2, 5, 2, 4).transpose(1, 2)
    probs = torch.softmax(q @ k.transpose(-1, -2) / 2.0 + bias, dim=-1)
    ref = attn.proj((probs @ v).transpose(1, 2).reshape(2, 5, 8))
    torch.testing.assert_close(attn(x, bias), ref)
    assert "k_bias" not in dict(attn.named_parameters()) and attn.qkv.bias is None


def test_layer_scale_block__pre_ln_with_gammas():
    torch.manual_seed(0)
    block = LayerScaleBlock(8, 2, layer_scale=0.1).eval()
    x = torch.randn(2, 5, 8)
    y, ffn = block(x)
    mid = x + 0.1 * block.attn(block.norm1(x))
    torch.testing.assert_close(ffn, 0.1 * block.mlp(block.norm2(mid)))
    torch.testing.assert_close(y, mid + ffn)


def test_beit_mask__statistics_bounds_and_determinism():
    masks = beit_block_mask(14, 14, 200, 0.6, make_rng(1), min_block=16)
    counts = masks.sum(1)
    target = round(0.6 * 196)
    assert counts.max() <= target  # a row never overshoots
    assert counts.mean() > 0.97 * target  # and almost always reaches the target
    assert np.array_equal(masks, beit_block_mask(14, 14, 200, 0.6, make_rng(1), min_block=16))
    assert not np.array_equal(masks, beit_block_mask(14, 14, 200, 0.6, make_rng(2), min_block=16))
    # blocks, not scattered patches: far fewer masked/visible borders between neighbours than
    # in a random mask of the same density
    rand = np.random.default_rng(0).random((200, 196)) < counts.mean() / 196
    assert _border_share(masks) < 0.5 * _border_share(rand)


def _border_share(masks: np.ndarray) -> float:
    """Share of neighbouring patch pairs (14 x 14 grids) where one is masked and one is not."""
    grid = masks.reshape(-1, 14, 14)
    rows = grid[:, 1:] != grid[:, :-1]
    cols = grid[:, :, 1:] != grid[:, :, :-1]
    return float((rows.sum() + cols.sum()) / (rows.size + cols.size))


def test_presets__shapes_of_the_base_model_and_head():
    cfg = load_config("image-v1-base")
    model = build_model(cfg)
    n_params = sum(p.numel() for p in model.encoder.parameters())
    assert 85e6 < n_params < 87e6  # ViT-B/16 with a shared relative position bias (BEiT: 86M)
    assert model.decoder.mask_emb.shape == (768,)
    assert isinstance(model.decoder.final_proj, torch.nn.Linear)
    assert model.decoder.final_proj.weight.shape == (768, 768)
    table = model.encoder.modality.rel_pos_bias.relative_position_bias_table
    assert table.shape == (27 * 27 + 3, 12)
    assert model.encoder.modality.pos_embed is None
    for name in ("image-v1-tiny", "image-v1-large"):
        assert load_config(name).model.algorithm == "v1"


def _manual_targets(model, images, top_k):
    teacher = model.teacher.model
    x = teacher.modality.local_encoder(images)
    cls = teacher.modality.extra_tokens.expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], 1)
    bias = teacher.modality.rel_pos_bias()
    outs = []
    for block in teacher.blocks:
        x, _ = block(x, bias)
        outs.append(x[:, 1:])
    y = sum(F.layer_norm(o, o.shape[-1:], eps=1e-5) for o in outs[-top_k:]) / top_k
    return F.layer_norm(y, y.shape[-1:], eps=1e-5)


def test_loss__smooth_l1_mean_over_masked_patches_only_against_block_output_targets():
    cfg = load_config("image-v1-tiny", TINY_V1)
    model = build_model(cfg).eval()
    torch.manual_seed(1)
    images = torch.randn(3, 3, 16, 16)
    mask = torch.from_numpy(beit_block_mask(4, 4, 3, 0.6, make_rng(0), min_block=2))
    out = model(images, mask)
    with torch.no_grad():
        targets = _manual_targets(model, images, 2)
        enc = model.encoder
        x = torch.where(mask[..., None], model.decoder.mask_emb, enc.modality.local_encoder(images))
        x = torch.cat([enc.modality.extra_tokens.expand(3, -1, -1), x], 1)
        bias = enc.modality.rel_pos_bias()
        for block in enc.blocks:
            x, _ = block(x, bias)
        pred = model.decoder.final_proj(enc.norm(x)[:, 1:][mask])
        ref = F.smooth_l1_loss(pred, targets[mask], beta=2.0)  # mean over patches and dims
    n = int(mask.sum())
    torch.testing.assert_close(out.loss.detach(), ref * n / out.sample_size, rtol=1e-5, atol=1e-6)
    assert out.sample_size == n
    # the teacher saw the unmasked image: another mask leaves the targets unchanged
    torch.testing.assert_close(model.forward_targets(images, None, images, None), targets)


def test_loss__unmasked_patches_do_not_reach_the_loss_through_the_head():
    cfg = load_config("image-v1-tiny", TINY_V1)
    model = build_model(cfg)
    images = torch.randn(2, 3, 16, 16)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, :6] = True
    grads = []

    def keep_grad(module, inputs, output) -> None:
        output.register_hook(lambda g: grads.append(g.clone()))

    hook = model.decoder.final_proj.register_forward_hook(keep_grad)
    model(images, mask).loss.backward()
    hook.remove()
    assert grads[0].shape[0] == int(mask.sum())  # the head sees masked patches only
    assert model.decoder.mask_emb.grad is not None and model.decoder.mask_emb.grad.abs().sum() > 0


def test_teacher__averages_the_whole_encoder():
    cfg = load_config("image-v1-tiny", TINY_V1)
    model = build_model(cfg)
    assert model.teacher.copied == ()  # nothing copied: one EMA of every parameter
    before = {k: v.clone() for k, v in model.teacher.model.state_dict().items()}
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(1.0)
    model.teacher.update(model.encoder, 0)
    decay = model.teacher.decay_at(0)
    assert math.isclose(decay, 0.99)
    t = model.teacher.model.state_dict()
    s = model.encoder.state_dict()
    for name in ("modality.local_encoder.proj.weight", "blocks.0.gamma_1"):
        # averaged, not copied nor left behind: the patch embedding too (scope "all")
        expected = decay * before[name] + (1 - decay) * s[name]
        torch.testing.assert_close(t[name], expected)


def test_student_fits_the_teacher_on_one_batch():
    """With the teacher fixed, the student learns to regress its targets. Masked patches all
    start as the same mask vector and the relative position bias at zero, so predictions first
    plateau at the per-image mean (loss ~0.22) until the bias learns to tell positions apart."""
    cfg = load_config("image-v1-tiny", TINY_V1)
    model = build_model(cfg)
    torch.manual_seed(2)
    images = torch.randn(4, 3, 16, 16)
    mask = torch.from_numpy(beit_block_mask(4, 4, 4, 0.6, make_rng(0), min_block=2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(160):
        loss = model(images, mask).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]


def test_short_v1_image_run__completes_and_embeds(tmp_path):
    data = make_image_folder(tmp_path / "images", n_per_class=8, size=16)
    cfg = load_config("image-v1-tiny", [*TINY_V1, "train.max_steps=12", "train.collapse_after=100"])
    result = pretrain(cfg, data, tmp_path / "run")
    assert result.steps == 12 and result.stopped == "max_steps"
    logs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert all(0.4 < entry["masked_fraction"] < 0.7 for entry in logs)  # BEiT masks, ~60 %
    from data2vec.evaluate.features import load_encoder

    loaded_cfg, encoder = load_encoder(tmp_path / "run")
    assert loaded_cfg.model.block == "layer_scale"
    with torch.no_grad():
        assert encoder(torch.randn(2, 3, 16, 16)).x.shape == (2, 17, 32)


def test_config__beit_masks_only_for_images_and_relative_positions_need_one_cls():
    with pytest.raises(ConfigError, match=r"encoder\.num_extra_tokens"):
        load_config("image-v1-tiny", ["encoder.num_extra_tokens=2"])
    with pytest.raises(ConfigError, match=r"mask\.kind.*allowed"):
        ImageMaskGenerator(load_config("image-v1-tiny", ["mask.kind=span"]), (7, 7))
    with pytest.raises(ConfigError, match=r"mask\.kind"):
        load_config("audio-v1-tiny", ["mask.kind=beits"])


def test_relative_positions_also_work_with_token_dropping():
    """A 2.0 model with the BEiT backbone: the bias follows the kept patches."""
    cfg = load_config(
        "image-v2-tiny",
        ["model.block=layer_scale", "encoder.positions=relative", "encoder.prenet_depth=0",
         "model.embed_dim=32", "model.num_heads=2", "model.depth=2", "encoder.image_size=16",
         "decoder.dim=16", "decoder.groups=4", "target.top_k=2"],
    )  # fmt: skip
    encoder = build_encoder(cfg)
    bias = encoder.modality.rel_pos_bias
    with torch.no_grad():
        bias.relative_position_bias_table.normal_()
    kept = torch.tensor([[0, 5, 9], [2, 3, 15]])
    full = bias()[0]  # (H, 17, 17)
    sub = bias(kept)
    for row in range(2):
        idx = torch.cat([torch.tensor([0]), kept[row] + 1])
        torch.testing.assert_close(sub[row], full[:, idx][:, :, idx])
