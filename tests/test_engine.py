import math
import shutil

import pytest
import torch

from data2vec.engine import checkpoint as ckpt
from data2vec.engine.metrics import read_metrics
from data2vec.engine.optim import adamw, keep_implementation, no_decay_names, param_groups
from data2vec.engine.schedules import lr_at
from data2vec.engine.trainer import pretrain
from data2vec.errors import UserError
from data2vec.models.registry import build_model
from tests.conftest import make_image_folder, tiny_config


def test_lr_schedule__warmup_cosine_and_constant():
    assert lr_at(0, 1.0, 10, 110) == pytest.approx(0.1)
    assert lr_at(9, 1.0, 10, 110) == pytest.approx(1.0)
    assert lr_at(10, 1.0, 10, 110) == pytest.approx(1.0)
    assert lr_at(60, 1.0, 10, 110) == pytest.approx(0.5)  # half way down the cosine
    assert lr_at(110, 1.0, 10, 110) == pytest.approx(0.0)
    assert lr_at(500, 1.0, 10, 110, final_lr_ratio=0.1) == pytest.approx(0.1)
    assert lr_at(500, 1.0, 10, 110, schedule="constant") == 1.0


def test_weight_decay_groups__no_decay_on_bias_norm_and_cls():
    model = build_model(tiny_config())
    skip = no_decay_names(model)
    assert "encoder.modality.extra_tokens" in skip
    assert "encoder.blocks.0.norm1.weight" in skip and "encoder.blocks.0.attn.qkv.bias" in skip
    assert "encoder.blocks.0.attn.qkv.weight" not in skip
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    n = sum(1 for p in model.parameters() if p.requires_grad)
    assert len(decay["params"]) + len(no_decay["params"]) == n
    # positions are a fixed buffer: never optimized
    assert "encoder.modality.pos_embed" not in dict(model.named_parameters())


def _adam_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in ((64, 32), (32,), (7, 3))]


def _adam_steps(opt, params, steps=5):
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()


