"""The audio modality: CNN arithmetic, ALiBi, 1-D masks, padding invariance, fairseq parity."""

import numpy as np
import pytest
import torch

from data2vec.config import load_config
from data2vec.convert.fairseq import import_v2
from data2vec.masking import MaskInfo, block_mask_1d, make_rng
from data2vec.modalities.audio import alibi_slopes, frame_lengths
from data2vec.models.registry import build_encoder, build_model
from tests.conftest import FIXTURES

FIXTURE = FIXTURES / "fairseq" / "v2_audio_tiny"

TINY_AUDIO = [
    "model.modality=audio", "model.embed_dim=32", "model.depth=2", "model.num_heads=4",
    "encoder.cnn_channels=16", "encoder.pos_conv_groups=4", "decoder.dim=16", "decoder.groups=4",
    "decoder.layers=2", "decoder.kernel=7", "target.top_k=2", "target.final_norm=none",
    "mask.kind=block", "mask.ratio=0.5", "mask.block=5", "mask.adjust=0.05", "mask.clones=2",
    "loss.cls_weight=0", "ema.scope=context",
]  # fmt: skip


def audio_config(*extra):
    return load_config("audio-v2-base", [*TINY_AUDIO, *extra])


@pytest.mark.parametrize("samples", [400, 401, 719, 720, 1000, 16000, 32123])
def test_frame_lengths__match_the_cnn(samples):
    enc = build_encoder(audio_config())
    with torch.no_grad():
        T = enc.modality.local_encoder(torch.randn(1, samples)).shape[1]
    assert int(frame_lengths(torch.tensor([samples]))[0]) == T


def test_frame_lengths__hand_values():
    # 20 ms frames, 25 ms receptive field: (S - 400) // 320 + 1 for these lengths
    assert frame_lengths(torch.tensor([400, 16000, 320000])).tolist() == [1, 49, 999]


def test_alibi_slopes__powers_of_two_and_workaround():
    assert alibi_slopes(4) == pytest.approx([2**-2, 2**-4, 2**-6, 2**-8])
    assert alibi_slopes(8) == pytest.approx([2.0**-k for k in range(1, 9)])
    # 6 heads: the 4-head slopes, then every other slope of 8 heads
    assert alibi_slopes(6) == pytest.approx([2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3])


def test_alibi_bias__hand_worked_with_kept_positions():
    enc = build_encoder(
        audio_config("model.num_heads=2", "model.embed_dim=16", "encoder.pos_conv_groups=2")
    )
    mod = enc.modality
    with torch.no_grad():
        mod.alibi_scale.copy_(torch.tensor([1.0, -3.0]))  # negative scale is clamped to 0
    pos = torch.tensor([[0, 2, 5]])
    with torch.no_grad():
        bias = mod.attention_bias(pos, 6, pos.device)
    slope0 = 2.0**-4  # 2 heads: start 2^(-8/2)
    expected0 = -slope0 * torch.tensor([[0, 2, 5], [2, 0, 3], [5, 3, 0]], dtype=torch.float32)
    torch.testing.assert_close(bias[0, 0], expected0)
    assert bias.shape == (1, 2, 3, 3) and float(bias[0, 1].abs().max()) == 0.0


def test_block_mask_1d__exact_count_spans_and_determinism():
    m = block_mask_1d(100, 64, 0.5, make_rng(3), span=5, adjust=0.05)
    assert (m.sum(1) == 50).all()
    assert (m == block_mask_1d(100, 64, 0.5, make_rng(3), span=5, adjust=0.05)).all()
    # masked frames come in runs: most masked frames have a masked neighbour
    run = (m[:, 1:] & m[:, :-1]).sum() / m.sum()
    assert run > 0.7


def _padded_pair(enc, long=9600, short=6400):
    a = torch.randn(1, long)
    b = torch.randn(1, short)
    batch = torch.zeros(2, long)
    batch[0] = a[0]
    batch[1, :short] = b[0]
    pad = torch.zeros(2, long, dtype=torch.bool)
    pad[1, short:] = True
    return b, batch, pad


@pytest.mark.parametrize("exact", [True, False])
def test_padded_utterance_gives_the_same_features_as_alone(exact):
    enc = build_encoder(audio_config(f"model.exact_padding={str(exact).lower()}")).eval()
    alone_wave, batch, pad = _padded_pair(enc)
    with torch.no_grad():
        alone = enc(alone_wave)
        padded = enc(batch, pad)
    T = alone.x.shape[1]
    assert padded.padding_mask[1].sum() == padded.x.shape[1] - T
    diff = float((padded.x[1, :T] - alone.x[0]).abs().max())
    if exact:
        assert diff < 1e-5
    else:  # fairseq lets padded frames leak through the positional convolution
        assert diff > 1e-3


