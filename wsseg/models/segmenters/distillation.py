"""Structured knowledge distillation (Liu et al., CVPR 2019): the student's extra loss terms.

A trained teacher segmenter (frozen, eval mode) sees the student's training crop; the student is
trained on its labels as usual plus

- **pixel-wise distillation**: at every pixel, the cross-entropy between the teacher's class
  distribution (softmax of its logits, temperature 1) and the student's, averaged over the pixels.
  It differs from KL(teacher || student) by the teacher's entropy, a constant, so the gradient is
  the KL's. The authors' weight: 10.
- **pair-wise distillation**: both outputs are max-pooled into a coarse grid of nodes (each node
  a `pool` share of the map's side: the authors' 0.5 gives 2 x 2 nodes), the cosine similarity
  of every pair of nodes is taken (each node's norm held constant in the gradient, as in the
  authors' code), and the squared differences between the teacher's and the student's
  similarity matrices are averaged over the N² pairs and the batch. The authors' weight: 1.

Both terms work on the models' main logits, the one output every registered segmenter has and
whose channels mean the same thing in teacher and student; the authors take the pair-wise term
on the last feature map, which wsseg's models do not expose uniformly. Where the teacher's logits
have another resolution than the student's (another output stride), they are resized to the
student's (bilinear). The adversarial holistic term of the paper is not implemented.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import Tensor

# The authors' weights and pooling share (their code's defaults: lambda-pi, lambda-pa, pool-scale).
PIXEL_WEIGHT = 10.0
PAIR_WEIGHT = 1.0
POOL_SHARE = 0.5


def teacher_at_student_size(teacher: Tensor, student: Tensor) -> Tensor:
    """The teacher's logits (B, K, h', w') at the student's logits' size (bilinear), without gradient."""
    teacher = teacher.detach().float()
    if teacher.shape[-2:] != student.shape[-2:]:
        teacher = F.interpolate(teacher, size=student.shape[-2:], mode="bilinear", align_corners=False)
    return teacher


def pixel_distillation(student: Tensor, teacher: Tensor) -> Tensor:
    """Mean over the pixels of -sum_k softmax(teacher)_k log softmax(student)_k; both (B, K, h, w)."""
    if student.shape[:2] != teacher.shape[:2]:
        raise ValueError(f"teacher and student must predict the same classes: {tuple(teacher.shape)} vs {tuple(student.shape)}")
    teacher = teacher_at_student_size(teacher, student)
    return -(torch.softmax(teacher, dim=1) * torch.log_softmax(student.float(), dim=1)).sum(dim=1).mean()


def similarity(nodes: Tensor) -> Tensor:
    """(B, C, n, m) -> (B, N, N) cosine similarities of the N = n*m node vectors; the norms are held
    constant in the gradient."""
    flat = nodes.flatten(2).float()
    norm = flat.norm(dim=1, keepdim=True).detach() + 1e-8
    flat = flat / norm
    return flat.transpose(1, 2) @ flat


def pair_distillation(student: Tensor, teacher: Tensor, share: float = POOL_SHARE) -> Tensor:
    """Mean over the batch and the N² node pairs of (a_teacher - a_student)², the nodes max-pooled
    windows of `share` of each side of the student's map (the teacher's resized to it first)."""
    teacher = teacher_at_student_size(teacher, student)
    height, width = student.shape[-2:]
    kernel = (max(1, int(height * share)), max(1, int(width * share)))
    pool = dict(kernel_size=kernel, stride=kernel, ceil_mode=True)
    gap = similarity(F.max_pool2d(teacher, **pool)) - similarity(F.max_pool2d(student.float(), **pool))
    return gap.pow(2).mean()
