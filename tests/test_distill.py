import pytest
import torch

from atp.distill import kd_loss


def test_kd_loss_is_token_averaged_kl_times_t_squared():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    for t in (1.0, 2.0):
        p = torch.softmax(teacher / t, -1)
        manual = (p * (p.log() - torch.log_softmax(student / t, -1))).sum(-1)
        expected = (manual * mask).sum() / mask.sum() * t * t
        assert kd_loss(student, teacher, mask, t) == pytest.approx(float(expected), rel=1e-5)
    # padding positions do not count, whatever their logits
    changed = student.clone()
    changed[0, 4] += 100
    assert kd_loss(changed, teacher, mask) == pytest.approx(float(kd_loss(student, teacher, mask)), rel=1e-6)
    assert float(kd_loss(teacher, teacher, mask)) == pytest.approx(0.0, abs=1e-6)
    assert kd_loss(student, teacher, mask, tokens=12) == pytest.approx(float(kd_loss(student, teacher, mask)) * 6 / 12)


def test_kd_gradient_moves_the_student_towards_the_teacher():
    torch.manual_seed(1)
    teacher = torch.randn(1, 3, 7)
    student = torch.zeros(1, 3, 7, requires_grad=True)
    optimizer = torch.optim.SGD([student], lr=1.0)
    before = float(kd_loss(student, teacher, torch.ones(1, 3)))
    for _ in range(50):
        optimizer.zero_grad()
        kd_loss(student, teacher, torch.ones(1, 3)).backward()
        optimizer.step()
    assert float(kd_loss(student, teacher, torch.ones(1, 3))) < before / 10
