"""``data2vec demo --modality all``: every demo in turn, checks before any work, failures kept
apart. Each demo itself is tested end to end elsewhere (``test_cli``, ``test_audio_pipeline``,
``test_signal_pipeline``); here a recorder stands in for the child process that runs it, and
one real child runs the signal demo."""

import json
import re
from pathlib import Path

import pytest

from data2vec import demo_all
from data2vec.cli import main
from data2vec.errors import UserError


def _results(modality: str) -> dict:
    rows = {"pretrained": 0.8, "random init": 0.5, f"{modality} baseline": 0.7}
    return {
        name: {"linear": {"accuracy": acc}, "knn": {"accuracy": acc - 0.1}}
        for name, acc in rows.items()
    }


class _Recorder:
    """Stands in for ``demo_all.run_in_process``: records each call, fails where told."""

    def __init__(self, fail: dict[str, Exception] | None = None) -> None:
        self.calls: list[dict] = []
        self.fail = fail or {}

    def __call__(self, modality: str, out: Path, minutes: float, overrides: list[str]) -> dict:
        self.calls.append(dict(modality=modality, out=out, minutes=minutes, overrides=overrides))
        if modality in self.fail:
            raise self.fail[modality]
        out.mkdir(parents=True)
        return {"modality": modality, "results": _results(modality)}


def test_every_demo_runs_in_turn_on_its_default_data_and_one_table_sums_them_up(
    tmp_path, monkeypatch, capsys
):
    recorder = _Recorder()
    monkeypatch.setattr(demo_all, "run_in_process", recorder)
    out = tmp_path / "all"
    code = main(["demo", "--modality", "all", "--out", str(out), "--minutes", "12",
                 "optim.lr=1e-3"])  # fmt: skip
    assert code == 0
    assert [c["modality"] for c in recorder.calls] == ["image", "audio", "text", "signal"]
    for call in recorder.calls:
        assert call["out"] == out / call["modality"]
        assert call["overrides"] == ["optim.lr=1e-3"]
    # 12 minutes shared 7 : 5 : 8 : 4
    assert [c["minutes"] for c in recorder.calls] == pytest.approx([3.5, 2.5, 4.0, 2.0])
    summary = json.loads((out / "results.json").read_text())
    assert list(summary["modalities"]) == ["image", "audio", "text", "signal"]
    assert summary["modalities"]["text"]["results"] == _results("text") and not summary["failed"]
    table = capsys.readouterr().out.split("modality ", 1)[1].splitlines()
    rows = [line for line in table if line.split(" ")[0] in demo_all.DEFAULTS]
    assert len(rows) == 4 * 3  # three rows per demo
    assert rows[-1].split() == ["signal", "signal", "baseline", "70.00%", "60.00%"]


def test_without_minutes_each_demo_keeps_its_own_budget():
    assert demo_all.budgets(None) == {"image": 7.0, "audio": 5.0, "text": 8.0, "signal": 4.0}
    with pytest.raises(UserError, match="--minutes"):
        demo_all.budgets(0)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data", "somewhere"], "--data somewhere: with --modality all"),
        (["optim.lrr=1"], "image demo .*unknown field optim.lrr"),
        # valid for the image preset, not for the audio one: refused before the image demo
        (["encoder.image_size=32"], "audio demo .*unknown field encoder.image_size"),
        (["--minutes", "-1"], "--minutes -1"),
    ],
)
def test_what_would_fail_later_is_refused_before_any_demo_starts(
    args, message, tmp_path, monkeypatch, capsys
):
    recorder = _Recorder()
    monkeypatch.setattr(demo_all, "run_in_process", recorder)
    code = main(["demo", "--modality", "all", "--out", str(tmp_path / "all"), *args])
    assert code == 2 and not recorder.calls
    error = capsys.readouterr().err
    assert error.startswith("data2vec demo: error: ")
    assert re.search(message, error), error


def test_a_failing_demo_leaves_the_others_results_and_the_run_fails_at_the_end(
    tmp_path, monkeypatch
):
    recorder = _Recorder(fail={"audio": RuntimeError("espeak-ng crashed")})
    out = tmp_path / "all"
    with pytest.raises(RuntimeError, match=r"audio \(RuntimeError: espeak-ng crashed\)"):
        demo_all.run_all(out, None, [], recorder)
    assert [c["modality"] for c in recorder.calls] == ["image", "audio", "text", "signal"]
    summary = json.loads((out / "results.json").read_text())
    assert list(summary["modalities"]) == ["image", "text", "signal"]
    assert summary["failed"] == {"audio": "RuntimeError: espeak-ng crashed"}
    assert "audio    failed: RuntimeError: espeak-ng crashed" in demo_all.table(summary)


def test_when_only_user_errors_failed_the_cli_says_so_with_exit_code_2(
    tmp_path, monkeypatch, capsys
):
    recorder = _Recorder(fail={"text": UserError("wordnet-base is not installed")})
    monkeypatch.setattr(demo_all, "run_in_process", recorder)
    code = main(["demo", "--modality", "all", "--out", str(tmp_path / "all")])
    assert code == 2 and len(recorder.calls) == 4
    assert "text (UserError: wordnet-base is not installed)" in capsys.readouterr().err


def test_the_presets_are_the_ones_the_demos_pretrain():
    assert demo_all.presets() == {
        "image": "image-v2-tiny",
        "audio": "audio-v2-tiny",
        "text": "text-v2-tiny",
        "signal": "signal-v2-tiny",
    }


def test_a_demo_runs_in_a_child_process_as_the_command_would_and_its_results_come_back(
    tmp_path,
):
    """The signal demo (the smallest data set) for two steps, in a real child process."""
    out = tmp_path / "signal"
    result = demo_all.run_in_process("signal", out, 0.05, ["train.max_steps=2"])
    assert result == json.loads((out / "results.json").read_text())
    assert result["modality"] == "signal" and result["pretraining"]["steps"] == 2
    assert result["data"]["train"] == "ucr:JapaneseVowels:train"  # the demo's default data
    assert 0 < result["results"]["data2vec 2.0 (pretrained)"]["linear"]["accuracy"] <= 1


def test_a_child_that_refuses_its_input_is_a_user_error(tmp_path, capfd):
    with pytest.raises(UserError, match="--modality image refused its input"):
        demo_all.run_in_process("image", tmp_path / "image", 1.0, ["optim.lrr=1"])
    assert "unknown field optim.lrr" in capfd.readouterr().err  # the child said why
    assert not (tmp_path / "image" / "results.json").exists()
