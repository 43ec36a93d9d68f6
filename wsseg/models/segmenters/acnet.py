"""ACNet (Hu, Yang, Fei, Wang, "ACNet: Attention Based Network to Exploit Complementary Features
for RGBD Semantic Segmentation", ICIP 2019; docs/models/acnet.md): an RGB-D segmenter.

Three ResNet branches run side by side: one on the RGB image, one on the depth map (its stem
conv takes one channel) and a "merged" branch without a stem. After the stem and after every
stage, an attention complementary module (ACM: global average pooling, 1x1 conv, sigmoid, a
weight per channel) reweights the RGB and the depth features, and the merged branch adds both
to its own stage output; it feeds the next merged stage. The decoder is the authors' (from
RedNet): a 1x1 "agant" layer (conv, BN, ReLU) on each merged level, transposed residual blocks
that double the resolution from stride 32 to 2, each adding the agant of the level it reaches,
and a last transposed conv to the input resolution. During training four side outputs after
the upsampling blocks (strides 16, 8, 4, 2) are supervised as well, each with weight 1, as the
authors' loss sums the five scales.

Input: (B, 4, H, W), the normalised RGB (transforms.normalize) and the normalised depth
(transforms.normalize_depth) as the fourth channel (`input_channels = 4`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from wsseg.models.backbones import ResNet, resnet
from wsseg.models.segmenters.common import Segmenter, head_channels

# The decoder's widths at ResNet-50 width 1 (2048-channel layer4), from stride 32 down to the stem
# level (stride 2): the authors' agant4 (512), deconv1 (256), deconv2 (128), deconv3 (64), deconv4 (64).
DECODER_WIDTHS = (512, 256, 128, 64, 64)
# Transposed residual blocks per upsampling step (deconv1..deconv4) and in the final block (the authors').
DECODER_BLOCKS = (6, 4, 3, 3)
FINAL_BLOCKS = 3
SIDE_OUTPUTS = ("out5", "out4", "out3", "out2")  # the authors' names: strides 16, 8, 4, 2


class ChannelAttention(nn.Module):
    """ACM: x * sigmoid(conv1x1(mean over H, W of x)), one weight per image and channel.

    The 1x1 conv has a bias and no normalisation, as in the authors' code.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1)

    def weights(self, x: Tensor) -> Tensor:
        """(B, C, h, w) -> (B, C, 1, 1) channel weights in (0, 1)."""
        return torch.sigmoid(self.conv(x.mean(dim=(2, 3), keepdim=True)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weights(x)


def _bn_relu_conv1x1(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels),
                         nn.ReLU(inplace=True))


class TransBlock(nn.Module):
    """The authors' TransBasicBlock: 3x3 conv (in -> in), BN, ReLU, then either a 3x3 conv or, with
    stride 2, a 3x3 transposed conv (in -> out, output exactly twice the size), BN; the shortcut is
    the identity, a 1x1 conv + BN (in != out) or a 2x2 stride-2 transposed conv + BN (stride 2);
    ReLU after the sum."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU(inplace=True)
        if stride == 2:
            self.conv2 = nn.ConvTranspose2d(in_channels, out_channels, 3, stride=2, padding=1, output_padding=1,
                                            bias=False)
            self.shortcut = nn.Sequential(nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2, bias=False),
                                          nn.BatchNorm2d(out_channels))
        else:
            self.conv2 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
            self.shortcut = (nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False),
                                           nn.BatchNorm2d(out_channels)) if in_channels != out_channels else None)
        self.bn2 = nn.BatchNorm2d(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.shortcut is None else self.shortcut(x)
        return self.relu(out + shortcut)


def _transpose_stage(in_channels: int, out_channels: int, blocks: int, stride: int) -> nn.Sequential:
    """The authors' _make_transpose: blocks - 1 blocks at in_channels, then one to out_channels with the stride."""
    units = [TransBlock(in_channels, in_channels) for _ in range(blocks - 1)]
    units.append(TransBlock(in_channels, out_channels, stride))
    return nn.Sequential(*units)


def _crop_to(x: Tensor, reference: Tensor) -> Tensor:
    """x cut to reference's height and width at the top left. Each stride-2 step of the encoder maps n
    to ceil(n / 2), so doubling gives n or n + 1: the extra last row/column is the one dropped."""
    return x[..., : reference.shape[-2], : reference.shape[-1]]


class ACNet(Segmenter):
    """ACNet: RGB, depth and merged ResNet branches with ACMs after the stem and every stage, and
    the authors' transposed-residual decoder with skip connections from the merged levels.

    forward(x (B, 4, H, W)) -> {"out": logits (B, K, H, W)} and, in training with
    deep_supervision, "out5", "out4", "out3", "out2": logits at strides 16, 8, 4, 2. The encoder
    runs at output stride 32 (the authors'); any H, W works (the decoder cuts each upsampled map to
    the size of the level it joins).

    `backbone` is the RGB branch; `depth_encoder` the depth branch (stem conv with one input
    channel); `merged_layers` the merged branch's layer1..layer4 (its input is the max-pooled sum
    of the reweighted stems). param_groups(): the three branches are the backbone group, the ACMs
    and the decoder the heads.
    """

    input_channels = 4
    label_size_from = "logits"  # the authors downsample the labels to each side output (nearest)

    def __init__(self, num_classes: int, *, depth: int = 50, width: float = 1.0,
                 deep_supervision: bool = True) -> None:
        super().__init__()
        self.backbone = resnet(depth, output_stride=32, width=width)
        self.depth_encoder = resnet(depth, output_stride=32, width=width)
        stem = self.backbone.channels["stem"]
        self.depth_encoder.conv1 = nn.Conv2d(1, stem, 7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(self.depth_encoder.conv1.weight, mode="fan_out", nonlinearity="relu")
        merged = resnet(depth, output_stride=32, width=width)
        self.merged_pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.merged_layers = nn.ModuleList([merged.layer1, merged.layer2, merged.layer3, merged.layer4])
        self.aux_head = None
        self.deep_supervision = deep_supervision

        levels = ("stem", "layer1", "layer2", "layer3", "layer4")
        channels = [self.backbone.channels[level] for level in levels]
        self.attention_rgb = nn.ModuleList(ChannelAttention(c) for c in channels)
        self.attention_depth = nn.ModuleList(ChannelAttention(c) for c in channels)

        # Decoder widths from stride 32 to stride 2, scaled with the backbone like every head.
        widths = [head_channels(self.backbone, c) for c in DECODER_WIDTHS]
        # agant[k] projects merged level k (0 = stem, ..., 4 = layer4) to the decoder width there.
        self.agant = nn.ModuleList(_bn_relu_conv1x1(channels[k], widths[4 - k]) for k in range(5))
        self.up = nn.ModuleList(_transpose_stage(widths[i], widths[i + 1], DECODER_BLOCKS[i], 2) for i in range(4))
        self.side = nn.ModuleList(nn.Conv2d(widths[i + 1], num_classes, 1) for i in range(4))
        self.final = _transpose_stage(widths[4], widths[4], FINAL_BLOCKS, 1)
        self.final_up = nn.ConvTranspose2d(widths[4], num_classes, 2, stride=2)

        # The authors' initialisation of every conv outside the ResNets: N(0, sqrt(2 / (k·k·out))).
        for module in (self.attention_rgb, self.attention_depth, self.agant, self.up, self.side, self.final):
            for m in module.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    # ---- encoder

    @staticmethod
    def _stem(branch: ResNet, x: Tensor) -> Tensor:
        return branch.relu(branch.bn1(branch.conv1(x)))  # the max-pool comes after the ACM

    def encode(self, x: Tensor) -> list[Tensor]:
        """x (B, 4, H, W) -> the merged branch's five levels: stem (stride 2), layer1..layer4 (4..32)."""
        if x.dim() != 4 or x.shape[1] != self.input_channels:
            raise ValueError(f"acnet takes (B, 4, H, W): normalised RGB and normalised depth, got {tuple(x.shape)}")
        rgb = self._stem(self.backbone, x[:, :3])
        depth = self._stem(self.depth_encoder, x[:, 3:])
        merged = self.attention_rgb[0](rgb) + self.attention_depth[0](depth)
        levels = [merged]
        rgb, depth, merged = self.backbone.maxpool(rgb), self.depth_encoder.maxpool(depth), self.merged_pool(merged)
        for index, name in enumerate(("layer1", "layer2", "layer3", "layer4"), start=1):
            rgb = getattr(self.backbone, name)(rgb)
            depth = getattr(self.depth_encoder, name)(depth)
            merged = (self.merged_layers[index - 1](merged) + self.attention_rgb[index](rgb)
                      + self.attention_depth[index](depth))
            levels.append(merged)
        return levels

    # ---- decoder

    def decode(self, levels: list[Tensor], size: tuple[int, int]) -> dict[str, Tensor]:
        x = self.agant[4](levels[4])
        sides = {}
        for step in range(4):
            skip = levels[3 - step]
            x = _crop_to(self.up[step](x), skip)
            if self.training and self.deep_supervision:
                sides[SIDE_OUTPUTS[step]] = self.side[step](x)
            x = x + self.agant[3 - step](skip)
        out = self.final_up(self.final(x))[..., : size[0], : size[1]]
        return {"out": out, **sides}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """x (B, 4, H, W) -> {"out": (B, K, H, W)} (+ the four side outputs in training)."""
        return self.decode(self.encode(x), x.shape[-2:])

    def loss(self, outputs: dict[str, Tensor], labels: Tensor) -> dict[str, Tensor]:
        """"main" (the full-resolution output) plus each side output's term, all with weight 1 (the
        authors' sum over five scales); "total" is their sum."""
        terms = {"main": self.pixel_loss(outputs["out"], labels)}
        terms["total"] = terms["main"]
        return self.add_pixel_terms(terms, outputs, labels, SIDE_OUTPUTS, 1.0)

    def predict(self, x: Tensor) -> Tensor:
        """x (B, 4, H, W) -> logits (B, K, H, W)."""
        return self.decode(self.encode(x), x.shape[-2:])["out"]

    def head(self, features: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError("acnet decodes the merged branch's levels: call forward or predict")

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(the RGB, depth and merged ResNet branches, everything else: ACMs and decoder)."""
        encoders = [self.backbone, self.depth_encoder, self.merged_layers]
        in_encoders = {id(p) for module in encoders for p in module.parameters()}
        backbone = [p for module in encoders for p in module.parameters() if p.requires_grad]
        heads = [p for p in self.parameters() if p.requires_grad and id(p) not in in_encoders]
        return backbone, heads

    def backbone_weights_loaded(self) -> None:
        """After ImageNet (or other ResNet) weights went into `backbone`: start the depth and merged
        branches from them too, as the authors' code does (the depth stem's 1-channel conv is the
        mean of the RGB conv over its input channels)."""
        with torch.no_grad():
            state = self.backbone.state_dict()
            depth_state = dict(state)
            depth_state["conv1.weight"] = state["conv1.weight"].mean(dim=1, keepdim=True)
            self.depth_encoder.load_state_dict(depth_state)
            for index, layer in enumerate(self.merged_layers, start=1):
                prefix = f"layer{index}."
                layer.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