def test_adamw__fused_on_cpu_and_the_same_updates_as_foreach():
    hyper = {"lr": 1e-2, "betas": (0.9, 0.98), "eps": 1e-6}
    fused_p, foreach_p = _adam_params(), _adam_params()
    fused = adamw(lambda: [{"params": fused_p, "weight_decay": 0.05}], **hyper)
    assert fused.defaults["fused"] is True  # PyTorch >= 2.4 has the CPU kernel
    ref = torch.optim.AdamW([{"params": foreach_p, "weight_decay": 0.05}], foreach=True, **hyper)
    _adam_steps(fused, fused_p)
    _adam_steps(ref, foreach_p)
    for a, b, start in zip(fused_p, foreach_p, _adam_params(), strict=True):
        assert not torch.equal(a, start)  # it moved
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_adamw__falls_back_to_foreach_with_fresh_groups(monkeypatch):
    real, calls = torch.optim.AdamW, []

    def no_fused(groups, **kw):
        calls.append(dict(groups[0]))
        if kw.get("fused"):
            groups[0]["fused"] = True  # what a constructor that fails late leaves behind
            raise RuntimeError("`fused=True` requires all the params to be on supported devices")
        return real(groups, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", no_fused)
    opt = adamw(lambda: [{"params": _adam_params()}], lr=1e-3)
    assert len(calls) == 2 and "fused" not in calls[1]
    assert opt.defaults["foreach"] is True and not opt.defaults["fused"]


def test_keep_implementation__a_foreach_checkpoint_loads_into_a_fused_run():
    old_p, new_p = _adam_params(), _adam_params()
    old = torch.optim.AdamW(old_p, lr=1e-2, foreach=True)
    _adam_steps(old, old_p, steps=2)
    new = adamw(lambda: [{"params": new_p}], lr=1e-2)
    with keep_implementation(new):
        new.load_state_dict(old.state_dict())
    assert new.param_groups[0]["fused"] is True and not new.param_groups[0]["foreach"]
    assert torch.equal(new.state[new_p[0]]["exp_avg"], old.state[old_p[0]]["exp_avg"])
    new.load_state_dict(old.state_dict())  # without it the saved flags come back
    assert new.param_groups[0]["foreach"] is True


def _history(run):
    return {r["step"]: r for r in read_metrics(run / "metrics.jsonl")}


def test_short_training_run__loss_falls(tmp_path):
    data = make_image_folder(tmp_path / "data", n_per_class=8)
    cfg = tiny_config("train.max_steps=40", "optim.lr=5e-3", "optim.warmup_steps=5")
    result = pretrain(cfg, data, tmp_path / "run")
    assert result.steps == 40 and result.stopped == "max_steps"
    losses = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    assert len(losses) == 40 and all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, (first, last)


def test_run_directory_contents(tmp_path, image_folder):
    run = tmp_path / "run"
    pretrain(tiny_config("train.max_steps=3", "train.checkpoint_every=2"), image_folder, run)
    assert (run / "config.yaml").is_file() and (run / "skipped.tsv").is_file()
    names = [p.name for p in ckpt.list_checkpoints(run)]
    assert names == ["step_00000002", "step_00000003"]
    for f in (ckpt.MODEL_FILE, ckpt.TEACHER_FILE, ckpt.STATE_FILE, ckpt.CONFIG_FILE):
        assert (run / "checkpoints" / names[-1] / f).is_file()


def test_save_then_resume__identical_next_steps(tmp_path, image_folder):
    cfg = tiny_config("train.max_steps=6", "train.checkpoint_every=3", "train.keep_checkpoints=5")
    straight = tmp_path / "straight"
    pretrain(cfg, image_folder, straight)
    # A run "killed" after step 3: the same run directory holding only the step-3 checkpoint.
    killed = tmp_path / "killed"
    (killed / "checkpoints").mkdir(parents=True)
    shutil.copytree(
        straight / "checkpoints" / "step_00000003", killed / "checkpoints" / "step_00000003"
    )
    resumed = pretrain(cfg, image_folder, killed, resume=True)
    assert resumed.steps == 6
    a, b = _history(straight), _history(killed)
    assert sorted(b) == [4, 5, 6]
    for step in (4, 5, 6):
        assert a[step]["loss"] == b[step]["loss"], step
    s1 = ckpt.load_trainer_checkpoint(ckpt.list_checkpoints(straight)[-1])
    s2 = ckpt.load_trainer_checkpoint(ckpt.list_checkpoints(killed)[-1])
    for k, v in s1[0].items():
        assert torch.equal(v, s2[0][k]), k
    for k, v in s1[1].items():
        assert torch.equal(v, s2[1][k]), k


def test_rng_state__survives_a_weights_only_round_trip(tmp_path):
    """Every global RNG draws the same after save / load / restore; numpy's uint32 key words
    go to the file as int64 (torch 2.4 cannot save uint32 tensors), and the uint32 tensors of
    older checkpoints still restore."""
    import random

    import numpy as np

    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    state = ckpt.rng_state()
    assert state["numpy"][1].dtype == torch.int64
    torch.save(state, tmp_path / "rng.pt")
    expected = (np.random.rand(4), torch.rand(4), random.random())
    np.random.seed(0)
    torch.manual_seed(0)
    random.seed(0)
    ckpt.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (np.random.rand(4), torch.rand(4), random.random())
    assert np.array_equal(expected[0], again[0]) and torch.equal(expected[1], again[1])
    assert expected[2] == again[2]
    if hasattr(torch, "uint32"):  # the layout written before
        name, keys, *rest = state["numpy"]
        legacy = torch.from_numpy(keys.numpy().astype(np.uint32))
        ckpt.set_rng_state({**state, "numpy": (name, legacy, *rest)})
        assert np.array_equal(np.random.rand(4), expected[0])


def test_refuses_to_overwrite_a_run_without_resume(tmp_path, image_folder):
    run = tmp_path / "run"
    pretrain(tiny_config("train.max_steps=1"), image_folder, run)
    with pytest.raises(UserError, match="--resume"):
        pretrain(tiny_config("train.max_steps=1"), image_folder, run)


def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path, image_folder):
    run = tmp_path / "run"
    pretrain(tiny_config("train.max_steps=4", "train.checkpoint_every=2"), image_folder, run)
    latest = ckpt.list_checkpoints(run)[-1]
    (latest / ckpt.MODEL_FILE).write_bytes(b"garbage")
    path, _ = ckpt.latest_loadable(run)
    assert path.name == "step_00000002"
    # a leftover temporary directory from a crash mid-save is never taken for a checkpoint
    shutil.copytree(path, run / "checkpoints" / ".tmp_step_00000009_1")
    assert ckpt.list_checkpoints(run)[-1].name == latest.name


