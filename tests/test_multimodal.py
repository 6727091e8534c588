"""A joint model: shared blocks pretrained on images, speech and text at once."""

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch

from data2vec.cli import main
from data2vec.config import ConfigError, load_config
from data2vec.data.multimodal import (
    batches_before,
    detect_modality,
    interleave_pattern,
    parse_data_specs,
)
from data2vec.engine.schedules import lr_at
from data2vec.engine.trainer import new_state, pretrain, train_step
from data2vec.errors import UserError
from data2vec.evaluate.features import embed_path, load_encoder
from data2vec.models.multimodal import MultiEncoder, modality_configs
from data2vec.models.registry import build_model
from tests.conftest import make_audio_folder, make_image_folder
from tests.test_text_pipeline import text_corpus

PER_MODALITY = " ".join(
    [
        "image:encoder.image_size=16", "image:encoder.patch_size=4", "image:mask.clones=2",
        "image:decoder.dim=16", "image:decoder.groups=4", "image:decoder.layers=2",
        "image:target.top_k=2", "image:data.batch_size=4",
        "audio:encoder.cnn_channels=16", "audio:encoder.pos_conv_groups=4", "audio:decoder.dim=16",
        "audio:decoder.groups=4", "audio:decoder.layers=2", "audio:target.top_k=2",
        "audio:mask.clones=2", "audio:data.batch_size=2", "audio:data.min_samples=3200",
        "audio:data.max_samples=8000",
        "text:encoder.vocab_size=300", "text:encoder.max_positions=32", "text:data.block_size=32",
        "text:data.batch_size=4", "text:decoder.dim=32", "text:decoder.layers=2",
        "text:target.top_k=2", "text:mask.clones=2",
    ]
)  # fmt: skip
TINY_MULTI = [
    "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "data.num_workers=0",
    "optim.warmup_steps=2", "train.progress=false", "train.tensorboard=false",
    f"encoder.overrides={PER_MODALITY}",
]  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi")
    make_image_folder(root / "images", n_per_class=6, size=16)
    make_audio_folder(root / "audio", n_per_class=3)
    (root / "text").mkdir()
    text_corpus(root / "text", n_docs=60)
    return {"image": root / "images", "audio": root / "audio", "text": root / "text/corpus.txt"}


def _batches(modality: str, cfg, data_dir) -> tuple:
    """One real batch of a modality through its own pipeline (the model's input)."""
    from data2vec.data.registry import build_pretrain_data
    from data2vec.data.skips import SkipLog
    from data2vec.engine.trainer import make_loader

    sub = modality_configs(cfg)[modality]
    part = build_pretrain_data(sub, data_dir[modality], SkipLog(), data_dir["image"].parent)
    return next(iter(make_loader(part, sub, 0)))


def test_interleaving__weights_spread_and_positions_known():
    pattern = interleave_pattern([2, 1, 1])
    assert sorted(pattern) == [0, 0, 1, 2] and pattern[0] == 0 and pattern[1] != 0
    # batches_before counts each modality's batches among the first k, for any k
    for k in range(13):
        seq = [pattern[i % 4] for i in range(k)]
        assert [batches_before(pattern, m, k) for m in range(3)] == [seq.count(m) for m in range(3)]


def test_config__presets_and_shared_fields():
    cfg = load_config("multi-v2-tiny", TINY_MULTI)
    cfgs = modality_configs(cfg)
    assert list(cfgs) == ["image", "audio", "text"]
    for sub in cfgs.values():  # the blocks impose their shape on every modality
        assert (sub.model.embed_dim, sub.model.depth, sub.model.num_heads) == (32, 2, 2)
    assert cfgs["image"].mask.kind == "inverse_block" and cfgs["text"].mask.kind == "random"
    assert (cfgs["audio"].ema.scope, cfgs["text"].ema.scope) == ("context", "blocks")
    with pytest.raises(ConfigError, match="is a audio preset"):
        modality_configs(load_config("multi-v2-tiny", ["encoder.presets=[audio-v2-tiny,"
                                                       "audio-v2-tiny,text-v2-tiny]"]))  # fmt: skip
    with pytest.raises(ConfigError, match=r"MODALITY:section\.field"):
        load_config("multi-v2-tiny", ["encoder.overrides=video:mask.ratio=0.5"])


