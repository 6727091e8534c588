"""The data2vec 2.0 objective: structure tests and parity with the original fairseq code."""

import numpy as np
import pytest
import torch

from data2vec.convert.fairseq import import_v2
from data2vec.masking import MaskInfo
from data2vec.models.registry import build_model
from data2vec.targets import per_dim_std
from tests.conftest import FIXTURES, image_batch, tiny_config

FIXTURE = FIXTURES / "fairseq" / "v2_image_tiny"


def test_teacher_runs_once_per_sample_whatever_the_clones():
    seen = {}
    for clones in (1, 4):
        cfg = tiny_config(f"mask.clones={clones}")
        model = build_model(cfg)
        rows: list[int] = []
        seen[clones] = rows
        block = model.teacher.model.blocks[0]
        block.register_forward_hook(lambda m, i, o, rows=rows: rows.append(i[0].shape[0]))
        x, mask = image_batch(cfg, B=3)
        model(x, mask)
    assert seen == {1: [3], 4: [3]}


def test_student_encodes_visible_tokens_only():
    cfg = tiny_config("mask.clones=4", "mask.ratio=0.75")
    model = build_model(cfg)
    shapes = []
    model.encoder.blocks[0].register_forward_hook(lambda m, i, o: shapes.append(tuple(i[0].shape)))
    x, mask = image_batch(cfg, B=2)
    model(x, mask)
    visible = 16 - (16 - int(16 * 0.25))  # 4x4 grid, 25% kept
    assert shapes == [(2 * 4, 1 + visible, cfg.model.embed_dim)]  # + CLS


def _encoded(cfg):
    """A model of ``cfg`` and its stages on a 2-sample batch: ``(model, mask, info, targets,
    student)``."""
    model = build_model(cfg)
    x, mask = image_batch(cfg, B=2)
    info = MaskInfo.from_mask(mask)
    local, _ = model.encoder.modality.embed(x)
    targets = model.forward_targets(x, None, local, None)
    return model, mask, info, targets, model.forward_student(local, None, info)


def test_loss_only_over_masked_positions():
    cfg = tiny_config("loss.cls_weight=0")
    model, mask, info, targets, student = _encoded(cfg)
    pred = model.decoder(model.decoder_input(student, info), info.mask)
    base = model.forward_loss(pred, targets, student, info.mask).loss
    visible_only = targets.clone()
    clone_rows = info.mask.view(2, cfg.mask.clones, -1)
    never_masked = ~clone_rows.any(1)  # positions no clone of the sample masks
    assert never_masked.any()
    visible_only[never_masked] += 100.0
    same = model.forward_loss(pred, visible_only, student, info.mask).loss
    torch.testing.assert_close(same, base)
    masked_changed = targets.clone()
    masked_changed[clone_rows[:, 0]] += 1.0
    changed = model.forward_loss(pred, masked_changed, student, info.mask).loss
    assert float(changed.detach()) > float(base.detach()) + 0.1
    assert model.forward_loss(pred, targets, student, info.mask).sample_size == int(mask.sum())


def test_loss_from_masked_row_indices_equals_loss_from_the_mask():
    """The forward pass hands the decoder and the loss flat indices (no device sync); the
    boolean mask (which finds them on the device) gives the same values and gradients."""
    cfg = tiny_config()
    model, mask, info, targets, student = _encoded(cfg)
    full = model.decoder_input(student, info, torch.randn(int(mask.sum()), cfg.model.embed_dim))
    results = []
    for rows in (None, info.masked_rows()):
        model.zero_grad()
        pred = model.decoder(full, info.mask if rows is None else rows)
        out = model.forward_loss(pred, targets, student, info.mask, rows)
        out.loss.backward(retain_graph=True)
        grads = [p.grad.clone() for p in model.decoder.parameters()]
        results.append((out.loss.detach(), out.sample_size, out.logs["target_std"], grads))
    (loss_a, n_a, std_a, g_a), (loss_b, n_b, std_b, g_b) = results
    assert torch.equal(loss_a, loss_b) and n_a == n_b == int(mask.sum())
    assert torch.equal(std_a, std_b)
    assert all(torch.equal(a, b) for a, b in zip(g_a, g_b))


def test_decoder_input__visible_in_place_noise_elsewhere():
    cfg = tiny_config()
    model = build_model(cfg)
    x, mask = image_batch(cfg, B=2)
    info = MaskInfo.from_mask(mask)
    local, _ = model.encoder.modality.embed(x)
    student = model.forward_student(local, None, info)
    noise = torch.full((int(mask.sum()), cfg.model.embed_dim), 7.0)
    full = model.decoder_input(student, info, noise).detach()
    assert (full[mask] == 7.0).all()
    for n in range(mask.shape[0]):
        torch.testing.assert_close(full[n, info.ids_keep[n]], student.tokens[n])
    full = model.decoder_input(student, info)
    drawn = full[mask].detach()  # N(0, 0.01²)
    assert abs(float(drawn.std()) - cfg.mask.noise_std) < 0.003
    assert abs(float(drawn.mean())) < 0.001
    for n in range(mask.shape[0]):
        torch.testing.assert_close(full[n, info.ids_keep[n]], student.tokens[n])
    # the gradient reaches each visible output from its own position, nothing from the noise
    r = torch.randn(full.shape)
    (grad,) = torch.autograd.grad((full * r).sum(), student.x)
    extra = student.x.shape[1] - student.tokens.shape[1]
    assert not grad[:, :extra].any()
    for n in range(mask.shape[0]):
        assert torch.equal(grad[n, extra:], r[n, info.ids_keep[n]])