def test_max_steps_zero_writes_initial_model(tmp_path, image_folder):
    run = tmp_path / "run"
    result = pretrain(tiny_config("train.max_steps=0"), image_folder, run)
    assert result.steps == 0 and ckpt.list_checkpoints(run)[0].name == "step_00000000"


def test_collapse_guard_stops_without_saving_the_collapsed_state(tmp_path, image_folder):
    run = tmp_path / "run"
    cfg = tiny_config(
        "train.max_steps=10",
        "train.min_target_std=100",
        "train.collapse_after=2",
        "train.checkpoint_every=1",
    )
    result = pretrain(cfg, image_folder, run)
    assert result.stopped == "collapse" and result.steps == 2
    assert ckpt.list_checkpoints(run)[-1].name == "step_00000001"
    record = read_metrics(run / "metrics.jsonl")[-1]
    assert record["target_std"] < 100 and record["pred_std"] > 0


def test_nonfinite_steps_are_skipped_counted_and_stop_the_run(tmp_path, image_folder, monkeypatch):
    """From the 4th forward pass on the loss is NaN: 3 good steps, then 3 skipped ones, stop."""
    from data2vec.models.data2vec2 import Data2Vec2

    original = Data2Vec2.forward_loss
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] > 3:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(Data2Vec2, "forward_loss", poisoned)
    run = tmp_path / "run"
    cfg = tiny_config("train.max_steps=20", "train.checkpoint_every=1", "train.max_nonfinite=3")
    result = pretrain(cfg, image_folder, run)
    assert result.stopped == "nonfinite" and result.steps == 3
    assert calls["n"] == 6  # 3 good + 3 skipped, then the stop
    assert ckpt.list_checkpoints(run)[-1].name == "step_00000003"
    model_state, _, trainer_state = ckpt.load_trainer_checkpoint(ckpt.list_checkpoints(run)[-1])
    assert all(torch.isfinite(v).all() for v in model_state.values())
    assert trainer_state["skipped_steps"] == 0  # saved before the bad steps


def test_train_step__reads_the_device_once(monkeypatch):
    """A data2vec 2.0 step reads no value from the device before its loss and gradient norm,
    which come back together: each read stalls a GPU until the host queues work again. The
    mask is checked and counted on the host, where the loader made it (not counted here)."""
    import traceback

    from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

    import data2vec.engine.trainer as trainer
    from data2vec.bench import _synthetic_batch
    from data2vec.masking import MaskInfo

    reads = {"aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero", "aten::equal"}

    class Reads(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.where: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func._schema.name
            # Boolean indexing counts the mask inside the kernel (a read on a GPU).
            boolean = name in ("aten::index", "aten::index_put", "aten::index_put_") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]
            )
            if name in reads or boolean:
                ours = [f for f in traceback.extract_stack() if "/data2vec/" in f.filename]
                line = f"{ours[-1].filename}:{ours[-1].lineno}" if ours else "?"
                self.where.append(f"{name} at {line}")
            return func(*args, **(kwargs or {}))

    original = MaskInfo.from_mask.__func__

    def on_host(cls, mask, device=None):
        assert mask.device.type == "cpu"  # as the loader made it
        with _disable_current_modes():
            return original(cls, mask, device)

    monkeypatch.setattr(MaskInfo, "from_mask", classmethod(on_host))
    monkeypatch.setattr(trainer, "read_scalars", _counted(trainer.read_scalars))
    cfg = tiny_config("mask.clones=2")
    device = torch.device("cpu")
    state = trainer.new_state(build_model(cfg), cfg, device)
    batch = _synthetic_batch(cfg, 2)
    with Reads() as seen:
        result = trainer.train_step(state, batch, cfg, device)
    assert result.updated and math.isfinite(result.loss) and math.isfinite(result.grad_norm)
    assert seen.where == []
    assert trainer.read_scalars.calls == 1