def test_each_loss_reaches_its_own_encoder_and_decoder_and_the_shared_blocks(data):
    cfg = load_config("multi-v2-tiny", TINY_MULTI)
    model = build_model(cfg)
    for name in ("image", "audio", "text"):
        batch = _batches(name, cfg, data)
        model.zero_grad(set_to_none=True)
        pad = batch.padding_mask
        model(batch.source, batch.mask, pad, modality=name).loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert any(n.startswith("encoder.blocks.") for n in grads)
        owners = {n.split(".")[2] for n in grads if n.startswith("encoder.modalities.")}
        owners |= {n.split(".")[1] for n in grads if n.startswith("decoder.")}
        assert owners == {name}, (name, owners)


def test_teacher__one_copy_of_the_shared_blocks_for_every_modality():
    cfg = load_config("multi-v2-tiny", TINY_MULTI)
    model = build_model(cfg)
    t = model.teacher.model
    # image owns its whole encoder, audio all but its CNN, text only the blocks (scopes)
    assert t.modalities["image"] is not None and t.modalities["text"] is None
    assert t.modalities["audio"].local_encoder is None
    views = {name: obj.teacher.model for name, obj in model.objectives.items()}
    assert all(v.blocks is t.blocks for v in views.values())  # one teacher, consistent
    with torch.no_grad():
        for p in model.encoder.blocks.parameters():
            p.add_(1.0)
    model.update_teacher(1)
    for v in views.values():
        assert v.blocks is t.blocks  # switching modality reads the same, updated blocks
    s, te = model.encoder.blocks[0].attn.qkv.weight, t.blocks[0].attn.qkv.weight
    assert not torch.equal(s, te) and torch.all(te != 0)


@pytest.mark.parametrize("clock", ["modality", "global"])
def test_teacher_clock__a_modality_teacher_moves_on_its_own_steps_only(data, clock):
    """With ``encoder.teacher_clock=modality`` an image step moves the teacher's shared blocks
    and image parts but leaves the audio parts as they are; an audio step then moves them with
    the decay of audio's first step, and the shared blocks at the rarest modality's pace. The
    global clock moves every part on every step."""
    cfg = load_config("multi-v2-tiny", [*TINY_MULTI, f"encoder.teacher_clock={clock}"])
    model = build_model(cfg).train()
    t, s = model.teacher.model, model.encoder
    with torch.no_grad():  # student and teacher apart everywhere
        for p in s.parameters():
            p.add_(1.0)

    def snapshot() -> dict[str, torch.Tensor]:
        return {n: p.clone() for n, p in t.named_parameters()}

    def moved(before: dict[str, torch.Tensor], prefix: str) -> bool:
        return any(not torch.equal(p, before[n]) for n, p in t.named_parameters()
                   if n.startswith(prefix))  # fmt: skip

    for step, name in enumerate(["image", "image", "audio"], start=1):
        batch = _batches(name, cfg, data)
        before = snapshot()
        model(batch.source, batch.mask, batch.padding_mask, modality=name)
        model.update_teacher(step)
        assert moved(before, "blocks.") and moved(before, f"modalities.{name}.")
        other = "audio" if name == "image" else "image"
        assert moved(before, f"modalities.{other}.") == (clock == "global")
    if clock == "modality":
        assert s.teacher_steps.tolist() == [2, 1, 0]
        # audio's first step used the decay of step 1, as alone (not of global step 3)
        name = "modalities.audio.context_encoder.norm.weight"
        src, now = dict(s.named_parameters())[name], dict(t.named_parameters())[name]
        d = model.teacher.decay_at(1)
        torch.testing.assert_close(now, torch.lerp(before[name], src.detach(), 1 - d))
        assert d != model.teacher.decay_at(3)
        # the shared blocks: decay(3) ** (1/3), the rarest modality's share of weights 1:1:1
        name = "blocks.0.attn.qkv.weight"
        src, now = dict(s.named_parameters())[name], dict(t.named_parameters())[name]
        d = model.teacher.decay_at(3) ** (1 / 3)
        torch.testing.assert_close(now, torch.lerp(before[name], src.detach(), 1 - d))


