"""Fitting the learning-rate schedule to a time budget while the run goes (train.fit_schedule)."""

import math

import pytest

from data2vec.engine.metrics import read_metrics
from data2vec.engine.schedules import ScheduleFit
from data2vec.engine.trainer import pretrain
from data2vec.errors import ConfigError
from tests.conftest import tiny_config


def _feed(fit: ScheduleFit, times: list[float], first_step: int = 1) -> list[int | None]:
    """``fit``'s answers when step ``first_step + i`` ends at ``times[i]``."""
    return [fit.update(first_step + i, t) for i, t in enumerate(times)]


def test_steady_pace__total_is_budget_over_pace():
    fit = ScheduleFit(budget=100.0, start_step=0)
    answers = _feed(fit, [0.5 * s for s in range(1, 21)])
    # steps 1 and 2 start the clock, steps 3 to 7 are timed before the first estimate
    assert answers[:6] == [None] * 6
    assert answers[6:] == [200] * 14  # 100 s at 0.5 s a step, whatever step it is asked at


def test_slow_first_steps__left_out_of_the_pace():
    fit = ScheduleFit(budget=100.0, start_step=0)
    times = [3.0, 3.5] + [3.5 + 0.5 * i for i in range(1, 19)]  # then a steady 0.5 s
    total = _feed(fit, times)[-1]
    step, elapsed = 20, times[-1]
    assert total == step + math.ceil((100.0 - elapsed) / 0.5)


def test_pace_change__followed_within_the_window():
    fit = ScheduleFit(budget=100.0, start_step=0)  # window: the last 10 s
    times = [0.5 * s for s in range(1, 101)]  # 50 s at 0.5 s a step
    times += [50.0 + 0.25 * s for s in range(1, 61)]  # 15 s at 0.25 s a step
    totals = _feed(fit, times)
    assert totals[99] == 200
    # Half-way into the window the pace is between the two; after it, the new pace alone.
    assert 120 + math.ceil(45 / 0.5) < totals[119] < 120 + math.ceil(45 / 0.25)
    assert totals[-1] == 160 + math.ceil(35 / 0.25)


def test_resumed_run__counts_from_its_own_start_and_past_the_budget_one_step():
    fit = ScheduleFit(budget=10.0, start_step=500)
    answers = _feed(fit, [1.0 * i for i in range(1, 9)], first_step=501)
    assert answers[:6] == [None] * 6 and answers[6] == 507 + 3
    assert fit.update(509, 12.0) == 510  # over the budget: the schedule ends with this step


def test_answers_on_the_same_steps_whatever_the_times():
    # ranks refit on the same steps (a collective) even when their clocks differ
    a = _feed(ScheduleFit(60.0, 0), [0.1 * s for s in range(1, 30)])
    b = _feed(ScheduleFit(60.0, 0), [0.7 * s + 0.01 * s * s for s in range(1, 30)])
    assert [x is None for x in a] == [x is None for x in b]


def test_fit_schedule_needs_a_time_budget():
    with pytest.raises(ConfigError, match=r"train.fit_schedule.*train.max_minutes"):
        tiny_config("train.fit_schedule=true")


@pytest.mark.parametrize("first_estimate", [3, 1_000_000])
def test_training__the_cosine_ends_with_the_budget(tmp_path, image_folder, first_estimate):
    """A first estimate far too short or far too long: either way the run trains until the
    budget and ends at the bottom of the cosine (without refitting it would stop at step 3, or
    end at the full learning rate)."""
    base, minutes = 1e-3, 0.08
    cfg = tiny_config(
        f"train.max_steps={first_estimate}",
        f"train.max_minutes={minutes}",
        "train.fit_schedule=true",
        f"optim.lr={base}",
        "optim.warmup_steps=0",
        "train.checkpoint_every=100000",
    )
    result = pretrain(cfg, image_folder, tmp_path / "run")
    assert result.stopped == "time_budget" and result.steps > 10
    history = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert history[-1]["lr"] < 0.1 * base
    # Half-way through the budget, the cosine is about half-way down (within a 2x misjudged
    # pace: 0.25 to 0.75 of the peak).
    middle = min(history, key=lambda r: abs(r["elapsed_s"] - 30 * minutes))
    assert 0.2 * base < middle["lr"] < 0.8 * base


def test_resume__a_fitted_run_trains_a_new_budget(tmp_path, image_folder):
    """``max_steps`` is only the first guess of a fitted schedule: a run resumed after its
    budget ran out (at a step past that guess) trains for its own new budget."""
    cfg = tiny_config(
        "train.max_steps=3", "train.max_minutes=0.03", "train.fit_schedule=true",
        "train.checkpoint_every=100000",
    )  # fmt: skip
    first = pretrain(cfg, image_folder, tmp_path / "run")
    assert first.stopped == "time_budget" and first.steps > 3
    again = pretrain(cfg, image_folder, tmp_path / "run", resume=True)
    assert again.stopped == "time_budget" and again.steps > first.steps


def test_processes_take_the_longest_estimate(monkeypatch):
    """Under torchrun each process refits from its own clock; all take the longest estimate
    (here another rank's 900 steps against this one's 200), so their schedules stay equal."""
    import torch

    from data2vec.engine import distributed, trainer

    other_rank = torch.tensor(900)
    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed, "global_max", lambda t: torch.maximum(t, other_rank))

    class Bar:
        total = None

    cfg = tiny_config("train.max_minutes=1", "train.fit_schedule=true", "train.max_steps=50")
    fit, bar = ScheduleFit(budget=100.0, start_step=0), Bar()
    for step in range(1, 21):
        cfg = trainer._refit(cfg, fit, step, 0.5 * step, torch.device("cpu"), bar)
    assert fit.update(21, 10.5) == 200  # this process alone: 100 s at 0.5 s a step
    assert cfg.train.max_steps == 900 and bar.total == 900
