"""ResNet-18/34/50/101 backbones that return every stage and load torchvision files.

The layout is torchvision's ResNet v1.5 (the stride of a bottleneck sits in its 3x3
conv), and every parameter and buffer has torchvision's name (`conv1`, `bn1`,
`layer1.0.conv1`, ..., `layer4.0.downsample.0`), so a torchvision ImageNet file loads
directly; its `fc.*` keys are ignored. torchvision itself is never imported.

Knobs the pipeline needs on top of torchvision's ResNet:
- per-stage strides and dilations (IRN's CAM net: strides (1, 2, 2, 1), no dilation,
  output stride 16; DeepLab: OS8/OS16 with dilation; `resnet()` maps an output stride
  to both), and DeepLab v3's multi-grid in layer4;
- `frozen_bn`: BatchNorm normalises with its running statistics even in train() and
  never updates them (IRN's FixedBatchNorm); the affine weight and bias still learn;
- `trainable`: the stages whose parameters learn. A frozen stage is fully frozen: its
  parameters do not require grad and its BatchNorms stay in eval mode. The leading run
  of frozen stages runs under torch.no_grad(), so its outputs are detached (IRN stops
  gradients after layer2) and keep no activations for backward;
- `width`: multiplies every stage's channel count, for small models on a CPU.

`fold_batchnorm(backbone)` makes an inference-only copy for per-image inference: every
BatchNorm folded into the conv before it, and on CPU the ReLU and the residual add
computed inside oneDNN's convolution (make-cam's time, docs/BENCHMARKS.md).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsseg.errors import UserError

STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")

# depth -> (block kind, units per layer1..layer4), from He et al. 2016, table 1.
_ARCHITECTURES = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}

# torchvision's IMAGENET1K_V1 files (the classic ones IRN and its successors used; the
# old resnet50-19c8e357.pth IRN downloaded holds the same 76.13 % weights).
TORCHVISION_URLS = {
    18: "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    34: "https://download.pytorch.org/models/resnet34-b627a593.pth",
    50: "https://download.pytorch.org/models/resnet50-0676ba61.pth",
    101: "https://download.pytorch.org/models/resnet101-63fe2227.pth",
}

_STAGE_WIDTHS = (64, 128, 256, 512)  # planes of layer1..layer4 at width 1
_STEM_WIDTH = 64


def _scaled(channels: int, width: float) -> int:
    """A channel count times the width multiplier, rounded, at least 8."""
    return max(8, int(round(channels * width)))


class BasicBlock(nn.Module):
    """Two 3x3 convs with an identity (or 1x1 projection) shortcut; ResNet-18/34."""

    expansion = 1

    def __init__(self, in_channels: int, planes: int, *, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, planes, 3, stride=stride, padding=dilation,
                               dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + shortcut)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries the stride: v1.5), 1x1 expand x4; ResNet-50/101."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, *, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=dilation,
                               dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + shortcut)


class ResNet(nn.Module):
    """A ResNet whose forward returns the output of every stage.

    Args:
        depth: 18, 34 (basic blocks), 50 or 101 (bottlenecks).
        width: multiplier of every stage's channels (rounded, at least 8); 1.0 is the
            standard network, the only one torchvision files fit.
        stem_stride: stride of conv1 (the max-pool adds another 2).
        strides: strides of layer1..layer4 (torchvision: (1, 2, 2, 2); IRN: (1, 2, 2, 1)).
        dilations: dilation of every 3x3 conv in layer1..layer4 (all units of a stage,
            as in DeepLab).
        multi_grid: per-unit multipliers of layer4's dilation (DeepLab v3: (1, 2, 4));
            unit i uses multi_grid[i % len(multi_grid)], so (1, 2, 4) gives (1, 2) on
            ResNet-18's two-unit layer4.
        frozen_bn: BatchNorm always uses (and never updates) its running statistics,
            also in train(); affine parameters still learn.
        trainable: stages whose parameters learn, from "stem", "layer1".."layer4".

    Attributes:
        channels: output channels of each stage ("stem": 64*width; bottleneck
            "layer1": 256*width, ..., "layer4": 2048*width).
        strides_of: cumulative output stride of each stage ("stem": 4 by default).
    """

    def __init__(self, depth: int = 50, *, width: float = 1.0, stem_stride: int = 2,
                 strides: tuple[int, int, int, int] = (1, 2, 2, 2),
                 dilations: tuple[int, int, int, int] = (1, 1, 1, 1),
                 multi_grid: tuple[int, ...] | None = None,
                 frozen_bn: bool = False,
                 trainable: tuple[str, ...] = STAGES) -> None:
        super().__init__()
        if depth not in _ARCHITECTURES:
            raise ValueError(f"ResNet depth must be one of {sorted(_ARCHITECTURES)}, got {depth}")
        if not width > 0:
            raise ValueError(f"ResNet width must be > 0, got {width}")
        if len(strides) != 4 or any(s not in (1, 2) for s in strides) or stem_stride not in (1, 2):
            raise ValueError(f"ResNet strides must be 1 or 2 (4 stages), got {strides}, stem {stem_stride}")
        if len(dilations) != 4 or any(d < 1 for d in dilations):
            raise ValueError(f"ResNet dilations must be 4 integers >= 1, got {dilations}")
        if multi_grid is not None and (len(multi_grid) == 0 or any(m < 1 for m in multi_grid)):
            raise ValueError(f"multi_grid must be a non-empty tuple of integers >= 1, got {multi_grid}")
        unknown = sorted(set(trainable) - set(STAGES))
        if unknown:
            raise ValueError(f"unknown trainable stages {unknown}; choose from {STAGES}")

        kind, units = _ARCHITECTURES[depth]
        block = BasicBlock if kind == "basic" else Bottleneck
        self.depth = depth
        self.width = float(width)
        self.frozen_bn = frozen_bn
        self.trainable = tuple(s for s in STAGES if s in trainable)

        stem_channels = _scaled(_STEM_WIDTH, width)
        self.conv1 = nn.Conv2d(3, stem_channels, 7, stride=stem_stride, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_channels)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)

        self.channels = {"stem": stem_channels}
        self.strides_of = {"stem": stem_stride * 2}
        in_channels, total_stride = stem_channels, stem_stride * 2
        for index in range(4):
            name = f"layer{index + 1}"
            planes = _scaled(_STAGE_WIDTHS[index], width)
            unit_dilations = [dilations[index]] * units[index]
            if index == 3 and multi_grid is not None:
                unit_dilations = [dilations[3] * multi_grid[i % len(multi_grid)]
                                  for i in range(units[3])]
            layer = self._make_layer(block, in_channels, planes, strides[index], unit_dilations)
            self.add_module(name, layer)
            in_channels = planes * block.expansion
            total_stride *= strides[index]
            self.channels[name] = in_channels
            self.strides_of[name] = total_stride

        # torchvision's initialisation.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

        for name in STAGES:
            if name not in self.trainable:
                for parameter in self._stage_parameters(name):
                    parameter.requires_grad_(False)
        # Stages before the first trainable one run without autograd.
        self._frozen_prefix = next((i for i, s in enumerate(STAGES) if s in self.trainable), len(STAGES))
        self.train()

    @staticmethod
    def _make_layer(block: type[BasicBlock] | type[Bottleneck], in_channels: int, planes: int,
                    stride: int, unit_dilations: list[int]) -> nn.Sequential:
        out_channels = planes * block.expansion
        downsample = None
        if stride != 1 or in_channels != out_channels:
            downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        units = [block(in_channels, planes, stride=stride, dilation=unit_dilations[0], downsample=downsample)]
        for dilation in unit_dilations[1:]:
            units.append(block(out_channels, planes, dilation=dilation))
        return nn.Sequential(*units)

    def _stage_modules(self, name: str) -> list[nn.Module]:
        return [self.conv1, self.bn1] if name == "stem" else [getattr(self, name)]

    def _stage_parameters(self, name: str) -> list[nn.Parameter]:
        return [p for module in self._stage_modules(name) for p in module.parameters()]

    def _stem(self, x: Tensor) -> Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def train(self, mode: bool = True) -> ResNet:
        """Set train/eval mode, keeping frozen BatchNorms and frozen stages in eval."""
        super().train(mode)
        if mode:
            for name in STAGES:
                if name not in self.trainable:
                    for module in self._stage_modules(name):
                        module.eval()
            if self.frozen_bn:
                for module in self.modules():
                    if isinstance(module, nn.modules.batchnorm._BatchNorm):
                        module.eval()
        return self

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """x (B, 3, H, W) normalised image -> {stage: (B, channels[stage], ~H/s, ~W/s)}.

        Each stride-2 step maps a size n to ceil(n / 2), so "layerK" has spatial size
        H halved-with-ceiling log2(strides_of["layerK"]) times.
        """
        stage_fns: dict[str, Callable[[Tensor], Tensor]] = {
            "stem": self._stem, "layer1": self.layer1, "layer2": self.layer2,
            "layer3": self.layer3, "layer4": self.layer4,
        }
        outputs = {}
        for index, name in enumerate(STAGES):
            if index < self._frozen_prefix:
                with torch.no_grad():
                    x = stage_fns[name](x)
            else:
                x = stage_fns[name](x)
            outputs[name] = x
        return outputs


class FoldedConv(nn.Module):
    """Inference-only conv with its BatchNorm folded in: relu(bn(conv(x)) + residual), each optional.

    In eval mode BN is the per-channel affine map y * s + t with s = gamma / sqrt(var + eps)
    and t = beta - mean * s, so it folds into the conv's weight (times s) and bias (t):
    one pass over the output instead of two or three (BN, ReLU, the residual add). On
    CPU in float32 the bias, the residual add and the ReLU run as post-ops inside
    oneDNN's convolution (the op torch.compile's CPU backend emits); elsewhere (CUDA,
    autocast, another dtype) F.conv2d, then the add and the ReLU.

    Args:
        conv: the trained conv (its weights are copied, never changed).
        bn: the BatchNorm after it; its running statistics are used, as in eval().
        relu: apply ReLU last (after the residual add when there is one).
        memory_format: of the folded weight and of every input (torch.channels_last:
            oneDNN's fastest CPU layout, and tensor cores' on CUDA).
    """

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, *, relu: bool,
                 memory_format: torch.memory_format = torch.contiguous_format) -> None:
        super().__init__()
        with torch.no_grad():
            # Folded in float64: the copy differs from conv + BN by float32 rounding only.
            scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
            shift = bn.bias.double() - bn.running_mean.double() * scale
            if conv.bias is not None:
                shift = shift + conv.bias.double() * scale
            weight = conv.weight.double() * scale.reshape(-1, 1, 1, 1)
        dtype = conv.weight.dtype
        self.register_buffer("weight", weight.to(dtype).contiguous(memory_format=memory_format))
        self.register_buffer("bias", shift.to(dtype))
        self.stride, self.padding = list(conv.stride), list(conv.padding)
        self.dilation, self.groups = list(conv.dilation), conv.groups
        self.relu = relu
        self.memory_format = memory_format

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """x (B, C_in, H, W) -> (B, C_out, H', W'); residual, if given, has the output's shape."""
        x = x.contiguous(memory_format=self.memory_format)
        if _use_onednn_fusion(x, self.weight):
            unary = "relu" if self.relu else "none"
            if residual is None:
                return torch.ops.mkldnn._convolution_pointwise(
                    x, self.weight, self.bias, self.padding, self.stride, self.dilation, self.groups,
                    unary, [], "")
            residual = residual.contiguous(memory_format=self.memory_format)
            return torch.ops.mkldnn._convolution_pointwise.binary(
                x, residual, self.weight, self.bias, self.padding, self.stride, self.dilation, self.groups,
                "add", None, "relu" if self.relu else None, [], "")
        out = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        if residual is not None:
            out = out + residual
        return torch.relu_(out) if self.relu else out