def test_teacher_clock__validated():
    with pytest.raises(ConfigError, match=r"encoder\.teacher_clock"):
        load_config("multi-v2-tiny", ["encoder.teacher_clock=sometimes"])


def test_accumulation_across_modalities__one_step_of_the_token_weighted_gradients(data):
    """``train.accum_steps`` over a speech and a text micro-batch: one optimizer step on the
    per-token gradients of both, weighted by their masked-token counts; both EMA clocks tick.
    (Speech and text: their losses are per-token means only; the image loss adds a per-image
    CLS term, weighted as in one big batch.)"""
    # lr 1: the weight change p - lr * g shows g well above the weights' rounding
    cfg = load_config("multi-v2-tiny", [*TINY_MULTI, "optim.clip_norm=0", "optim.lr=1.0",
                                        "encoder.modality_lr=false"])  # fmt: skip
    batches = [dataclasses.replace(_batches(m, cfg, data), modality=m) for m in ("audio", "text")]
    torch.manual_seed(0)
    model = build_model(cfg).train()
    reference = copy.deepcopy(model)
    # the reference: each batch's own per-token gradient, weighted by its masked tokens
    torch.manual_seed(1)
    grads, counts = [], []
    for b in batches:
        reference.zero_grad(set_to_none=True)
        out = reference(b.source, b.mask, b.padding_mask, modality=b.modality)
        out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in reference.named_parameters()
                      if p.grad is not None})  # fmt: skip
        counts.append(out.sample_size)
    # plain SGD makes the step's gradient readable from the weights: p - lr * g
    state = new_state(model, cfg, torch.device("cpu"))
    state.optimizer = torch.optim.SGD(model.parameters())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.manual_seed(1)
    result = train_step(state, batches, cfg, torch.device("cpu"))
    assert result.updated and state.step == 1
    total = sum(counts)
    assert all(c > 0 for c in counts)
    for n, p in model.named_parameters():
        want = sum(g[n] * c / total for g, c in zip(grads, counts) if n in g)
        if isinstance(want, int):  # trained by neither batch (the image parts)
            assert torch.equal(p, before[n]), n
            continue
        torch.testing.assert_close((before[n] - p.detach()) / result.lr, want,
                                   rtol=1e-4, atol=1e-6, msg=n)  # fmt: skip
    assert model.encoder.teacher_steps.tolist() == [0, 1, 1]  # speech and text ticked


@pytest.mark.parametrize("own", [True, False])
def test_modality_lr__each_modality_steps_at_its_own_presets_rate(data, own):
    assert TINY_MULTI[-1].startswith("encoder.overrides=")
    cfg = load_config("multi-v2-tiny", [*TINY_MULTI[:-1], f"encoder.modality_lr={str(own).lower()}",
                                        f"encoder.overrides={PER_MODALITY} text:optim.lr=5e-3",
                                        "optim.lr=1e-3"])  # fmt: skip
    model = build_model(cfg).train()
    state = new_state(model, cfg, torch.device("cpu"))
    batches = {
        m: dataclasses.replace(_batches(m, cfg, data), modality=m)
        for m in ("image", "audio", "text")
    }
    base = [lr_at(i, cfg.optim.lr, cfg.optim.warmup_steps, cfg.train.max_steps) for i in range(3)]
    got = [train_step(state, [batches[m]], cfg, torch.device("cpu")).lr for m in ("text", "image")]
    # image-v2-tiny's lr is 2e-3; text's is overridden to 5e-3
    want = [5 * base[0], 2 * base[1]] if own else base[:2]
    assert got == pytest.approx(want)
    assert state.optimizer.param_groups[0]["lr"] == pytest.approx(want[1])
    # a step accumulating two modalities: the mean of their rates (audio-v2-tiny: 1e-3)
    mixed = train_step(state, [batches["audio"], batches["text"]], cfg, torch.device("cpu")).lr
    assert mixed == pytest.approx((3 if own else 1) * base[2])