def test_cls_loss_weight_and_logged_statistics():
    cfg = tiny_config("loss.cls_weight=0.5")
    model = build_model(cfg)
    x, mask = image_batch(cfg, B=3)
    torch.manual_seed(1)
    with_cls = model(x, mask)
    cfg0 = tiny_config("loss.cls_weight=0")
    model0 = build_model(cfg0)
    model0.load_state_dict(model.state_dict())
    model0.teacher.load_state_dict(model.teacher.state_dict())
    torch.manual_seed(1)
    without = model0(x, mask)
    torch.testing.assert_close(with_cls.loss - without.loss, with_cls.logs["loss_cls"])
    for key in ("target_std", "pred_std", "loss_regression", "masked_fraction"):
        assert torch.isfinite(with_cls.logs[key])


def test_logged_target_std_is_the_std_of_each_predictions_target(monkeypatch):
    """The loss's targets are rows of the per-sample table read by index; the logged target
    std (from how often each row is read) is that of the rows the predictions are compared
    with, 3 samples x 4 clones with different masks."""
    import data2vec.models.data2vec2 as d2v2

    cfg = tiny_config("mask.clones=4")
    model = build_model(cfg)
    x, mask = image_batch(cfg, B=3)
    seen = []
    real = d2v2.regression_loss

    def spy(pred, target, beta, scale, index=None):
        if index is not None:
            seen.append(target[index])
        return real(pred, target, beta, scale, index)

    monkeypatch.setattr(d2v2, "regression_loss", spy)
    out = model(x, mask)
    assert len(seen) == 1 and seen[0].shape[0] == int(mask.sum())
    torch.testing.assert_close(out.logs["target_std"], per_dim_std(seen[0]), rtol=1e-6, atol=0)


def test_wrong_number_of_mask_rows_is_an_error():
    cfg = tiny_config("mask.clones=2")
    model = build_model(cfg)
    x, mask = image_batch(cfg, B=2)
    with pytest.raises(ValueError, match="mask rows"):
        model(x, mask[:3])


# ------------------------------------------------------------------ parity with fairseq


@pytest.fixture(scope="module")
def fixture():
    cfg, model = import_v2(FIXTURE.with_suffix(".pt"))
    return cfg, model.eval(), dict(np.load(FIXTURE.with_suffix(".npz")))


def t(a):
    return torch.from_numpy(np.asarray(a))


def test_fairseq_parity__encoder_features_and_layers(fixture):
    _, model, z = fixture
    with torch.no_grad():
        local, _ = model.encoder.modality.embed(t(z["input"]))
        ctx = model.encoder.modality.contextualize(local)
        out = model.encoder.forward_blocks(ctx, keep_layers=True)
    torch.testing.assert_close(local, t(z["local_features"]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ctx.x, t(z["prenet_out"]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.x, t(z["features"]), atol=1e-4, rtol=1e-4)
    for ours, ref in zip(out.layer_results, z["layer_results"]):
        torch.testing.assert_close(ours, t(ref), atol=1e-4, rtol=1e-4)
    for ours, ref in zip(out.layer_outputs, z["layer_outputs"]):
        torch.testing.assert_close(ours, t(ref), atol=1e-4, rtol=1e-4)


def test_fairseq_parity__targets_predictions_and_loss(fixture):
    cfg, model, z = fixture
    x, mask = t(z["input"]), t(z["mask"])
    info = MaskInfo.from_mask(mask)
    noise = t(z["decoder_input"])[mask]
    with torch.no_grad():
        local, _ = model.encoder.modality.embed(x)
        targets = model.forward_targets(x, None, local, None)
        student = model.forward_student(local, None, info)
        dec_in = model.decoder_input(student, info, noise)
        dec_out = model.decoder(dec_in)
        pred = model.decoder(dec_in, info.mask)
        out = model.forward_loss(pred, targets, student, info.mask)
    rows = torch.arange(mask.shape[0]).div(cfg.mask.clones, rounding_mode="floor")
    y = targets[rows[:, None].expand_as(mask)[mask], mask.nonzero()[:, 1]]
    torch.testing.assert_close(dec_in, t(z["decoder_input"]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dec_out, t(z["decoder_output"]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(y, t(z["targets"]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pred, t(z["pred"]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(student.x[:, 0], t(z["cls_pred"]), atol=1e-4, rtol=1e-4)
    n = int(z["sample_size"])
    assert out.sample_size == n
    # fairseq sums; its trainer divides by the number of masked tokens.
    assert float(out.logs["loss_regression"]) == pytest.approx(float(z["loss"]) / n, rel=1e-5)
    assert float(out.logs["loss_cls"]) == pytest.approx(float(z["cls_loss"]) / n, rel=1e-5)
    assert float(out.loss) == pytest.approx(float(z["total_loss"]) / n, rel=1e-5)


def test_fairseq_parity__teacher_layer_results(fixture):
    _, model, z = fixture
    teacher = model.teacher.model
    with torch.no_grad():
        local, _ = teacher.modality.embed(t(z["input"]))
        out = teacher.forward_blocks(teacher.modality.contextualize(local), keep_layers=True)
    for ours, ref in zip(out.layer_results, z["teacher_layer_results"]):
        torch.testing.assert_close(ours[:, 1:], t(ref), atol=1e-4, rtol=1e-4)


def test_fairseq_import__config_translated(fixture):
    cfg, _, _ = fixture
    assert (cfg.model.depth, cfg.model.embed_dim, cfg.encoder.prenet_depth) == (2, 64, 1)
    assert (cfg.mask.clones, cfg.target.top_k, cfg.decoder.dim) == (2, 2, 32)
    assert cfg.ema.scope == "all" and cfg.target.final_norm == "layer"
