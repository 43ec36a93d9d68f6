"""Dilated convolutions with a context module (Yu & Koltun, "Multi-Scale Context
Aggregation by Dilated Convolutions", ICLR 2016; docs/ALGORITHMS.md §2 for the shared recipe).

Front end: the backbone with its last two down-samplings removed and dilations 2 and 4
in their place (output stride 8; the paper's VGG-16 drops pool4/pool5 and dilates conv5
by 2 and fc6 by 4; here layer3 and layer4 of a ResNet), dropout and a 1x1 classifier
giving C class scores (C = num_classes, background included).

Context module on the C score maps: seven 3x3 convs with dilations 1, 1, 2, 4, 8, 16, 1,
each followed by ReLU (the paper's pointwise truncation max(·, 0)), then a 1x1 conv back
to C channels (no ReLU). Widths: "basic" C throughout; "large" 2C, 2C, 4C, 8C, 16C, 32C,
32C (the released VOC model, Dilation8: 42 ... 672 for C = 21). Receptive field of the
module: 67x67 score pixels.

Identity initialisation (the paper's §3, worked out in `identity_init_`): every conv
starts so that the module passes non-negative scores through unchanged. The scores go
in raw, as in the authors' release (the module reads the front end's last conv
"fc-final" directly; no ReLU or softmax in between), so at initialisation the module
computes relu(scores): exactly the front end's scores wherever they are >= 0, and
negative scores are truncated to 0 — the argmax is kept wherever the top score is
positive.

Training schedule: the paper trains the front end first and only then the context module
on its scores (the release refuses joint training without trained front-end weights).
Joint training of a random front end with the module fails: within a few steps the
background-dominated loss pushes a class's scores below 0 at every pixel, the module's
first ReLU then passes it no gradient, and the class never comes back (on the demo the
model predicted background only). So the model trains the front end alone for the first
`front_end_fraction` of the steps (the module is bypassed), then joins the
identity-initialised module and trains both (the release's joint stage); `after_step`,
which the training loop calls after every optimiser step, makes the switch.
docs/models/dilated-context.md has the details and the measurements.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsseg.models.backbones import resnet
from wsseg.models.segmenters.common import AuxHead, Segmenter, classifier, head_channels

# Yu & Koltun, Table 1: dilations of the seven 3x3 layers of the context module.
CONTEXT_DILATIONS = (1, 1, 2, 4, 8, 16, 1)
# Output widths of those layers as multiples of C (the final 1x1 maps back to C).
CONTEXT_WIDTHS = {"basic": (1, 1, 1, 1, 1, 1, 1), "large": (2, 2, 4, 8, 16, 32, 32)}
# Tie-breaking noise of the identity initialisation, relative to the layer's identity
# weight C/c_out: the authors' Caffe filler uses std 0.01 / multiplier = 0.01·C/c_out.
TIE_NOISE = 0.01
# Dropout before the front end's classifier: the paper's VGG front end drops fc7's
# activations with p = 0.5 (Caffe's elementwise Dropout) right before its classifier.
FRONT_END_DROPOUT = 0.5
# Share of the training steps in which the front end trains alone before the context module
# joins. The paper trains each stage to convergence; in one fixed budget of steps, half and
# half (the joint half runs at <= 0.54 of the base lr under the poly schedule, as the
# release's joint stage runs at a tenth of the front end's lr).
FRONT_END_FRACTION = 0.5


def identity_init_(conv: nn.Conv2d, num_classes: int, tie_noise: float = 0.0) -> None:
    """Yu & Koltun's identity initialisation of a conv from c_in to c_out channels, both
    multiples of C = num_classes, in place; the bias is set to 0.

    Channels are grouped by class: channel a of c_in belongs to class ⌊a·C/c_in⌋, i.e.
    class k owns c/C consecutive channels (one when c = C). The centre tap joining an
    input and an output channel of the same class is C/c_out; every other weight is 0.
    For c_in = c_out = C this is the identity (the paper's basic initialisation,
    k(t, a, b) = 1[t = 0]·1[a = b]). For unequal widths it is the paper's
    k(t, a, b) = C/c_{i+1} if t = 0 and ⌊aC/c_i⌋ = ⌊bC/c_{i+1}⌋: if the input holds a
    class's value v/m_in in each of its m_in = c_in/C channels, every one of the
    class's m_out = c_out/C output channels gets m_in·(v/m_in)/m_out = v/m_out. So the
    per-class sums are preserved, values stay >= 0 for v >= 0 (the ReLUs change
    nothing), and the last 32C -> C layer sums them back to v: the module as a whole
    is the identity on non-negative scores, layer by layer up to the splitting.

    Copies of a class start equal and, with equal weights, would receive equal
    gradients forever. The paper breaks the ties by filling every other weight with
    ε ~ N(0, σ²), σ ≪ C/c_{i+1}, which makes the module only approximately a no-op.
    Here `tie_noise` > 0 adds noise of std tie_noise·C/c_out only to the centre taps
    within a class, minus its mean over each output's same-class inputs: since those
    inputs are equal at initialisation, the sums — and the module's output — are
    unchanged (up to float rounding), while the copies now feed later layers with
    different weights and so receive different gradients. A layer whose input has one
    channel per class (the first, and every basic layer) gets no noise.
    """
    c_out, c_in = conv.out_channels, conv.in_channels
    if conv.groups != 1 or c_out % num_classes or c_in % num_classes:
        raise ValueError(f"identity init needs an ungrouped conv with widths that are multiples of "
                         f"{num_classes}, got {c_in} -> {c_out}")
    in_class = torch.arange(c_in) * num_classes // c_in
    out_class = torch.arange(c_out) * num_classes // c_out
    same = (out_class[:, None] == in_class[None, :]).float()  # (c_out, c_in)
    scale = num_classes / c_out
    centre = same * scale
    if tie_noise > 0:
        noise = torch.randn(c_out, c_in) * (tie_noise * scale) * same
        noise = noise - same * noise.sum(dim=1, keepdim=True) / same.sum(dim=1, keepdim=True)
        centre = centre + noise
    kh, kw = conv.kernel_size
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[:, :, kh // 2, kw // 2] = centre.to(conv.weight.dtype)
        if conv.bias is not None:
            conv.bias.zero_()


class ContextModule(nn.Module):
    """The context module on C class-score maps: (B, C, h, w) -> (B, C, h, w).

    Seven 3x3 convs, dilations CONTEXT_DILATIONS, each followed by ReLU, widths
    CONTEXT_WIDTHS[variant] times C; a final 1x1 conv to C without ReLU. 'Same' zero
    padding in every layer (padding = dilation), so any size is kept. (The Caffe release
    instead pads the score map once by 33 and runs the layers unpadded; the two agree
    away from a 33-pixel border.) Identity-initialised (`identity_init_`): at
    initialisation forward(x) = relu(x), exactly x for x >= 0.

    Attributes: variant, convs (the seven 3x3 convs), final (the 1x1).
    """

    def __init__(self, num_classes: int, variant: str = "large", *, tie_noise: float = TIE_NOISE) -> None:
        super().__init__()
        if variant not in CONTEXT_WIDTHS:
            raise ValueError(f"context module variant must be one of {', '.join(CONTEXT_WIDTHS)}, "
                             f"got {variant!r}")
        self.variant = variant
        self.convs = nn.ModuleList()
        in_channels = num_classes
        for dilation, multiple in zip(CONTEXT_DILATIONS, CONTEXT_WIDTHS[variant]):
            conv = nn.Conv2d(in_channels, multiple * num_classes, 3, padding=dilation, dilation=dilation)
            identity_init_(conv, num_classes, tie_noise)
            self.convs.append(conv)
            in_channels = conv.out_channels
        self.final = nn.Conv2d(in_channels, num_classes, 1)
        identity_init_(self.final, num_classes, tie_noise)

    def forward(self, scores: Tensor) -> Tensor:
        x = scores
        for conv in self.convs:
            x = F.relu(conv(x))
        return self.final(x)


class DilatedContext(Segmenter):
    """Yu & Koltun's front end (dilated ResNet at OS8, dropout 0.5, 1x1 classifier) and
    context module on its class scores. Logits at the output stride.

    Training schedule (the paper's stage-wise training within one run): until the buffer
    `context_joined` is set, forward returns the front end's scores and the module gets
    no gradient; `after_step(outputs, labels, step, max_steps)` sets it once
    front_end_fraction of the steps are done, and from then on forward is the module on
    the scores, trained jointly from its identity initialisation. The flag is saved with
    the weights, so a resumed or a trained model is in the right stage. A training loop
    of one's own calls after_step after each optimiser step (as train-segmenter does), or
    `join_context()` when it wants the module in.

    Args:
        num_classes: C, classes including background; the context module works on C
            channels.
        depth, width: the ResNet.
        output_stride: 8 (the paper's front end) or 16 (layer4 dilation 2 only).
        aux: aux FCN head on layer3 (weight 0.4); not in the paper, off by default.
        variant: "large" (default; the paper's best and the released VOC model) or
            "basic" context module.
        context: False drops the context module: the front end alone.
        front_end_fraction: share of the training steps, in [0, 1), in which the front
            end trains alone before the module joins; 0 joins it from the first step
            (which fails from a random front end: see the module docstring).

    Attributes: dropout, classifier (the front end's), context (ContextModule or None),
    aux_head, front_end_fraction, context_joined (bool buffer), find_unused_parameters
    (True when the schedule has a front-end stage, whose steps leave the module without
    gradients: the training loop passes it to DistributedDataParallel).
    """

    def __init__(self, num_classes: int, *, depth: int = 50, width: float = 1.0,
                 output_stride: int = 8, aux: bool = False, variant: str = "large",
                 context: bool = True, front_end_fraction: float = FRONT_END_FRACTION) -> None:
        super().__init__()
        if output_stride not in (8, 16):
            raise ValueError(f"dilated-context: output_stride must be 8 or 16, got {output_stride}")
        if variant not in CONTEXT_WIDTHS:
            raise ValueError(f"dilated-context: variant must be one of {', '.join(CONTEXT_WIDTHS)}, "
                             f"got {variant!r}")
        if not 0 <= front_end_fraction < 1:
            raise ValueError(f"dilated-context: front_end_fraction must be in [0, 1), got {front_end_fraction} "
                             f"(for the front end alone use context=False)")
        self.backbone = resnet(depth, output_stride=output_stride, width=width)
        self.dropout = nn.Dropout(FRONT_END_DROPOUT)
        self.classifier = classifier(self.backbone.channels["layer4"], num_classes)
        self.context = ContextModule(num_classes, variant) if context else None
        self.aux_head = (AuxHead(self.backbone.channels["layer3"], num_classes,
                                 channels=head_channels(self.backbone, 256)) if aux else None)
        self.front_end_fraction = float(front_end_fraction)
        self.find_unused_parameters = self.context is not None and self.front_end_fraction > 0
        self.register_buffer("context_joined", torch.tensor(self.front_end_fraction == 0))

    def front_end(self, features: dict[str, Tensor]) -> Tensor:
        """The front end's class scores (B, C, h, w) from the backbone's stages."""
        return self.classifier(self.dropout(features["layer4"]))

    def head(self, features: dict[str, Tensor]) -> Tensor:
        scores = self.front_end(features)
        if self.context is None or not self.context_joined:
            return scores
        return self.context(scores)

    def join_context(self) -> None:
        """Put the context module into the forward pass from now on (the end of the
        front-end stage)."""
        self.context_joined.fill_(True)

    def after_step(self, outputs: dict[str, Tensor], labels: Tensor, step: int, max_steps: int) -> None:
        """The training loop's hook after each optimiser step (`step` 0-based, of
        `max_steps`): joins the module once front_end_fraction of the steps are done."""
        if step + 1 >= self.front_end_fraction * max_steps:
            self.join_context()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Weights saved before the schedule existed lack the flag; they were trained jointly.
        state_dict.setdefault(prefix + "context_joined", torch.tensor(True))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