@functools.cache
def _onednn_fusion_works() -> bool:
    """Whether this PyTorch has oneDNN's fused CPU convolution (a private op) and it computes
    conv + bias + add + ReLU; checked once on a tiny input, F.conv2d is the fallback."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")):
        return False
    generator = torch.Generator().manual_seed(0)
    x, residual = torch.randn(1, 4, 5, 5, generator=generator), torch.randn(1, 8, 5, 5, generator=generator)
    weight, bias = torch.randn(8, 4, 3, 3, generator=generator), torch.randn(8, generator=generator)
    try:
        with torch.no_grad():
            fused = torch.ops.mkldnn._convolution_pointwise.binary(
                x, residual, weight, bias, [1, 1], [1, 1], [1, 1], 1, "add", None, "relu", [], "")
            plain = torch.ops.mkldnn._convolution_pointwise(x, weight, bias, [1, 1], [1, 1], [1, 1], 1,
                                                             "none", [], "")
            expected = F.conv2d(x, weight, bias, padding=1)
    except (RuntimeError, TypeError, AttributeError):
        return False
    return (torch.allclose(plain, expected, rtol=1e-4, atol=1e-4)
            and torch.allclose(fused, torch.relu(expected + residual), rtol=1e-4, atol=1e-4))


def _use_onednn_fusion(x: Tensor, weight: Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and torch.backends.mkldnn.enabled
            and not (torch.is_grad_enabled() and x.requires_grad) and _onednn_fusion_works())


class _FoldedBasicBlock(nn.Module):
    """BasicBlock with folded BatchNorms: relu(conv2(relu(conv1(x))) + shortcut)."""

    def __init__(self, block: BasicBlock, memory_format: torch.memory_format) -> None:
        super().__init__()
        self.conv1 = FoldedConv(block.conv1, block.bn1, relu=True, memory_format=memory_format)
        self.conv2 = FoldedConv(block.conv2, block.bn2, relu=True, memory_format=memory_format)
        self.downsample = _folded_downsample(block.downsample, memory_format)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.conv2(self.conv1(x), residual=shortcut)


class _FoldedBottleneck(nn.Module):
    """Bottleneck with folded BatchNorms: relu(conv3(relu(conv2(relu(conv1(x))))) + shortcut)."""

    def __init__(self, block: Bottleneck, memory_format: torch.memory_format) -> None:
        super().__init__()
        self.conv1 = FoldedConv(block.conv1, block.bn1, relu=True, memory_format=memory_format)
        self.conv2 = FoldedConv(block.conv2, block.bn2, relu=True, memory_format=memory_format)
        self.conv3 = FoldedConv(block.conv3, block.bn3, relu=True, memory_format=memory_format)
        self.downsample = _folded_downsample(block.downsample, memory_format)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.conv3(self.conv2(self.conv1(x)), residual=shortcut)


def _folded_downsample(downsample: nn.Module | None, memory_format: torch.memory_format) -> FoldedConv | None:
    if downsample is None:
        return None
    conv, bn = downsample  # nn.Sequential(conv 1x1, BatchNorm), see ResNet._make_layer
    return FoldedConv(conv, bn, relu=False, memory_format=memory_format)


def fold_batchnorm(backbone: ResNet, *, channels_last: bool = False) -> ResNet:
    """An inference-only copy of `backbone`: what backbone.eval() computes, faster.

    Every BatchNorm is folded into the conv before it (FoldedConv; the ReLU and the
    residual add fuse into the conv on CPU). The copy's forward returns the same stages
    as the backbone's (equal up to float32 rounding); its tensors are buffers, so it
    cannot train, and `backbone` itself is left untouched (the trained weights, the
    checkpoint). channels_last stores the weights and runs every conv in that memory
    format. Build it once and reuse it: a ResNet-50 takes a fraction of a second.
    """
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    replacements: dict[int, nn.Module] = {
        id(backbone.conv1): FoldedConv(backbone.conv1, backbone.bn1, relu=True, memory_format=memory_format),
        id(backbone.bn1): nn.Identity(),
        id(backbone.relu): nn.Identity(),  # the stem's ReLU is inside conv1 now
    }
    for name in STAGES[1:]:
        layer = getattr(backbone, name)
        replacements[id(layer)] = nn.Sequential(*[
            (_FoldedBottleneck if isinstance(unit, Bottleneck) else _FoldedBasicBlock)(unit, memory_format)
            for unit in layer])
    # A deep copy of the rest (channels, strides_of, the frozen prefix, the max-pool) with the
    # replacements in place of the originals: deepcopy takes what its memo holds as already copied,
    # so the trained tensors are never copied twice.
    folded = copy.deepcopy(backbone, memo=replacements)
    return folded.eval()


def resnet(depth: int = 50, *, output_stride: int = 32, dilate: bool = True, **kwargs) -> ResNet:
    """A ResNet with the given output stride (default stem).

    OS32: torchvision's strides. OS16: layer4 stride 1, dilation 2 if `dilate` (DeepLab)
    or 1 (IRN's CAM network). OS8: layer3 and layer4 stride 1, dilations 2 and 4 if
    `dilate`. Other keyword arguments go to ResNet (strides/dilations are set here).
    """
    if "strides" in kwargs or "dilations" in kwargs:
        raise TypeError("resnet() sets strides and dilations from output_stride; use ResNet() to set them")
    d = 2 if dilate else 1
    layouts = {
        32: ((1, 2, 2, 2), (1, 1, 1, 1)),
        16: ((1, 2, 2, 1), (1, 1, 1, d)),
        8: ((1, 2, 1, 1), (1, 1, d, d * d)),
    }
    if output_stride not in layouts:
        raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
    strides, dilations = layouts[output_stride]
    return ResNet(depth, strides=strides, dilations=dilations, **kwargs)


def load_weights(model: ResNet, source: str | Path | None) -> None:
    """Load backbone weights into `model` in place.

    source: None (keep the random initialisation); "imagenet" (torchvision's ImageNet
    file for the model's depth, through torch.hub's cache); or a file path holding a
    state dict, plain or under "state_dict"/"model". "module." prefixes are stripped;
    if keys start with "backbone." (a whole saved model, e.g. wsseg's CAM network) only
    those keys are used, without the prefix; "fc.*" is ignored. Loading is strict:
    missing, unexpected or differently shaped keys raise UserError naming the file and
    the likely cause. Files without num_batches_tracked (pre-1.0 torchvision) load.
    """
    if source is None:
        return
    if isinstance(source, str) and source == "imagenet":
        origin = f"backbone.weights: imagenet (ResNet-{model.depth})"
        state = _download_imagenet(model)
    else:
        path = Path(source)
        origin = str(path)
        if not path.is_file():
            raise UserError(f"{path}: backbone weights file not found; set backbone.weights to an "
                            f"existing file, 'imagenet' or null (random init)")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # any unreadable file: pickle, zip, truncation
            raise UserError(f"{path}: cannot read backbone weights ({_first_line(error)}); "
                            f"it must be a PyTorch state dict saved with torch.save") from None
    _load_strict(model, _backbone_state(state, origin), origin)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200]}" if text else type(error).__name__


def _download_imagenet(model: ResNet) -> Mapping[str, Tensor]:
    if model.width != 1.0:
        raise UserError(f"backbone.weights: imagenet needs backbone.width 1.0 (got {model.width:g}); "
                        f"set backbone.width: 1.0 or backbone.weights: null")
    url = TORCHVISION_URLS[model.depth]
    try:
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=True,
                                                  check_hash=True, weights_only=True)
    except Exception as error:  # offline, proxy, partial download, bad hash
        raise UserError(f"backbone.weights: imagenet: could not download {url} ({_first_line(error)}); "
                        f"download that file on a machine with network access and set "
                        f"backbone.weights to its path") from None


def _backbone_state(state: object, origin: str) -> dict[str, Tensor]:
    """The backbone's tensors from a loaded checkpoint, under torchvision's names."""
    if isinstance(state, Mapping):
        for wrapper in ("state_dict", "model"):
            if isinstance(state.get(wrapper), Mapping):
                state = state[wrapper]
                break
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise UserError(f"{origin}: not a state dict (a mapping of names to tensors, plain or under "
                        f"'state_dict'/'model'); point backbone.weights to a ResNet checkpoint")
    state = {str(k).removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("backbone.") for k in state):
        state = {k.removeprefix("backbone.").removeprefix("module."): v
                 for k, v in state.items() if k.startswith("backbone.")}
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


def _load_strict(model: ResNet, state: dict[str, Tensor], origin: str) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mismatched = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if mismatched:
            k = mismatched[0]
            problems.append(f"{len(mismatched)} with other shapes (e.g. {k}: file "
                            f"{tuple(state[k].shape)}, model {tuple(expected[k].shape)})")
        raise UserError(f"{origin}: weights do not fit ResNet-{model.depth} width {model.width:g}: "
                        f"{'; '.join(problems)}; likely cause: {_likely_cause(model, state, missing, unexpected)}")
    complete = {k: state.get(k, expected[k]) for k in expected}
    model.load_state_dict(complete, strict=True)


def _guess_depth(state: Mapping[str, Tensor]) -> int | None:
    """The depth whose structure matches the file's keys, or None."""
    kind = "bottleneck" if "layer1.0.conv3.weight" in state else "basic"
    units = []
    for layer in range(1, 5):
        indices = {k.split(".")[1] for k in state if k.startswith(f"layer{layer}.")}
        units.append(len(indices))
    for depth, architecture in _ARCHITECTURES.items():
        if architecture == (kind, tuple(units)):
            return depth
    return None


def _likely_cause(model: ResNet, state: Mapping[str, Tensor], missing: list[str],
                  unexpected: list[str]) -> str:
    file_depth = _guess_depth(state)
    if file_depth is not None and file_depth != model.depth:
        return (f"the file holds a ResNet-{file_depth}, the model is a ResNet-{model.depth}; "
                f"set backbone.depth: {file_depth}")
    conv1 = state.get("conv1.weight")
    if conv1 is not None and conv1.shape[0] != model.channels["stem"]:
        file_width = conv1.shape[0] / _STEM_WIDTH
        return (f"the file was saved at width {file_width:g} and the model has width {model.width:g} "
                f"(torchvision/ImageNet files are width 1); set backbone.width: {file_width:g}")
    if any("downsample" in k for k in missing + unexpected):
        return ("the layer strides differ from the file's (a downsample branch exists only where a "
                "stage changes stride or channels)")
    if file_depth is None:
        return "the file is not a ResNet-18/34/50/101 backbone with torchvision's parameter names"
    return "the file was saved from a differently configured network"