def test_padding_never_reaches_the_loss():
    cfg = audio_config("model.exact_padding=true")
    model = build_model(cfg).eval()
    _, batch, pad = _padded_pair(model.encoder)
    T = int(frame_lengths(torch.tensor([9600]))[0])
    valid = [T, int(frame_lengths(torch.tensor([6400]))[0])]
    rows = []
    for b in range(2):  # masks drawn on each utterance's own frames, padding kept visible-last
        m = np.ones((2, T), dtype=bool)
        m[:, : valid[b]] = block_mask_1d(valid[b], 2, 0.5, make_rng(b))
        rows.append(m)
    mask = np.concatenate(rows)
    keep = int((~mask).sum(1).max())
    for r in range(len(mask)):  # equal visible counts: reveal padded frames (never in the loss)
        extra = keep - int((~mask[r]).sum())
        mask[r, np.flatnonzero(mask[r])[-extra:] if extra else []] = False
    mask = torch.from_numpy(mask)
    noise = torch.zeros(int(mask.sum()), cfg.model.embed_dim)
    with torch.no_grad():
        a = model(batch, mask, pad, noise=noise)
        batch2 = batch.clone()
        batch2[1, 6400:] = torch.randn(3200) * 10
        b = model(batch2, mask, pad, noise=noise)
    torch.testing.assert_close(a.loss, b.loss)
    assert a.sample_size < int(mask.sum())  # masked padding was left out


# ------------------------------------------------------------------ parity with fairseq


@pytest.fixture(scope="module")
def fixture():
    cfg, model = import_v2(FIXTURE.with_suffix(".pt"))
    return cfg, model.eval(), dict(np.load(FIXTURE.with_suffix(".npz")))


def t(a):
    return torch.from_numpy(np.asarray(a))


def test_fairseq_audio_parity__features_layers_and_padding(fixture):
    _, model, z = fixture
    with torch.no_grad():
        local, pad = model.encoder.modality.embed(t(z["input"]), t(z["padding_mask"]))
        ctx = model.encoder.modality.contextualize(local, pad)
        out = model.encoder.forward_blocks(ctx, keep_layers=True)
    assert torch.equal(pad, t(z["features_padding_mask"]))
    torch.testing.assert_close(local, t(z["local_features"]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ctx.x, t(z["prenet_out"]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.x, t(z["features"]), atol=1e-4, rtol=1e-4)
    for ours, ref in zip(out.layer_results, z["layer_results"]):
        torch.testing.assert_close(ours, t(ref), atol=1e-4, rtol=1e-4)


def test_fairseq_audio_parity__targets_predictions_and_loss(fixture):
    cfg, model, z = fixture
    x, pad, mask = t(z["input"]), t(z["padding_mask"]), t(z["mask"])
    info = MaskInfo.from_mask(mask)
    noise = t(z["decoder_input"])[mask]
    with torch.no_grad():
        local, fpad = model.encoder.modality.embed(x, pad)
        targets = model.forward_targets(x, pad, local, fpad)
        student = model.forward_student(local, fpad, info)
        dec_in = model.decoder_input(student, info, noise)
        pred = model.decoder(dec_in, info.mask)
        out = model(x, mask, pad, noise=noise)
    rows = torch.arange(mask.shape[0]).div(cfg.mask.clones, rounding_mode="floor")
    y = targets[rows[:, None].expand_as(mask)[mask], mask.nonzero()[:, 1]]
    torch.testing.assert_close(dec_in, t(z["decoder_input"]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(y, t(z["targets"]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pred, t(z["pred"]), atol=1e-4, rtol=1e-4)
    n = int(z["sample_size"])
    assert out.sample_size == n
    assert float(out.loss) == pytest.approx(float(z["total_loss"]) / n, rel=1e-5)


def test_fairseq_audio_parity__teacher_shares_the_student_cnn(fixture):
    _, model, z = fixture
    teacher = model.teacher.model
    assert teacher.modality.local_encoder is None  # ema_local_encoder=False: CNN stays shared
    x, pad = t(z["input"]), t(z["padding_mask"])
    with torch.no_grad():
        local, fpad = model.encoder.modality.embed(x, pad)
        out = teacher.forward_blocks(teacher.modality.contextualize(local, fpad), keep_layers=True)
    for ours, ref in zip(out.layer_results, z["teacher_layer_results"]):
        torch.testing.assert_close(ours, t(ref), atol=1e-4, rtol=1e-4)
