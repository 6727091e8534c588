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
