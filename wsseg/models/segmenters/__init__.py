"""The segmenters of the last stage (docs/ALGORITHMS.md §2), by the name `segmenter.model`
uses. One line per model; docs/models/<name>.md describes each. Every class follows
the segmenter contract (see common.Segmenter): constructor
`(num_classes, *, depth, width, output_stride, aux, ...)`, `backbone`, forward -> dict
with "out", loss(outputs, labels) -> dict with "total", predict(x) -> logits at the
input size, param_groups() -> (backbone, heads).
"""

from __future__ import annotations

import difflib
import inspect
import typing
from typing import Any, Mapping

from torch import nn

from wsseg.errors import UserError
from wsseg.models.segmenters.acnet import ACNet
from wsseg.models.segmenters.bisenet import BiSeNet
from wsseg.models.segmenters.danet import DANet
from wsseg.models.segmenters.deeplab import DeepLabV1, DeepLabV2, DeepLabV3, DeepLabV3Plus
from wsseg.models.segmenters.dfanet import DFANet
from wsseg.models.segmenters.dilated_context import DilatedContext
from wsseg.models.segmenters.dupsampling import DUpsampling
from wsseg.models.segmenters.encnet import EncNet
from wsseg.models.segmenters.fastfcn import FastFCN
from wsseg.models.segmenters.fcn import FCN8s, FCN16s, FCN32s, FCNDilated
from wsseg.models.segmenters.lednet import LEDNet
from wsseg.models.segmenters.maxdeeplab import MaXDeepLab
from wsseg.models.segmenters.mcibi import MCIBI
from wsseg.models.segmenters.pspnet import PSPNet
from wsseg.models.segmenters.refinenet import RefineNet

SEGMENTERS: dict[str, type[nn.Module]] = {
    "fcn32s": FCN32s,
    "fcn16s": FCN16s,
    "fcn8s": FCN8s,
    "fcn-d8": FCNDilated,
    "deeplab-v1": DeepLabV1,
    "deeplab-v2": DeepLabV2,
    "deeplab-v3": DeepLabV3,
    "deeplab-v3plus": DeepLabV3Plus,
    "pspnet": PSPNet,
    "encnet": EncNet,
    "mcibi": MCIBI,
    "refinenet": RefineNet,
    "dilated-context": DilatedContext,
    "danet": DANet,
    "fastfcn": FastFCN,
    "bisenet": BiSeNet,
    "lednet": LEDNet,
    "acnet": ACNet,
    "dfanet": DFANet,
    "dupsampling": DUpsampling,
    "maxdeeplab": MaXDeepLab,
}


# Constructor arguments the stage fills from shared config keys, not per-model options.
SHARED_ARGUMENTS = {"num_classes": "data.classes", "depth": "segmenter.depth", "width": "segmenter.width"}
# Shared arguments a model's options may still set for that model alone: segmenter.width shrinks a ResNet, and a
# model with an encoder of its own (LEDNet, DFANet) is already that light at its paper's width.
OVERRIDABLE = {"width": float}


def check_model(name: str, where: str = "segmenter.model") -> type[nn.Module]:
    """The class registered as `name`; an unknown name is a UserError naming `where` and the choices."""
    if name not in SEGMENTERS:
        match = difflib.get_close_matches(name, list(SEGMENTERS), n=1, cutoff=0.5)
        hint = f" (did you mean '{match[0]}'?)" if match else ""
        raise UserError(f"{where}: unknown model '{name}'{hint}; choose one of {', '.join(SEGMENTERS)}")
    return SEGMENTERS[name]


def option_types(name: str) -> dict[str, tuple[Any, Any]]:
    """The options model `name` takes: {argument: (type annotation, default)}, shared arguments left out."""
    cls = SEGMENTERS[name]
    hints = typing.get_type_hints(cls.__init__)
    return {p.name: (hints.get(p.name, Any), p.default) for p in inspect.signature(cls).parameters.values()
            if p.name not in SHARED_ARGUMENTS and p.kind is inspect.Parameter.KEYWORD_ONLY}


def model_options(name: str, options: Mapping[str, Any], where: str = "segmenter.options") -> dict[str, Any]:
    """`segmenter.options.<name>` checked against the model's constructor: every key must be one of
    its keyword arguments and every value of its annotated type. Returns them as keyword arguments;
    errors name `where` (the key, prefixed by the file or --set it came from)."""
    from wsseg.config import coerce_value

    check_model(name, where)
    where = f"{where}.{name}"
    known = option_types(name)
    checked = {}
    for key, value in options.items():
        if key in OVERRIDABLE:
            checked[key] = coerce_value(value, OVERRIDABLE[key], f"{where}.{key}")
            if not checked[key] > 0:
                raise UserError(f"{where}.{key}: must be a positive channel multiplier, got {value!r}")
            continue
        if key in SHARED_ARGUMENTS:
            raise UserError(f"{where}.{key}: set it with {SHARED_ARGUMENTS[key]}, which every model shares")
        if key not in known:
            match = difflib.get_close_matches(key, list(known), n=1, cutoff=0.5)
            hint = f" (did you mean '{match[0]}'?)" if match else ""
            raise UserError(f"{where}: model '{name}' has no option '{key}'{hint}; its options are {', '.join([*known, *OVERRIDABLE])}")
        checked[key] = coerce_value(value, known[key][0], f"{where}.{key}")
    return checked


def build_segmenter(name: str, num_classes: int, *, depth: int = 50, width: float = 1.0,
                    options: Mapping[str, Any] | None = None) -> nn.Module:
    """The segmenter registered as `name`, built with num_classes (background included), the
    shared depth and width, and the model's own options (checked as `model_options` does; a
    `width` among them is that model's instead of the shared one).

    A model's constructor raises ValueError for option values it cannot use together (an
    output stride it does not support, say); that becomes a UserError naming the options key.
    """
    cls = check_model(name)
    kwargs = {"width": width, **model_options(name, options or {})}  # the model's own width, if it sets one
    try:
        return cls(num_classes, depth=depth, **kwargs)
    except ValueError as error:
        raise UserError(f"segmenter.options.{name}: {error}") from None


def describe_options() -> str:
    """Every model's options with their defaults, one line per model (`wsseg config --keys`)."""
    lines = []
    for name in SEGMENTERS:
        options = ", ".join(f"{key}={default!r}" for key, (_, default) in option_types(name).items())
        lines.append(f"  {name}: {options}")
    lines.append(f"  (any model: {', '.join(OVERRIDABLE)}, which then replaces segmenter.{' / segmenter.'.join(OVERRIDABLE)} "
                 f"for that model)")
    return "\n".join(lines)
