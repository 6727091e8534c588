import pytest

from data2vec.config import Config, config_from_dict, list_presets, load_config
from data2vec.errors import ConfigError


def test_presets_exist_and_load():
    names = list_presets()
    for name in ("image-v2-tiny", "image-v2-small", "image-v2-base", "image-v2-large"):
        assert name in names
        assert load_config(name).preset == name


def test_base_preset_is_the_released_vit_b_recipe():
    c = load_config("image-v2-base")
    assert (c.model.embed_dim, c.model.depth, c.encoder.prenet_depth, c.model.num_heads) == (
        768,
        10,
        2,
        12,
    )
    assert (c.encoder.image_size, c.encoder.patch_size, c.mask.clones) == (224, 16, 16)
    assert (c.mask.kind, c.mask.ratio, c.mask.adjust, c.mask.block) == (
        "inverse_block",
        0.8,
        0.07,
        3,
    )
    assert (c.decoder.dim, c.decoder.groups, c.decoder.kernel, c.decoder.layers) == (768, 16, 3, 6)
    assert (c.target.top_k, c.target.layer_norm, c.target.final_norm) == (10, "instance", "layer")
    assert (c.ema.decay, c.ema.end_decay, c.ema.anneal_steps, c.ema.scope) == (
        0.9998,
        0.99999,
        100000,
        "all",
    )
    assert (c.optim.lr, c.optim.betas, c.optim.weight_decay, c.optim.clip_norm) == (
        1e-3,
        (0.9, 0.95),
        0.05,
        4.0,
    )
    assert (c.loss.beta, c.loss.scale, c.loss.cls_weight) == (0.0, None, 0.01)


def test_large_inherits_base_and_overrides():
    c = load_config("image-v2-large")
    assert (c.model.embed_dim, c.model.depth, c.encoder.prenet_depth, c.target.top_k) == (
        1024,
        24,
        0,
        18,
    )
    assert c.optim.betas == (0.9, 0.95)  # inherited from base


def test_small_is_the_benchmark_configuration():
    c = load_config("image-v2-small")
    assert (c.model.embed_dim, c.model.depth, c.encoder.prenet_depth, c.model.num_heads) == (
        192,
        4,
        2,
        3,
    )
    assert (c.decoder.dim, c.decoder.layers, c.decoder.groups, c.decoder.kernel) == (192, 6, 16, 3)
    assert (c.encoder.image_size, c.mask.clones) == (224, 16)


def test_overrides_are_typed():
    c = load_config(
        "image-v2-tiny",
        [
            "optim.lr=5e-4",
            "optim.betas=[0.9,0.98]",
            "train.max_minutes=1.5",
            "loss.scale=null",
            "data.batch_size=7",
            "train.tensorboard=false",
        ],
    )
    assert c.optim.lr == 5e-4 and isinstance(c.optim.lr, float)
    assert c.optim.betas == (0.9, 0.98)
    assert c.train.max_minutes == 1.5 and c.loss.scale is None
    assert c.data.batch_size == 7 and c.train.tensorboard is False


@pytest.mark.parametrize(
    "override,needle",
    [
        (
            "mask.kind=blocky",
            "mask.kind='blocky' is not allowed; allowed values: "
            "['inverse_block', 'block', 'random', 'span', 'beit']",
        ),
        ("target.layer_norm=batch", "allowed values: ['instance', 'layer', 'none']"),
        ("optim.lr=-1", "optim.lr=-1"),
        ("data.batch_size=2.5", "data.batch_size=2.5 must be an integer"),
        ("model.depth=abc", "model.depth='abc' must be an integer"),
        ("model.nope=1", "unknown field model.nope; allowed:"),
        ("nosection.x=1", "unknown config section"),
        ("lr=1", "must be section.field"),
        ("train.precision=fp64", "allowed values: ['fp32', 'bf16', 'fp16']"),
        ("encoder.image_size=30", "multiple of encoder.patch_size"),
        ("target.top_k=9", "exceeds model.depth"),
    ],
)
def test_bad_values_name_field_and_allowed_values(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config("image-v2-tiny", [override])
    assert needle in str(err.value)


def test_unknown_preset_lists_available():
    with pytest.raises(ConfigError, match=r"available: .*image-v2-tiny"):
        load_config("image-v9")


def test_save_and_reload_round_trip(tmp_path):
    c = load_config("image-v2-tiny", ["optim.lr=0.002"])
    path = c.save(tmp_path / "config.yaml")
    again = load_config(path)
    assert again == c
    assert config_from_dict(c.to_dict()) == c


def test_defaults_are_valid():
    assert Config().model.embed_dim == 768
