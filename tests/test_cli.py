"""Command-line smoke tests: the DESIGN §7 contract (outputs, JSON keys, exit codes)."""

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from data2vec.cli import main
from tests.conftest import FIXTURES, TINY, make_image_folder


@pytest.fixture
def trained(tmp_path, image_folder):
    run = tmp_path / "run"
    assert (
        main(
            [
                "pretrain",
                "--preset",
                "image-v2-tiny",
                "--data",
                str(image_folder),
                "--out",
                str(run),
                "--max-steps",
                "2",
                *TINY,
            ]
        )
        == 0
    )
    return run


def test_pretrain_writes_run_directory(trained):
    for name in ("config.yaml", "skipped.tsv", "metrics.jsonl"):
        assert (trained / name).is_file()
    assert (trained / "checkpoints" / "step_00000002" / "model.safetensors").is_file()


def test_embed_writes_features_labels_paths(tmp_path, trained, image_folder):
    out = tmp_path / "f.npz"
    assert (
        main(
            [
                "embed",
                "--checkpoint",
                str(trained),
                "--data",
                str(image_folder),
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    z = np.load(out)
    assert z["features"].shape == (12, 32) and np.isfinite(z["features"]).all()
    assert sorted(set(z["labels"].tolist())) == [0, 1]
    assert len(z["paths"]) == 12 and str(z["paths"][0]).endswith(".png")


@pytest.mark.parametrize("probe", ["knn", "linear"])
def test_evaluate_prints_one_json_object(trained, image_folder, capsys, probe):
    code = main(
        [
            "evaluate",
            "--checkpoint",
            str(trained),
            "--train",
            str(image_folder),
            "--test",
            str(image_folder),
            "--probe",
            probe,
            "--k",
            "3",
            "--no-progress",
        ]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["probe"] == probe
    assert 0.0 <= result["accuracy"] <= 1.0
    assert (result["n_train"], result["n_test"]) == (12, 12)


def test_evaluate_on_saved_features(tmp_path, trained, image_folder, capsys):
    f = tmp_path / "f.npz"
    main(
        [
            "embed",
            "--checkpoint",
            str(trained),
            "--data",
            str(image_folder),
            "--out",
            str(f),
            "--no-progress",
        ]
    )
    capsys.readouterr()
    assert (
        main(["evaluate", "--train", str(f), "--test", str(f), "--probe", "knn", "--k", "1"]) == 0
    )
    assert json.loads(capsys.readouterr().out)["accuracy"] == 1.0  # k=1 on the training set itself


def test_bad_config_exits_2_naming_field(tmp_path, image_folder, capsys):
    code = main(
        ["pretrain", "--data", str(image_folder), "--out", str(tmp_path / "r"), "mask.kind=blocks"]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "mask.kind='blocks'" in err and "inverse_block" in err


def test_missing_data_exits_2(tmp_path, capsys):
    code = main(["pretrain", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "r"), *TINY])
    assert code == 2
    assert str(tmp_path / "nope") in capsys.readouterr().err


def test_missing_checkpoint_exits_2(tmp_path, image_folder, capsys):
    code = main(
        [
            "embed",
            "--checkpoint",
            str(tmp_path / "none"),
            "--data",
            str(image_folder),
            "--out",
            str(tmp_path / "f.npz"),
        ]
    )
    assert code == 2 and "not found" in capsys.readouterr().err


def test_convert_fairseq_with_verify(tmp_path, capsys, image_folder):
    fixture = FIXTURES / "fairseq" / "v2_image_tiny"
    dst = tmp_path / "converted"
    code = main(
        [
            "convert",
            "--from",
            "fairseq",
            "--to",
            "ours",
            str(fixture.with_suffix(".pt")),
            str(dst),
            "--verify",
            str(fixture.with_suffix(".npz")),
        ]
    )
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and out["ok"] is True and out["max_abs_diff"] < 1e-4
    # the converted directory is a model directory the other commands accept
    assert (
        main(
            [
                "embed",
                "--checkpoint",
                str(dst),
                "--data",
                str(image_folder),
                "--out",
                str(tmp_path / "f.npz"),
                "--no-progress",
            ]
        )
        == 0
    )
    assert np.load(tmp_path / "f.npz")["features"].shape == (12, 64)


def test_bench_json_has_contract_keys(capsys):
    code = main(
        [
            "bench",
            "--preset",
            "image-v2-tiny",
            "--batch",
            "4",
            "--steps",
            "1",
            "--json",
            "mask.clones=2",
        ]
    )
    assert code == 0
    r = json.loads(capsys.readouterr().out)
    for key in (
        "preset",
        "batch",
        "step_time_s",
        "samples_per_s",
        "flops_per_step",
        "mfu",
        "peak_rss_mb",
    ):
        assert key in r
    assert r["batch"] == 4 and r["flops_per_step"] > 1e8 and 0 < r["mfu"] < 2
    assert r["env"]["decoder_conv"] == "torch"  # "auto" picks Triton on CUDA only
    assert r["env"]["block_norms"] == "torch"  # likewise
    assert r["env"]["attention"] == "sdpa" and r["env"]["mlp_backward"] == "torch"  # likewise
    assert r["env"]["loss"] == "torch"  # likewise
    assert r["skipped_steps"] == 0 and math.isfinite(r["loss_last"]) and r["loss_last"] > 0


def test_demo_end_to_end_on_a_folder(tmp_path, capsys):
    data = tmp_path / "data"
    make_image_folder(data / "train", n_per_class=10)
    make_image_folder(data / "test", n_per_class=4)
    out = tmp_path / "demo"
    code = main(
        [
            "demo",
            "--data",
            str(data),
            "--out",
            str(out),
            "--minutes",
            "0.05",
            *TINY,
            "train.max_steps=3",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "linear probe" in printed and "raw pixels" in printed
    results = json.loads((out / "results.json").read_text())
    assert set(results["results"]) == {
        "data2vec 2.0 (pretrained)",
        "random init (same model)",
        "raw pixels",
    }
    for name in ("loss_curve.png", "features_pca.png"):
        assert (out / name).stat().st_size > 1000


def test_data_synth_speech_builds_a_voice_disjoint_corpus(tmp_path, capsys):
    import shutil

    if not (shutil.which("espeak-ng") and shutil.which("flite")):
        pytest.skip("espeak-ng/flite not installed (scripts/setup.sh installs them)")
    out = tmp_path / "corpus"
    code = main(["data", "synth-speech", "--out", str(out), "--variants", "1"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["train_clips"] > 0 and summary["test_clips"] > 0
    voices = {
        split: {p.stem.rsplit("_", 1)[0] for p in (out / split).rglob("*.wav")}
        for split in ("train", "test")
    }
    assert voices["train"] and voices["test"] and not voices["train"] & voices["test"]


def _reference_lines() -> list[str]:
    """The command lines of the README's "Command-line reference" block."""
    text = (Path(__file__).parent.parent / "README.md").read_text()
    block = text.split("## Command-line reference", 1)[1].split("```")[1]
    return [line for line in block.splitlines() if line.startswith("data2vec ")]


def test_the_readme_command_reference_names_the_parsers_commands_options_and_choices():
    """Every command the CLI has is in the README's reference; every option a line names
    exists; and where an option has fixed choices, the values the reference lists for it (over
    all of its lines) are exactly those choices, so neither drifts from the other."""
    import argparse

    from data2vec.cli import _parser

    def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        return dict(action.choices)

    commands = {}
    for name, sub in subparsers(_parser()).items():
        if name == "data":
            commands.update({f"data {n}": s for n, s in subparsers(sub).items()})
        else:
            commands[name] = sub
    listed: dict[str, dict[str, set[str]]] = {}
    for line in _reference_lines():
        words = line.split()
        name = " ".join(words[1:3]) if words[1] == "data" else words[1]
        assert name in commands, line
        listed.setdefault(name, {})
        for flag, value in re.findall(r"(--[a-z-]+)(?:[ =]([^\s\]\[]+))?", line):
            values = listed[name].setdefault(flag, set())
            if value and not value.isupper() and not value[0].isdigit():
                values.update(value.split("|"))
    assert set(listed) == set(commands)
    for name, flags in listed.items():
        options = {s: a for a in commands[name]._actions for s in a.option_strings}
        for flag, values in flags.items():
            assert flag in options, (name, flag)
            if options[flag].choices is not None:
                assert values == set(options[flag].choices), (name, flag, values)
