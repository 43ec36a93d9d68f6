"""Structured knowledge distillation's two terms: exact against slow references, zero where the
student says what the teacher says, and enough on their own to teach a student the teacher's map."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from wsseg.models.segmenters import build_segmenter
from wsseg.models.segmenters.distillation import pair_distillation, pixel_distillation


def slow_pixel(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) + the teacher's entropy, pixel by pixel."""
    batch, classes, height, width = student.shape
    total = 0.0
    for b in range(batch):
        for y in range(height):
            for x in range(width):
                p = torch.softmax(teacher[b, :, y, x].double(), 0)
                log_q = torch.log_softmax(student[b, :, y, x].double(), 0)
                total += float(sum(-p[k] * log_q[k] for k in range(classes)))
    return torch.tensor(total / (batch * height * width), dtype=torch.float64)


def slow_pair(student: torch.Tensor, teacher: torch.Tensor, share: float) -> torch.Tensor:
    """Nodes as max-pooled windows of int(share x side) pixels, the last one partial; cosine similarity
    of every pair, the mean squared difference."""
    batch, _, height, width = student.shape
    kh, kw = max(1, int(height * share)), max(1, int(width * share))
    total, count = 0.0, 0
    for b in range(batch):
        def nodes(x):
            return [x[b, :, y:y + kh, v:v + kw].amax(dim=(1, 2)).double()
                    for y in range(0, height, kh) for v in range(0, width, kw)]
        s_nodes, t_nodes = nodes(student), nodes(teacher)
        for i in range(len(s_nodes)):
            for j in range(len(s_nodes)):
                a_s = float(s_nodes[i] @ s_nodes[j] / (s_nodes[i].norm() * s_nodes[j].norm()))
                a_t = float(t_nodes[i] @ t_nodes[j] / (t_nodes[i].norm() * t_nodes[j].norm()))
                total += (a_t - a_s) ** 2
                count += 1
    return torch.tensor(total / count, dtype=torch.float64)


def test_pixel_term_is_the_cross_entropy_to_the_teachers_softmax_and_has_the_kl_gradient():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 4, 5, 3, requires_grad=True), torch.randn(2, 4, 5, 3)
    loss = pixel_distillation(student, teacher)
    torch.testing.assert_close(loss.double(), slow_pixel(student.detach(), teacher), rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(loss, student)
    kl = F.kl_div(torch.log_softmax(student, 1), torch.softmax(teacher, 1), reduction="sum") / (2 * 5 * 3)
    (kl_grad,) = torch.autograd.grad(kl, student)
    torch.testing.assert_close(grad, kl_grad)
    # where the student already says what the teacher says, nothing pulls it
    same = teacher.clone().requires_grad_(True)
    (still,) = torch.autograd.grad(pixel_distillation(same, teacher), same)
    assert still.abs().max() < 1e-7


@pytest.mark.parametrize("size, share", [((8, 6), 0.5), ((9, 7), 0.5), ((8, 8), 0.25)])
def test_pair_term_matches_the_node_by_node_reference(size, share):
    torch.manual_seed(1)
    student, teacher = torch.randn(2, 5, *size), torch.randn(2, 5, *size)
    torch.testing.assert_close(pair_distillation(student, teacher, share).double(), slow_pair(student, teacher, share),
                               rtol=1e-5, atol=1e-7)


def test_pair_term_is_zero_for_the_same_structure_and_resizes_the_teacher():
    torch.manual_seed(2)
    teacher = torch.randn(1, 4, 8, 8)
    assert pair_distillation(3.0 * teacher, teacher) < 1e-10  # cosine: the scale of a node does not matter
    assert pair_distillation(torch.randn(1, 4, 8, 8), teacher) > 1e-3
    coarse = torch.randn(1, 4, 4, 4)  # a teacher at another output stride: resized to the student's map
    student = F.interpolate(coarse, size=(8, 8), mode="bilinear", align_corners=False)
    assert pair_distillation(student, coarse) < 1e-10
    assert pixel_distillation(student, coarse) == pytest.approx(float(pixel_distillation(student, student)))
    with pytest.raises(ValueError, match="same classes"):
        pixel_distillation(torch.randn(1, 3, 8, 8), teacher)


def test_the_two_terms_alone_teach_a_student_the_teachers_map():
    """A tiny FCN-8s trained only on the distillation terms (no labels) must come to agree with the
    teacher's argmax on the batch. The teacher's map is a confident one-hot of 8 px blocks whose class
    shows in the image's colour (so a student can learn it); at initialisation the student agrees
    on about a third of the pixels. A term that ignored the teacher, or pushed away from it, fails."""
    torch.manual_seed(0)
    label = torch.randint(0, 3, (4, 6, 6)).repeat_interleave(8, 1).repeat_interleave(8, 2)
    one_hot = F.one_hot(label, 3).permute(0, 3, 1, 2).float()
    images = 2 * one_hot - 1 + 0.3 * torch.randn(4, 3, 48, 48)
    taught = 5.0 * one_hot
    student = build_segmenter("fcn8s", 3, depth=18, width=0.25)

    def agreement() -> float:
        student.eval()
        with torch.no_grad():
            out = student(images)["out"]
        student.train()
        target = F.interpolate(taught, size=out.shape[-2:], mode="bilinear", align_corners=False).argmax(1)
        return float((out.argmax(1) == target).float().mean())

    before = agreement()
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-3)
    for _ in range(80):
        out = student(images)["out"]
        loss = 10.0 * pixel_distillation(out, taught) + pair_distillation(out, taught)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = agreement()
    assert before < 0.7 and after >= 0.95, (before, after)
    assert math.isfinite(loss.item())