def test_train_step__a_skipped_update_leaves_weights_and_optimizer_state(monkeypatch):
    """The update is queued before the loss is read; a non-finite loss must then leave the
    weights, the AdamW moments and its step count as they were (the fused kernel skips it)."""
    import data2vec.engine.trainer as trainer
    from data2vec.bench import _synthetic_batch
    from data2vec.models.data2vec2 import Data2Vec2

    cfg = tiny_config("mask.clones=2")
    device = torch.device("cpu")
    state = trainer.new_state(build_model(cfg), cfg, device)
    batch = _synthetic_batch(cfg, 2)
    assert trainer.train_step(state, batch, cfg, device).updated
    assert trainer._fused(state.optimizer)  # the queued path (PyTorch >= 2.4 on the CPU)

    def snapshot():
        weights = {n: p.detach().clone() for n, p in state.model.named_parameters()}
        moments = {
            (id(p), k): v.clone() for p, st in state.optimizer.state.items() for k, v in st.items()
        }
        return weights, moments

    before = snapshot()
    original = Data2Vec2.forward_loss

    def poisoned(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(Data2Vec2, "forward_loss", poisoned)
    result = trainer.train_step(state, batch, cfg, device)
    assert not result.updated and state.step == 1 and state.skipped_steps == 1
    after = snapshot()
    for part_before, part_after in zip(before, after):
        assert part_before.keys() == part_after.keys()
        assert all(torch.equal(part_before[k], part_after[k]) for k in part_before)
    assert all(p.grad is None for p in state.model.parameters())
    monkeypatch.setattr(Data2Vec2, "forward_loss", original)
    assert trainer.train_step(state, batch, cfg, device).updated and state.step == 2
    steps = {float(st["step"]) for st in state.optimizer.state.values()}
    assert steps == {2.0}  # the skipped update did not count


def _counted(fn):
    def wrapper(*args, **kwargs):
        wrapper.calls += 1
        return fn(*args, **kwargs)

    wrapper.calls = 0
    return wrapper


def test_read_scalars__one_list_in_order():
    from data2vec.engine.trainer import read_scalars

    got = read_scalars([torch.tensor(2.5), 1.0, torch.tensor([3.0], dtype=torch.bfloat16), 4])
    assert got == [2.5, 1.0, 3.0, 4.0] and all(type(v) is float for v in got)
    assert read_scalars([]) == []


def test_bad_files_are_skipped_and_reported(tmp_path):
    data = make_image_folder(tmp_path / "data")
    (data / "class0" / "broken.png").write_bytes(b"\x89PNG not really")
    (data / "class1" / "empty.jpg").write_bytes(b"")
    run = tmp_path / "run"
    result = pretrain(tiny_config("train.max_steps=4"), data, run)
    assert result.steps == 4
    report = (run / "skipped.tsv").read_text().splitlines()
    assert sorted(line.split("\t")[0].rsplit("/", 1)[1] for line in report) == [
        "broken.png",
        "empty.jpg",
    ]
    assert result.skipped_inputs == 2


def test_fp16_on_cpu_is_refused_before_any_work(tmp_path, image_folder):
    from data2vec.errors import ConfigError

    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        pretrain(
            tiny_config("train.precision=fp16", "train.device=cpu"), image_folder, tmp_path / "r"
        )
    assert not (tmp_path / "r" / "config.yaml").exists()


def test_bf16_autocast_trains_with_fp32_weights_and_targets(tmp_path, image_folder):
    result = pretrain(
        tiny_config("train.precision=bf16", "train.max_steps=3"), image_folder, tmp_path / "r"
    )
    assert result.steps == 3 and math.isfinite(result.history[-1]["loss"])
    state = ckpt.load_trainer_checkpoint(ckpt.list_checkpoints(tmp_path / "r")[-1])
    assert all(v.dtype == torch.float32 for v in state[0].values() if v.is_floating_point())
    assert all(v.dtype == torch.float32 for v in state[1].values() if v.is_floating_point())