def test_joint_run__interleaves_checkpoints_and_embeds_each_modality(data, tmp_path):
    cfg = load_config("multi-v2-tiny", [*TINY_MULTI, "train.max_steps=6", "train.log_every=1",
                                        "train.checkpoint_every=3"])  # fmt: skip
    run = tmp_path / "run"
    result = pretrain(cfg, {k: str(v) for k, v in data.items()}, run)
    assert result.steps == 6 and result.stopped == "max_steps"
    logs = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    seen = [next(k.split("/")[0] for k in entry if k.endswith("/loss")) for entry in logs]
    assert seen == ["image", "audio", "text"] * 2
    saved = load_config(run / "config.yaml")
    assert "text:encoder.vocab_size=" in saved.encoder.overrides  # the tokenizer's vocabulary
    _, encoder = load_encoder(run)
    assert isinstance(encoder, MultiEncoder) and encoder.tokenizer is not None
    assert encoder.teacher_steps.tolist() == [2, 2, 2]  # each modality's EMA clock is saved
    # one checkpoint embeds every modality, picked from the data
    shapes = {}
    for name in ("image", "audio"):
        shapes[name] = embed_path(run, data[name], progress=False).features.shape
    assert shapes == {"image": (12, 32), "audio": (6, 32)}
    # resume continues the interleaving where it stopped
    cfg3 = load_config("multi-v2-tiny", [*TINY_MULTI, "train.max_steps=7", "train.log_every=1"])
    pretrain(cfg3, {k: str(v) for k, v in data.items()}, run, resume=True)
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 7 and "image/loss" in last
    assert load_encoder(run)[1].teacher_steps.tolist() == [3, 2, 2]  # ... and resumed


def test_cli__one_data_flag_per_modality(data, tmp_path, capsys):
    args = ["pretrain", "--preset", "multi-v2-tiny", "--out", str(tmp_path / "r"),
            "--max-steps", "3", *TINY_MULTI]  # fmt: skip
    code = main([*args, "--data", f"image={data['image']}", "--data", f"audio={data['audio']}"])
    assert code == 2 and "missing ['text']" in capsys.readouterr().err
    code = main([*args, *[f"--data={k}={v}" for k, v in data.items()]])
    assert code == 0


def test_detect_modality_and_data_specs(data, tmp_path):
    names = ["image", "audio", "text"]
    assert detect_modality(data["image"], names) == "image"
    assert detect_modality(data["audio"], names) == "audio"
    assert detect_modality(data["text"], names) == "text"
    tsv = tmp_path / "t.tsv"
    tsv.write_text("a red cat\tanimal\n", encoding="utf-8")
    assert detect_modality(tsv, names) == "text"
    with pytest.raises(UserError, match="looks like audio"):
        detect_modality(data["audio"], ["image", "text"])
    assert parse_data_specs(["image=/a", "text=/b=c"], ["image", "text"]) == {
        "image": "/a",
        "text": "/b=c",
    }
    with pytest.raises(UserError, match="MODALITY=PATH"):
        parse_data_specs(["/a"], ["image"])
    np.testing.assert_equal(interleave_pattern([1]), [0])


