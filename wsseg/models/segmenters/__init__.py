"""The segmenters of the last stage (ALGORITHMS.md §2), by the name `segmenter.model`
uses. One line per model; docs/models/<name>.md describes each. Every class follows
the segmenter contract (see common.Segmenter): constructor
`(num_classes, *, depth, width, output_stride, aux, ...)`, `backbone`, forward -> dict
with "out", loss(outputs, labels) -> dict with "total", predict(x) -> logits at the
input size, param_groups() -> (backbone, heads).
"""

from __future__ import annotations

import difflib
import inspect

from torch import nn

from wsseg.errors import UserError
from wsseg.models.segmenters.deeplab import DeepLabV1, DeepLabV2, DeepLabV3, DeepLabV3Plus
from wsseg.models.segmenters.dilated_context import DilatedContext
from wsseg.models.segmenters.encnet import EncNet
from wsseg.models.segmenters.fcn import FCN8s, FCN16s, FCN32s, FCNDilated
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
    "maxdeeplab": MaXDeepLab,
}


def build_segmenter(name: str, num_classes: int, **kwargs) -> nn.Module:
    """The segmenter registered as `name`, built with num_classes (background included)
    and the model's keyword arguments (depth, width, output_stride, aux, ...).

    An unknown name, or an argument the model does not take, raises UserError naming
    the config key (segmenter.model / segmenter.<argument>) and the choices.
    """
    if name not in SEGMENTERS:
        match = difflib.get_close_matches(name, list(SEGMENTERS), n=1, cutoff=0.5)
        hint = f" (did you mean '{match[0]}'?)" if match else ""
        raise UserError(f"segmenter.model: unknown model '{name}'{hint}; choose one of "
                        f"{', '.join(SEGMENTERS)}")
    cls = SEGMENTERS[name]
    options = [p for p in inspect.signature(cls).parameters if p != "num_classes"]
    for key in kwargs:
        if key not in options:
            raise UserError(f"segmenter.{key}: model '{name}' has no option '{key}'; "
                            f"its options are {', '.join(options)}")
    return cls(num_classes, **kwargs)
