import pytest
import torch
from torch import nn

from data2vec.teacher import EMATeacher, ema_decay_at


def test_ema_decay_schedule__hand_values():
    assert ema_decay_at(0, 0.9, 1.0, 10) == pytest.approx(0.9)
    assert ema_decay_at(5, 0.9, 1.0, 10) == pytest.approx(0.95)
    assert ema_decay_at(10, 0.9, 1.0, 10) == 1.0
    assert ema_decay_at(1000, 0.9, 0.99, 10) == 0.99  # held after the anneal
    assert ema_decay_at(3, 0.5, 0.5, 0) == 0.5


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(2, 2)
        self.b = nn.Linear(2, 1)
        self.fixed = nn.Parameter(torch.zeros(3), requires_grad=False)
        self.register_buffer("buf", torch.zeros(2))


def test_ema_update__hand_computed():
    student = Net()
    teacher = EMATeacher(student, decay=0.9, end_decay=0.9, anneal_steps=0)
    before = teacher.model.a.weight.clone()
    with torch.no_grad():
        student.a.weight.add_(1.0)
        student.fixed.fill_(7.0)
        student.buf.fill_(3.0)
    teacher.update(student, step=1)
    expected = 0.9 * before + 0.1 * student.a.weight
    torch.testing.assert_close(teacher.model.a.weight, expected)
    assert (teacher.model.fixed == 7.0).all()  # non-trainable: copied, not averaged
    assert (teacher.model.buf == 3.0).all()  # buffers: copied


def test_ema_update__skipped_when_decay_reaches_one():
    student = Net()
    teacher = EMATeacher(student, decay=0.5, end_decay=1.0, anneal_steps=4)
    snapshot = {k: v.clone() for k, v in teacher.state_dict().items()}
    with torch.no_grad():
        student.a.weight.add_(1.0)
        student.fixed.fill_(7.0)
    assert teacher.update(student, step=4) == 1.0
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, snapshot[k]), k


def test_teacher__is_separate_fp32_and_frozen():
    student = Net().to(torch.bfloat16)
    teacher = EMATeacher(student, 0.99, 0.999, 10)
    assert all(p.dtype == torch.float32 for p in teacher.model.parameters())
    assert not any(p.requires_grad for p in teacher.model.parameters())
    assert not teacher.model.training
    ids = {id(p) for p in student.parameters()}
    assert not any(id(p) in ids for p in teacher.model.parameters())


def test_teacher__excluded_modules_stay_with_the_student():
    student = Net()
    teacher = EMATeacher(student, 0.9, 0.9, 0, exclude=("b",))
    assert teacher.model.b is None
    assert not any(k.startswith("b.") for k in teacher.state_dict())
    with torch.no_grad():
        student.b.weight.add_(1.0)
    teacher.update(student, 1)  # must not fail on the missing module


def _expected_after(teacher: EMATeacher, student: nn.Module, decay: float) -> dict:
    """The teacher's parameters after one update, by the formula (name by name)."""
    s = dict(student.named_parameters())
    return {
        n: (decay * t + (1 - decay) * s[n].float()) if s[n].requires_grad else s[n].float()
        for n, t in teacher.model.named_parameters()
    }


def _assert_updated(teacher: EMATeacher, student: nn.Module, step: int = 1) -> None:
    expected = _expected_after(teacher, student, teacher.decay_at(step))
    teacher.update(student, step)
    for n, t in teacher.model.named_parameters():
        torch.testing.assert_close(t, expected[n], msg=n)


def test_ema_update__pairs_are_kept_between_updates():
    student = Net()
    teacher = EMATeacher(student, decay=0.9, end_decay=0.9, anneal_steps=0)
    teacher.update(student, 0)
    pairs = teacher._pairs
    for step in range(1, 3):
        with torch.no_grad():
            student.a.weight.add_(1.0)
        _assert_updated(teacher, student, step)
    assert teacher._pairs is pairs  # found once, not per update


def test_ema_update__follows_a_replaced_student_parameter():
    student = Net()
    teacher = EMATeacher(student, decay=0.5, end_decay=0.5, anneal_steps=0)
    teacher.update(student, 1)
    state = {k: v + 10.0 for k, v in student.state_dict().items()}
    student.load_state_dict(state, assign=True)  # new Parameter objects
    _assert_updated(teacher, student)


def test_ema_update__a_frozen_or_unfrozen_student_parameter_changes_how_it_follows():
    student = Net()
    teacher = EMATeacher(student, decay=0.5, end_decay=0.5, anneal_steps=0)
    teacher.update(student, 1)
    student.a.weight.requires_grad_(False)
    student.fixed.requires_grad_(True)
    with torch.no_grad():
        student.a.weight.fill_(4.0)
        student.fixed.fill_(2.0)
    _assert_updated(teacher, student)
    assert (teacher.model.a.weight == 4.0).all()  # copied now
    assert (teacher.model.fixed == 1.0).all()  # averaged now: 0.5 * 0 + 0.5 * 2


def test_ema_update__writes_a_replaced_teacher_buffer_and_follows_another_student():
    student = Net()
    teacher = EMATeacher(student, decay=0.5, end_decay=0.5, anneal_steps=0)
    teacher.update(student, 1)
    teacher.model.buf = torch.full((2,), -1.0)  # what moving the teacher does to its buffers
    with torch.no_grad():
        student.buf.fill_(3.0)
    teacher.update(student, 1)
    assert (teacher.model.buf == 3.0).all()
    other = Net()
    _assert_updated(teacher, other)
    other.a = nn.Linear(2, 2)  # a layer swapped
    _assert_updated(teacher, other)


def test_ema_update__casts_a_bf16_student_to_the_fp32_teacher():
    student = Net().to(torch.bfloat16)
    teacher = EMATeacher(student, decay=0.75, end_decay=0.75, anneal_steps=0)
    with torch.no_grad():
        student.a.weight.add_(1.0)
    for step in range(2):
        _assert_updated(teacher, student, step)
    assert teacher.model.a.weight.dtype == torch.float32