@pytest.mark.slow
def test_torchrun_two_workers_match_one_process(data, tmp_path):
    """Under torchrun (gloo, 2 workers) a joint image + text model trains what one process does
    with the same global batches; each step trains one modality (unused parameters in DDP)."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    per = " ".join(o for o in PER_MODALITY.split() if o.split(":")[0] in ("image", "text"))
    quiet = "image:mask.noise_std=0 text:mask.noise_std=0 text:encoder.dropout=0 " + (
        "text:decoder.input_dropout=0"
    )
    common = [
        *[o for o in TINY_MULTI if not o.startswith("encoder.overrides=")],
        "encoder.modalities=[image,text]", "encoder.presets=[image-v2-tiny,text-v2-tiny]",
        "encoder.weights=[1,1]", "model.encoder_dropout=0", "model.attention_dropout=0",
        "model.post_mlp_dropout=0", "train.threads=1", "train.max_steps=4",
    ]  # fmt: skip
    specs = [f"image={data['image']}", f"text={data['text']}"]

    def overrides(batch: int) -> str:
        sizes = f"image:data.batch_size={batch} text:data.batch_size={batch}"
        return f"encoder.overrides={per} {quiet} {sizes}"

    pretrain(load_config("multi-v2-tiny", [*common, overrides(4)]), specs, tmp_path / "one")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "data2vec.cli", "pretrain", "--preset", "multi-v2-tiny",
        *[f"--data={s}" for s in specs], "--out", str(tmp_path / "two"), *common, overrides(2),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 1 of 2" in proc.stderr
    last = "checkpoints/step_00000004/model.safetensors"
    one, two = load_file(str(tmp_path / "one" / last)), load_file(str(tmp_path / "two" / last))
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=2e-5)


def test_a_joint_model_of_one_modality_trains_exactly_like_the_single_model(data, tmp_path):
    """The joint machinery (views, teacher view, interleaving loader) adds nothing of its own:
    with speech only and the speech preset's settings it reproduces audio-v2-tiny's losses."""
    from tests.conftest import TINY_AUDIO

    single = load_config("audio-v2-tiny", [*TINY_AUDIO, "train.max_steps=4", "train.log_every=1"])
    per = " ".join(f"audio:{o}" for o in TINY_AUDIO if o.split(".")[0] in ("encoder", "decoder",
                                                                          "target", "mask", "data")
                   and not o.startswith("data.num_workers"))  # fmt: skip
    m = single.model
    optim = single.optim
    joint = load_config("multi-v2-tiny", [
        f"model.embed_dim={m.embed_dim}", f"model.depth={m.depth}",
        f"model.num_heads={m.num_heads}", f"model.encoder_dropout={m.encoder_dropout}",
        f"model.post_mlp_dropout={m.post_mlp_dropout}",
        f"model.attention_dropout={m.attention_dropout}", "encoder.modalities=[audio]",
        "encoder.presets=[audio-v2-tiny]", "encoder.weights=[1]", f"encoder.overrides={per}",
        f"optim.lr={optim.lr}", f"optim.betas=[{optim.betas[0]},{optim.betas[1]}]",
        f"optim.eps={optim.eps}", f"optim.weight_decay={optim.weight_decay}",
        f"optim.warmup_steps={optim.warmup_steps}", f"optim.clip_norm={optim.clip_norm}",
        f"ema.decay={single.ema.decay}", f"ema.end_decay={single.ema.end_decay}",
        f"ema.anneal_steps={single.ema.anneal_steps}", "train.max_steps=4", "train.log_every=1",
        "data.num_workers=0", "train.progress=false", "train.tensorboard=false",
    ])  # fmt: skip
    pretrain(single, data["audio"], tmp_path / "single")
    pretrain(joint, [f"audio={data['audio']}"], tmp_path / "joint")
    losses = [
        [json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").open()]
        for run in ("single", "joint")
    ]
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
