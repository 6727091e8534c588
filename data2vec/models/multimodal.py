"""One model for several modalities: joint data2vec 2.0 pretraining with shared blocks.

Layout (``model.modality: multi``, see :class:`~data2vec.config.MultiEncoderConfig`)::

    MultiEncoder
        modalities.image / .audio / .text    one modality encoder each (local encoder, prenet)
        blocks                               ONE stack of shared transformer blocks
    decoder.image / .audio / .text           one data2vec 2.0 decoder each
    teacher                                  ONE EMA of the MultiEncoder; each modality's EMA
                                             scope leaves its own parts shared with the student

Each batch holds one modality. Its objective is the ordinary single-modality
:class:`~data2vec.models.data2vec2.Data2Vec2`, built from that modality's own config (masking,
clones, targets, loss, scope) around *views*: an :class:`Encoder` made of the modality's
encoder and the shared blocks, and the matching view of the teacher. The loss of an image
batch therefore reaches the image encoder, the image decoder and the shared blocks, and
nothing else; the teacher runs once per sample of that batch, as alone. Parameters are owned by
the :class:`MultiEncoder` and the decoder dict only, so the checkpoint holds every modality
exactly once.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from data2vec.config import Config, MultiEncoderConfig, config_from_dict, load_config
from data2vec.errors import ConfigError
from data2vec.modalities.base import ModalityEncoder
from data2vec.models.data2vec2 import EXCLUDED_BY_SCOPE, Data2Vec2, PretrainOutput
from data2vec.models.encoder import Encoder
from data2vec.teacher import EMATeacher

# Fields of each modality's ``model`` section that the shared blocks impose.
SHARED_MODEL_FIELDS = (
    "algorithm", "embed_dim", "depth", "num_heads", "mlp_ratio", "norm_eps", "encoder_dropout",
    "attention_dropout", "activation_dropout", "post_mlp_dropout", "drop_path", "layerdrop",
    "block", "layer_scale", "final_norm", "activation_checkpointing",
)  # fmt: skip


def modality_configs(cfg: Config) -> dict[str, Config]:
    """Each modality's full config: its preset, the shared model fields, its overrides.

    Raises:
        ConfigError: a preset of another modality, or a 1.0 preset (joint training is 2.0).
    """
    enc = cfg.encoder
    assert isinstance(enc, MultiEncoderConfig)
    if cfg.model.algorithm != "v2":
        raise ConfigError("model.algorithm=v1: joint multi-modal pretraining is data2vec 2.0")
    per: dict[str, list[str]] = {m: [] for m in enc.modalities}
    for item in enc.overrides.split():
        name, override = item.split(":", 1)
        per[name].append(override)
    out = {}
    for name, preset in zip(enc.modalities, enc.presets):
        raw = load_config(preset, per[name]).to_dict()
        if raw["model"]["modality"] != name:
            raise ConfigError(
                f"encoder.presets: {preset!r} is a {raw['model']['modality']} preset, listed "
                f"for {name!r}"
            )
        raw["model"].update({f: getattr(cfg.model, f) for f in SHARED_MODEL_FIELDS})
        raw["train"].update(seed=cfg.train.seed, precision=cfg.train.precision)
        raw["data"]["num_workers"] = cfg.data.num_workers
        out[name] = config_from_dict(raw)
    return out


def record_encoder_changes(cfg: Config, name: str, before: Config, after: Config) -> None:
    """Keep what data preparation set in a modality's encoder section (text: the vocabulary
    size and special ids from its tokenizer) as overrides, so the saved config rebuilds it."""
    old, new = before.to_dict()["encoder"], after.to_dict()["encoder"]
    changed = [f"{name}:encoder.{k}={v}" for k, v in new.items() if old.get(k) != v]
    if changed:
        enc = cfg.encoder
        assert isinstance(enc, MultiEncoderConfig)
        enc.overrides = " ".join([*enc.overrides.split(), *changed])


class MultiEncoder(nn.Module):
    """Modality encoders around one stack of shared blocks.

    ``view(name)`` is the single-modality :class:`Encoder` of one of them (its modules are
    these, not copies), which everything that embeds or fine-tunes uses.
    """

    tokenizer = None  # the text modality's tokenizer, saved beside the weights

    def __init__(
        self,
        modalities: dict[str, ModalityEncoder],
        blocks: nn.ModuleList,
        norm: nn.Module,
        layerdrop: float = 0.0,
    ) -> None:
        super().__init__()
        self.modalities = nn.ModuleDict(modalities)
        self.blocks = blocks
        self.norm = norm
        self.layerdrop = layerdrop
        self.embed_dim: int = next(iter(modalities.values())).embed_dim
        # Optimizer steps that trained each modality (its EMA clock; checkpointed with the
        # weights, so a resumed run continues each modality's decay schedule exactly).
        self.register_buffer("teacher_steps", torch.zeros(len(modalities), dtype=torch.long))

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object) -> None:
        # Joint checkpoints written before the per-modality EMA clocks hold no counts.
        state_dict.setdefault(prefix + "teacher_steps", torch.zeros_like(self.teacher_steps))
        super()._load_from_state_dict(state_dict, prefix, *args)  # type: ignore[arg-type]

    def forward(self, *args: object, **kwargs: object) -> None:
        raise TypeError(
            f"a joint encoder has one encoder per modality ({list(self.modalities)}): call "
            ".view(modality) and use that"
        )

    def view(self, name: str) -> Encoder:
        """The encoder of modality ``name`` (shares every parameter with this module)."""
        if name not in self.modalities:
            raise KeyError(f"this model has no {name!r} encoder; it has {list(self.modalities)}")
        encoder = Encoder(self.modalities[name], self.blocks, self.norm, self.layerdrop)
        encoder.training = self.training
        if name == "text":
            encoder.tokenizer = self.tokenizer
        return encoder


class TeacherView:
    """The part of the joint EMA teacher that one modality's objective reads.

    Quacks like :class:`EMATeacher` for :class:`Data2Vec2` (``model``, ``follow_device``); the
    update is the joint model's, once per optimizer step.
    """

    def __init__(self, teacher: EMATeacher, name: str, student: MultiEncoder) -> None:
        self.teacher = teacher
        self.name = name
        self.student = student

    @property
    def model(self) -> Encoder:
        t = self.teacher.model
        view = Encoder(self.student.modalities[self.name], t.blocks, t.norm, 0.0)
        # The teacher's copy of the modality encoder, or None where the scope leaves it shared.
        view.modality = t.modalities[self.name]
        view.training = False
        return view

    def follow_device(self, ref: nn.Module | Tensor) -> None:
        self.teacher.follow_device(ref)


class MultiData2Vec(nn.Module):
    """The joint pretraining model: ``forward(..., modality=name)`` runs that modality's
    data2vec 2.0 objective; logs are reported plain and under ``name/``."""

    def __init__(
        self,
        encoder: MultiEncoder,
        decoders: nn.ModuleDict,
        teacher: EMATeacher,
        cfgs: dict[str, Config],
        teacher_clock: str = "modality",
        weights: tuple[int, ...] | None = None,
        lr_scales: dict[str, float] | None = None,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoders
        self.teacher_clock = teacher_clock
        # The rarest modality's share of the steps (1 with one modality): see update_teacher.
        weights = weights or (1,) * len(cfgs)
        self.rarest_share = min(weights) / sum(weights)
        self.trained: set[str] = set()  # modalities trained since the last teacher update
        # learning-rate factor per modality (encoder.modality_lr); empty: 1 for all
        self.lr_scales = lr_scales or {}
        object.__setattr__(self, "teacher", teacher)  # not a submodule: see EMATeacher
        objectives = {
            name: Data2Vec2(
                encoder.view(name), decoders[name], TeacherView(teacher, name, encoder), c
            )
            for name, c in cfgs.items()
        }
        object.__setattr__(self, "objectives", objectives)  # views: no parameters of their own

    def forward(
        self,
        source: Tensor,
        mask: Tensor,
        padding_mask: Tensor | None = None,
        noise: Tensor | None = None,
        modality: str | None = None,
    ) -> PretrainOutput:
        if modality is None:
            if len(self.objectives) != 1:
                raise ValueError(f"a joint model needs modality= one of {list(self.objectives)}")
            modality = next(iter(self.objectives))
        objective = self.objectives[modality]
        objective.training = objective.encoder.training = self.training
        out = objective(source, mask, padding_mask, noise)
        if self.training and torch.is_grad_enabled():
            self.trained.add(modality)
        logs = dict(out.logs)
        logs.update({f"{modality}/{k}": v for k, v in out.logs.items()})
        logs[f"{modality}/loss"] = out.loss.detach()
        return PretrainOutput(loss=out.loss, sample_size=out.sample_size, logs=logs)

    def lr_scale(self, modalities: set[str]) -> float:
        """Learning-rate factor of a step training ``modalities``: the mean of their
        ``lr_scales`` (each preset's ``optim.lr`` over the joint one; empty: 1)."""
        if not self.lr_scales:
            return 1.0
        return sum(self.lr_scales[m] for m in modalities) / len(modalities)

    def update_teacher(self, step: int) -> float:
        """One EMA step after ``step`` optimizer steps; returns the shared blocks' decay.

        With the ``"global"`` clock every teacher part moves every step with the decay of
        ``step``. A modality trained on 1 step in 6 then sees its teacher pulled onto its
        student 6 times per step of its own: a decay of 0.99 acts like 0.99**6 = 0.94, the
        teacher nearly *is* the student, and its targets become cheap to predict (speech
        collapsed below random init; README, joint model).

        ``teacher_clock="modality"`` keeps every modality's teacher as far behind its student,
        counted in that modality's own steps, as it is alone: a modality's own teacher parts
        move only on steps that trained it, with the decay of *its* step count; the shared
        blocks move every step with ``decay(step) ** s``, ``s`` the rarest modality's share of
        the steps, so that over one step of that modality they move as much as alone (the
        others' teachers lag more). One modality: ``s = 1``, the single model's update.
        """
        trained, self.trained = self.trained, set()
        if self.teacher_clock == "global":
            return self.teacher.update(self.encoder, step)
        decays: dict[str, float | None] = {}
        for i, name in enumerate(self.encoder.modalities):
            if name in trained:
                self.encoder.teacher_steps[i] += 1
            count = int(self.encoder.teacher_steps[i])
            decays[name] = self.teacher.decay_at(count) if name in trained else None
        shared = self.teacher.decay_at(step) ** self.rarest_share
        return ema_update_parts(self.teacher, self.encoder, shared, decays)


@torch.no_grad()
def ema_update_parts(
    teacher: EMATeacher,
    student: MultiEncoder,
    shared_decay: float,
    decays: dict[str, float | None],
) -> float:
    """:meth:`EMATeacher.update` with one decay per part: ``shared_decay`` for the shared
    blocks and norm, ``decays[name]`` for ``modalities.name`` (None: left as it is).

    Returns:
        ``shared_decay``.
    """
    teacher.last_decay = shared_decay
    pairs = teacher.pairs(student)

    def part_decay(name: str) -> float | None:
        parts = name.split(".")
        decay = decays[parts[1]] if parts[0] == "modalities" else shared_decay
        return None if decay is None or decay >= 1.0 else decay

    groups: dict[float, tuple[list[Tensor], list[Tensor]]] = {}
    for name, t, s in zip(pairs.averaged_names, pairs.averaged_t, pairs.student_values()):
        decay = part_decay(name)
        if decay is not None:
            group = groups.setdefault(decay, ([], []))
            group[0].append(t)
            group[1].append(s)
    for decay, (averaged_t, averaged_s) in groups.items():
        # ema <- decay * ema + (1 - decay) * student, in fp32 (as EMATeacher.update).
        torch._foreach_lerp_(averaged_t, averaged_s, 1.0 - decay)
    for name, t, s in pairs.frozen:
        if part_decay(name) is not None:
            t.copy_(s)
    for t, s in pairs.buffers:
        t.copy_(s)
    return shared_decay


def build_multi_encoder(cfg: Config, cfgs: dict[str, Config] | None = None) -> MultiEncoder:
    """The student: each modality's encoder as its preset initializes it, and the shared blocks
    of the first modality's build."""
    from data2vec.models.registry import build_encoder

    cfgs = cfgs or modality_configs(cfg)
    built = {name: build_encoder(c) for name, c in cfgs.items()}
    first = next(iter(built.values()))
    modalities = {name: e.modality for name, e in built.items()}
    return MultiEncoder(modalities, first.blocks, first.norm, first.layerdrop)


def build_multi_model(cfg: Config) -> MultiData2Vec:
    """Student, decoders and the one EMA teacher of a joint model."""
    from data2vec.models.registry import build_decoder

    cfgs = modality_configs(cfg)
    encoder = build_multi_encoder(cfg, cfgs)
    decoders = nn.ModuleDict(
        {name: build_decoder(c, encoder.modalities[name]) for name, c in cfgs.items()}
    )
    exclude = [
        part.replace("modality", f"modalities.{name}", 1)
        for name, c in cfgs.items()
        for part in EXCLUDED_BY_SCOPE[c.ema.scope]
    ]
    e = cfg.ema
    teacher = EMATeacher(encoder, e.decay, e.end_decay, e.anneal_steps, exclude=exclude)
    enc = cfg.encoder
    assert isinstance(enc, MultiEncoderConfig)
    scales = {n: c.optim.lr / cfg.optim.lr for n, c in cfgs.items()} if enc.modality_lr else {}
    return MultiData2Vec(encoder, decoders, teacher, cfgs, enc.teacher_clock, enc.weights, scales)


def select_modality(cfg: Config, encoder: nn.Module, name: str) -> tuple[Config, Encoder]:
    """``(modality config, modality encoder)`` of a joint model; single models pass through."""
    if not isinstance(encoder, MultiEncoder):
        if cfg.model.modality != name:
            raise ConfigError(f"this is a {cfg.model.modality} model, the data is {name}")
        return cfg, encoder  # type: ignore[return-value]
    cfgs = modality_configs(cfg)
    if name not in cfgs:
        raise ConfigError(f"this joint model has no {name} encoder; it has {list(cfgs)}")
    return cfgs[name], encoder.view(name)
