"""Typed configuration: one frozen dataclass per section, YAML loading, `--set` overrides.

Every key has a type, a default and a one-line meaning. Defaults are IRN's VOC 2012
recipe (docs/ALGORITHMS.md); pipelines/voc.yaml states them all explicitly and
pipelines/demo.yaml overrides what the CPU demo needs. Loading validates everything:
an unknown key names the closest known key; a wrong type or out-of-range value names
the key, the value and what is allowed. Several files stack, later ones winning
(`--config base.yaml --config calibrated.yaml`), then `--set a.b=c` overrides.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from wsseg.errors import UserError

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)


_NO_NEUTRAL = object()


def key(default, doc: str, *, choices=None, low=None, high=None, positive=False, check=None, neutral=_NO_NEUTRAL):
    """A config field: default, meaning (with unit) and the allowed values. `check(value, where)`
    validates what a type and a range cannot say (e.g. a model's options against its constructor).
    `neutral`: for an option added after runs already exist, the value at which it changes nothing;
    at that value the key stays out of the stages' fingerprints, so earlier runs stay up to date."""
    meta = {"doc": doc, "choices": choices, "low": low, "high": high, "positive": positive, "check": check}
    if neutral is not _NO_NEUTRAL:
        meta["neutral"] = neutral
    if isinstance(default, list) or (isinstance(default, dict) and not isinstance(default, FrozenMap)):
        raise TypeError("use tuples and FrozenMaps for defaults (configs are frozen)")
    return field(default=default, metadata=meta)


class FrozenMap(dict):
    """A mapping config value that cannot change after loading (configs are frozen).

    A dict subclass, so JSON, YAML and dataclasses.asdict treat it as a plain dict."""

    def _read_only(self, *args, **kwargs):
        raise TypeError("config values are read-only; build a new config instead")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _read_only  # type: ignore[assignment]

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted(self.items())))

    def __reduce__(self):  # pickled for worker processes: rebuilt whole, not item by item
        return (FrozenMap, (dict(self),))


def freeze(value: Any) -> Any:
    """YAML data as config values: lists become tuples, mappings FrozenMaps, all the way down."""
    if isinstance(value, dict):
        return FrozenMap({k: freeze(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    return value


def _check_segmenter_model(name: str, where: str) -> None:
    from wsseg.models.segmenters import check_model

    check_model(name, where)


def _check_segmenter_options(options: dict, where: str) -> None:
    from wsseg.models.segmenters import model_options

    for model, values in options.items():
        model_options(model, values, where)


def _check_lr_by_model(values: dict, where: str) -> None:
    from wsseg.models.segmenters import check_model

    for model, recipe in values.items():
        check_model(model, where)
        if not isinstance(recipe, typing.Mapping):
            raise UserError(f"{where}.{model}: expected a mapping such as {{head_lr_mult: 1.0}}, got {recipe!r}")
        for name, value in recipe.items():
            if name not in LR_BY_MODEL_KEYS:
                raise UserError(f"{where}.{model}.{name}: unknown; it takes {' and '.join(LR_BY_MODEL_KEYS)}")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise UserError(f"{where}.{model}.{name}: expected a positive number, got {value!r}")


LR_BY_MODEL_KEYS = ("lr", "head_lr_mult")

MODEL_OPTIONS_DOC = ("per-model constructor options, by model name: {maxdeeplab: {num_slots: 64}, deeplab-v3: "
                     "{output_stride: 8}, lednet: {width: 1.0}}; checked against the model's constructor (width: that model's "
                     "own instead of segmenter.width), only the chosen model's are used "
                     "(and make its result stale); docs/models/<name>.md lists each model's options")


CRF_METHOD_DOC = ("dense (pydensecrf's fully connected CRF) | conv (ConvCRF, Teichmann & Cipolla 2019: the same "
                  "energy, messages only within crf_window x crf_window cells of the image pooled by crf_blur)")
CRF_WINDOW_DOC = "conv CRF: window side in pooled cells (odd); it reaches (crf_window // 2) x crf_blur pixels"
CRF_BLUR_DOC = "conv CRF: the messages run on the image pooled by this factor (1 = full resolution)"


def _check_odd(value: int, where: str) -> None:
    if value % 2 == 0:
        raise UserError(f"{where}: must be odd (a window centred on its pixel), got {value}")


@dataclass(frozen=True)
class RunSection:
    dir: str = key("runs/voc", "run directory: every stage's artifacts and records live here")
    seed: int = key(0, "random seed for training, augmentation and sampling", low=0)
    device: str = key("auto", "auto | cpu | cuda | cuda:N (auto: CUDA when available)")
    workers: int = key(2, "processes for CPU-bound per-image work (CRF, instances) and data loading", low=0)
    amp: bool = key(True, "mixed precision on CUDA (bf16 where supported, else fp16); ignored on CPU")
    channels_last: bool = key(True, "channels_last memory format for make-cam's inference network on CUDA (on CPU it always "
                                             "uses it); training stays contiguous, measured faster on CUDA for the "
                                             "ResNet-50 CAM and IRN networks (docs/BENCHMARKS.md, CUDA)")
    tensorboard: typing.Optional[bool] = key(None, "training stages write TensorBoard event files under RUN/tb/<stage>/<phase> "
                                                   "(`tensorboard --logdir RUN/tb`); null: on when the tensorboard package "
                                                   "is installed (pip install 'wsseg[tensorboard]')")


@dataclass(frozen=True)
class DataSection:
    format: str = key("voc", "dataset layout: voc (the VOC 2012 devkit: JPEGImages, Annotations, ImageSets, ...), coco "
                             "(train2014/, val2014/, annotations/instances_*.json) or folder (images/, tags.csv, optional "
                             "masks/); data/README.md", choices=("voc", "coco", "folder"), neutral="voc")
    root: str = key("data/VOCdevkit/VOC2012", "dataset root in the data.format layout (VOC: the folder with JPEGImages, "
                                              "Annotations, ...)")
    classes: typing.Optional[tuple[str, ...]] = key(None, "foreground class names in class-id order (id = position + 1); "
                                                          "null: the format's own (voc: VOC's 20; coco: COCO's 80 in "
                                                          "category-id order; folder: tags.csv's names in order of first "
                                                          "appearance)")
    train_list: str = key("train_aug", "images for training the CAM and IRN networks (list name or file)")
    label_list: str = key("train_aug", "images that get CAMs, relations and pseudo labels")
    eval_list: str = key("train", "images with ground truth for evaluating CAMs and pseudo labels (IRN: VOC train)")
    segmenter_train_list: str = key("train_aug", "images for training the segmenter")
    val_list: str = key("val", "images for validating the segmenter")
    cls_labels: typing.Optional[str] = key(None, "IRN's cls_labels.npy for image tags instead of the XML annotations")
    label_dirs: tuple[str, ...] = key(("SegmentationClass", "SegmentationClassAug"), "folders searched in order for ground-truth class maps")
    on_bad_image: str = key("error", "error: stop at an unreadable image; skip: leave it out and report it", choices=("error", "skip"))
    max_side: int = key(0, "images whose long side is longer are downscaled to it on read (masks and depth too): every "
                           "stage then works at that size, and `wsseg export` maps the labels back to the files' size; "
                           "0 = off (camera photos of 4000 px: docs/BENCHMARKS.md, Large images)", low=0, neutral=0)
    depth_dir: typing.Optional[str] = key(None, "folder of depth maps for RGB-D segmenters (segmenter.model: acnet): one 16-bit "
                                                "PNG per image, <id>.png, larger = farther, 0 = no reading; relative to data.root "
                                                "or absolute (`wsseg demo-data` writes Depth). null = no depth; models "
                                                "that take RGB alone never read it", neutral=None)


@dataclass(frozen=True)
class BackboneSection:
    depth: int = key(50, "ResNet depth of the CAM and IRN networks", choices=(18, 34, 50, 101))
    width: float = key(1.0, "channel width multiplier (1.0 = standard; smaller for CPU demos, no pretrained weights then)", positive=True)
    weights: typing.Optional[str] = key("imagenet", "null (random init) | imagenet (download) | path to a torchvision ResNet state dict")


@dataclass(frozen=True)
class CamSection:
    train_stages: tuple[str, ...] = key(("layer3", "layer4"), "backbone stages that learn (IRN: layer3, layer4; from a random init: all)")
    frozen_bn: bool = key(True, "BatchNorm uses running statistics in training (IRN); false from a random init")
    epochs: int = key(5, "training epochs", low=1)
    batch_size: int = key(16, "images per optimisation step (global, over all ranks)", low=1)
    lr: float = key(0.1, "learning rate of the backbone (poly decay, power 0.9)", positive=True)
    classifier_lr_mult: float = key(10.0, "classifier learning rate = lr x this (IRN: backbone 0.1, classifier 1.0)", positive=True)
    momentum: float = key(0.0, "SGD momentum (IRN's optimiser effectively had none)", low=0.0, high=0.999)
    weight_decay: float = key(1e-4, "SGD weight decay", low=0.0)
    resize_long: tuple[int, int] = key((320, 640), "random long-side range in pixels before cropping")
    crop: int = key(512, "training crop size in pixels", low=16)
    scales: tuple[float, ...] = key((1.0, 0.5, 1.5, 2.0), "make-cam inference scales (each with its flip)")
    eval_threshold: float = key(0.15, "background score when evaluating CAMs (IRN: 0.15); the reference level of relative mode", low=0.0, high=1.0)
    threshold_mode: str = key("fixed", "fixed: IRN's constants apply to the CAMs as they are; relative: to CAM^γ, where γ moves the CAMs' "
                              "Otsu level onto eval_threshold (no ground truth needed; see docs/models/calibration.md)", choices=("fixed", "relative"))
    sweep: tuple[float, ...] = key(tuple(round(0.05 * i, 2) for i in range(1, 20)),
                                   "background scores swept when evaluating CAMs (0.05-0.95: CAMs trained from scratch peak "
                                   "above IRN's 0.60 ceiling); the report says when the best lies at an end")
    pooling: str = key("gap", "how a class map becomes the class score in training: gap (global average, the CAM paper's "
                              "and IRN's), gmp (global max, Oquab et al. 2015), lse (log-sum-exp, Pinheiro & Collobert 2015: "
                              "between the two, pooling_r sets where)", choices=("gap", "gmp", "lse"), neutral="gap")
    pooling_r: float = key(5.0, "lse pooling's sharpness r: (1/r) log mean exp(r x); -> gap as r -> 0, -> gmp as r grows",
                           positive=True, neutral=5.0)
    dilations: tuple[int, ...] = key((), "multi-dilated CAM (Wei et al., CVPR 2018): 3x3 classification heads with these "
                                         "dilations beside the 1x1 one, e.g. [3, 6, 9]; the CAM adds their mean map. [] = IRN's head",
                                     low=1, neutral=())
    fickle_window: int = key(0, "FickleNet (Lee et al., CVPR 2019): classify each position from this k x k window of "
                                "features with random hidden units dropped (the paper: 9); 0 = IRN's 1x1 head", low=0, neutral=0)
    fickle_dropout: float = key(0.9, "FickleNet: share of a window's hidden units dropped, the centre never (paper: 0.9)",
                                low=0.0, high=0.99, neutral=0.9)
    fickle_samples: int = key(200, "FickleNet in make-cam: random selections whose maps' union is the CAM (paper: 200)", low=1)
    advcam: bool = key(False, "AdvCAM (Lee et al., CVPR 2021) in make-cam: CAMs accumulated over anti-adversarial steps "
                              "on the image; no retraining, ~advcam_steps forward+backward passes per scale and class", neutral=False)
    advcam_steps: int = key(27, "AdvCAM: manipulation steps per scale and class (the paper's VOC setting: 27)", low=1)
    advcam_step_size: float = key(0.08, "AdvCAM: step size on the normalised image gradient (paper: 0.08)", positive=True)
    advcam_mask_threshold: float = key(0.5, "AdvCAM: regions above this share of the map's max are kept from growing (paper: 0.5)",
                                       low=0.0, high=1.0)
    advcam_regularisation: float = key(7.0, "AdvCAM: weight of the masked L1 term that holds those regions (paper: 7)", low=0.0)
    context_decoupling: typing.Optional[str] = key(None, "CDA (Su et al., ICCV 2021): a folder of semantic label maps from an "
                                                         "earlier run (e.g. runs/demo/labels/semantic); objects cut out by them are "
                                                         "pasted onto training images that lack their class. null = off", neutral=None)
    context_decoupling_probability: float = key(0.5, "CDA: share of training images that get a pasted object (the released "
                                                     "code: half of each batch)", low=0.0, high=1.0, neutral=0.5)
    amn: bool = key(False, "AMN (Lee et al., CVPR 2022): train-amn learns a per-pixel classifier on the CAMs' confident "
                           "regions and make-amn-cam's maps replace the CAMs downstream (settings in the amn section)",
                    neutral=False)
    recam: bool = key(False, "ReCAM: extra epochs with a softmax loss on class-specific features")
    recam_epochs: int = key(4, "ReCAM epochs after the BCE training", low=1)
    recam_lr: float = key(0.0005, "ReCAM phase: lr of its new classifier; the backbone and BCE classifier get 0.1x (ReCAM's code)", positive=True)
    recam_loss_weight: float = key(0.7, "weight of ReCAM's softmax loss next to the BCE loss (ReCAM's scripts use 0.7-1.0)", low=0.0)


@dataclass(frozen=True)
class RelationsSection:
    conf_fg: float = key(0.30, "background score for the confident-foreground map (IRN: 0.30)", low=0.0, high=1.0)
    conf_bg: float = key(0.05, "background score for the confident-background map (IRN: 0.05)", low=0.0, high=1.0)
    crf_gt_prob: float = key(0.7, "DenseCRF unary certainty of the hard labels", low=0.0, high=1.0)
    crf_gaussian_sxy: float = key(3.0, "DenseCRF Gaussian kernel width in pixels", positive=True)
    crf_gaussian_compat: float = key(3.0, "DenseCRF Gaussian kernel weight", low=0.0)
    crf_bilateral_sxy: float = key(50.0, "DenseCRF bilateral kernel width in pixels", positive=True)
    crf_bilateral_srgb: float = key(5.0, "DenseCRF bilateral colour width", positive=True)
    crf_bilateral_compat: float = key(10.0, "DenseCRF bilateral kernel weight", low=0.0)
    crf_iterations: int = key(10, "mean-field iterations", low=1)
    crf_method: str = key("dense", CRF_METHOD_DOC, choices=("dense", "conv"), neutral="dense")
    crf_window: int = key(11, CRF_WINDOW_DOC, low=1, check=_check_odd, neutral=11)
    crf_blur: int = key(4, CRF_BLUR_DOC, low=1, neutral=4)


@dataclass(frozen=True)
class AmnSection:
    """AMN's network and recipe (gaviotas/AMN's run_sample.py and train_amn.py); used when cam.amn is true."""
    epochs: int = key(5, "training epochs (AMN: 5)", low=1)
    batch_size: int = key(16, "images per step (AMN: 16)", low=1)
    crop: int = key(512, "training crop size in pixels (AMN: 512)", low=16)
    scale_range: tuple[float, float] = key((0.5, 1.5), "random rescale range before cropping (AMN: 0.5-1.5)")
    lr: float = key(1e-4, "Adam learning rate of the new layers: label encoder and ASPP head (AMN: 1e-4, constant)",
                    positive=True)
    backbone_lr_mult: float = key(0.05, "backbone lr = lr x this (AMN: 5e-6, i.e. 0.05)", low=0.0)
    weight_decay: float = key(1e-4, "Adam weight decay (AMN: 1e-4)", low=0.0)
    label_smoothing: float = key(0.4, "eps: the target puts 1 - eps on the label's class and eps / C on each other "
                                      "(AMN: 0.4)", low=0.0, high=0.99)
    rates: tuple[int, ...] = key((6, 12, 18, 24), "dilations of the ASPP head's four 3x3 convs (AMN: 6, 12, 18, 24)", low=1)
    backbone_init: str = key("cam", "cam (the trained CAM network's backbone) | imagenet (AMN's) | path to a torchvision "
                                    "ResNet state dict")


@dataclass(frozen=True)
class IrnSection:
    backbone_init: str = key("cam", "cam (the trained CAM network) | imagenet | path to a torchvision ResNet state dict")
    train_backbone: bool = key(False, "train the backbone too (IRN: frozen, only the heads learn)")
    radius: int = key(10, "pair radius in stride-4 pixels for the affinity loss (152 directions)", low=2)
    crop: int = key(512, "training crop size in pixels", low=16)
    scale_range: tuple[float, float] = key((0.5, 1.5), "random rescale range before cropping")
    batch_size: int = key(32, "images per step (IRN's log: 16 with 5 epochs)", low=1)
    epochs: int = key(3, "training epochs", low=1)
    lr: float = key(0.1, "learning rate of the boundary head (poly 0.9)", positive=True)
    displacement_lr_mult: float = key(10.0, "displacement head lr = lr x this (IRN: 1.0)", positive=True)
    momentum: float = key(0.0, "SGD momentum (IRN: effectively none)", low=0.0, high=0.999)
    weight_decay: float = key(1e-4, "SGD weight decay", low=0.0)


@dataclass(frozen=True)
class LabelsSection:
    radius: int = key(5, "random-walk neighbourhood radius in stride-4 pixels (34 directions)", low=2)
    beta: float = key(10.0, "affinity exponent of the transition matrix", positive=True)
    walk_steps: int = key(256, "random-walk steps (IRN: 2^8, squaring the matrix 8 times)", low=1)
    cam_power: float = key(1.0, "CAM exponent before the walk (AdvCAM etc. use 1.3-1.5)", positive=True)
    sem_background: float = key(0.25, "background score for semantic labels after the walk (IRN: 0.25)", low=0.0, high=1.0)
    ins_background: float = key(0.25, "background score for instance labels after the walk", low=0.0, high=1.0)
    min_background: float = key(0.0, "at least this share of every image is background in the semantic labels: where "
                                     "the walk leaves less, the level rises to the walked scores' quantile at this share "
                                     "(the lowest-scoring pixels). 0 = off (IRN)", low=0.0, high=0.99, neutral=0.0)
    walk_background: bool = key(False, "compare each walked CAM with the background level walked the same way (a local "
                                       "average), instead of dividing the walked CAMs by their max (IRN)")
    displacement_steps: int = key(300, "steps following the displacement field to its centroid", low=1)
    centroid_threshold: float = key(2.5, "|displacement| below this (stride-4 px) is a centroid region", positive=True)
    min_instance_area: float = key(0.01, "instances under this fraction of the image get score 0", low=0.0, high=1.0)
    pad_to: int = key(512, "zero-pad images to this canvas before IRN inference (IRN's training crop)", low=0)


@dataclass(frozen=True)
class SegmenterSection:
    model: str = key("deeplab-v2", "segmenter architecture (see docs/models/)", check=_check_segmenter_model)
    labels: str = key("pseudo", "pseudo: synthesized labels; gt: the dataset's masks (fully supervised reference); both: train each, same recipe", choices=("pseudo", "gt", "both"))
    eval_mode: str = key("all", "evaluation: single (one scale), msflip (test_scales + flip), all (single, msflip and +CRF)", choices=("single", "msflip", "all"))
    window: int = key(0, "sliding-window size for inference in pixels (0: whole image)", low=0)
    depth: int = key(50, "ResNet depth (IRN's reference: DeepLab-v2 R50)", choices=(18, 34, 50, 101))
    width: float = key(1.0, "channel width multiplier", positive=True)
    weights: typing.Optional[str] = key("imagenet", "null | imagenet | path to a torchvision ResNet state dict")
    crop: int = key(321, "training crop size in pixels", low=16)
    batch_size: int = key(10, "images per step", low=1)
    iterations: int = key(20000, "optimisation steps", low=1)
    optimizer: str = key("sgd", "sgd (with momentum; the papers') | adamw (decoupled weight decay)", choices=("sgd", "adamw"), neutral="sgd")
    lr: float = key(2.5e-4, "backbone learning rate (poly 0.9); heads x head_lr_mult", positive=True)
    head_lr_mult: float = key(10.0, "head learning rate multiplier", positive=True)
    lr_by_model: typing.Mapping[str, typing.Mapping[str, typing.Any]] = key(
        FrozenMap(), "lr and/or head_lr_mult for one model where the shared ones do not suit it, by model name: "
                     "{refinenet: {head_lr_mult: 1.0}}; only the chosen model's entry is used", check=_check_lr_by_model,
        neutral=FrozenMap())
    warmup: int = key(0, "steps of linear learning-rate warmup before the poly schedule", low=0, neutral=0)
    momentum: float = key(0.9, "SGD momentum", low=0.0, high=0.999)
    weight_decay: float = key(5e-4, "weight decay (SGD: L2 in the gradient; AdamW: decoupled)", low=0.0)
    seed: typing.Optional[int] = key(None, "training seed of this stage (null: run.seed); vary it to measure run-to-run spread", neutral=None)
    val_every: int = key(0, "score val mIoU (single scale) every this many epochs and at the last, into the curves (0: off)", low=0)
    label_relaxation: int = key(0, "pseudo labels: boundary label relaxation (Zhu et al. 2019), the window radius in label "
                                   "pixels within which any label met counts as right; 0 = plain cross-entropy", low=0, neutral=0)
    gated_crf: float = key(0.0, "pseudo labels: weight of the gated CRF loss (Obukhov et al. 2019) on the main output; 0 = off",
                           low=0.0, neutral=0.0)
    ignore_band: float = key(0.0, "pseudo labels: pixels whose best class score lies within this of the background level "
                                  "(labels/margin) are ignored (255; void in a panoptic model's labels); 0 = off", low=0.0, high=1.0, neutral=0.0)
    teacher: typing.Optional[str] = key(None, "structured knowledge distillation (Liu et al. 2019): a segmenter trained earlier "
                                             "in this run to learn from, `<model>` (its copy trained on the same labels as "
                                             "the student) or `<model>/<pseudo|gt>`; null = off", neutral=None)
    distill_pixel: float = key(10.0, "with a teacher: weight of the pixel-wise distillation term (the authors' 10)", low=0.0)
    distill_pair: float = key(1.0, "with a teacher: weight of the pair-wise similarity distillation term (the authors' 1)",
                              low=0.0)
    distill_pool: float = key(0.5, "with a teacher: the pair-wise term's nodes are max-pooled windows of this share of "
                                   "the map's side (the authors' 0.5: 2 x 2 nodes)", positive=True, high=1.0)
    scale_range: tuple[float, float] = key((0.5, 1.5), "random rescale range before cropping")
    test_scales: tuple[float, ...] = key((0.5, 0.75, 1.0, 1.25, 1.5, 1.75), "multi-scale inference scales (with flip)")
    crf: bool = key(True, "DenseCRF post-processing in evaluation (the model's own CRF parameters)")
    crf_method: str = key("dense", CRF_METHOD_DOC, choices=("dense", "conv"), neutral="dense")
    crf_window: int = key(11, CRF_WINDOW_DOC, low=1, check=_check_odd, neutral=11)
    crf_blur: int = key(4, CRF_BLUR_DOC, low=1, neutral=4)
    sync_bn: bool = key(False, "SyncBatchNorm across processes under torchrun")
    options: typing.Mapping[str, typing.Mapping[str, typing.Any]] = key(FrozenMap(), MODEL_OPTIONS_DOC, check=_check_segmenter_options)


# Keys that moved: a config that still uses one gets a line saying where it went.
MOVED_KEYS = {
    "segmenter.aux": "segmenter.options.<model>.aux",
    "segmenter.num_slots": "segmenter.options.maxdeeplab.num_slots",
    "segmenter.memory_channels": "segmenter.options.maxdeeplab.memory_channels",
    "segmenter.pixel_dim": "segmenter.options.maxdeeplab.pixel_dim",
}


SECTIONS: dict[str, type] = {
    "run": RunSection,
    "data": DataSection,
    "backbone": BackboneSection,
    "cam": CamSection,
    "relations": RelationsSection,
    "amn": AmnSection,
    "irn": IrnSection,
    "labels": LabelsSection,
    "segmenter": SegmenterSection,
}


@dataclass(frozen=True)
class Config:
    run: RunSection = RunSection()
    data: DataSection = DataSection()
    backbone: BackboneSection = BackboneSection()
    cam: CamSection = CamSection()
    relations: RelationsSection = RelationsSection()
    amn: AmnSection = AmnSection()
    irn: IrnSection = IrnSection()
    labels: LabelsSection = LabelsSection()
    segmenter: SegmenterSection = SegmenterSection()
    sources: tuple[str, ...] = ()  # the files it was loaded from, for messages

    def get(self, dotted: str) -> Any:
        """`config.get("cam.scales")` or a whole section `config.get("cam")`."""
        value: Any = self
        for part in dotted.split("."):
            value = value.get(part) if isinstance(value, dict) else getattr(value, part)
        return value

    def to_dict(self) -> dict:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}


# ---------------------------------------------------------------------------- loading

def _closest(word: str, options) -> str:
    match = difflib.get_close_matches(word, list(options), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _describe(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return f"{_describe(inner[0])} or null"
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0])}"
        return f"a list of {len(args)} values ({', '.join(_describe(a) for a in args)})"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _coerce(value: Any, tp, where: str) -> Any:
    """Check `value` against the annotation `tp`; return it in canonical form (tuples, floats)."""
    bad = UserError(f"{where}: {value!r} is not {_describe(tp)}")
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        if value is None:
            return None
        inner = [a for a in typing.get_args(tp) if a is not type(None)][0]
        return _coerce(value, inner, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            if typing.get_args(tp)[-1] is Ellipsis and not isinstance(value, (dict, bool)) and value is not None:
                value = [value]  # a single value for a list key
            else:
                raise bad
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], where) for v in value)
        if len(value) != len(args):
            raise bad
        return tuple(_coerce(v, a, where) for v, a in zip(value, args))
    if origin in (dict, collections.abc.Mapping):
        if not isinstance(value, dict):
            raise UserError(f"{where}: {value!r} is not a mapping of names to values")
        key_type, value_type = typing.get_args(tp)
        return FrozenMap({_coerce(k, key_type, where): _coerce(v, value_type, f"{where}.{k}") for k, v in value.items()})
    if tp is typing.Any:
        return freeze(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise bad
        return str(value)
    raise TypeError(f"unsupported config type {tp}")


def coerce_value(value: Any, annotation: Any, where: str) -> Any:
    """`value` checked against a constructor's type annotation (int, float, bool, str, Optional,
    Sequence[...], tuple[...]); other annotations take the YAML value as it is (frozen)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        if value is None and type(None) in typing.get_args(annotation):
            return None
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return coerce_value(value, inner[0], where) if len(inner) == 1 else freeze(value)
    if origin is collections.abc.Sequence:
        (item,) = typing.get_args(annotation) or (typing.Any,)
        return _coerce(value, tuple[item, ...], where) if item in (bool, int, float, str) else freeze(value)
    if origin is tuple or annotation in (bool, int, float, str):
        return _coerce(value, annotation, where)
    return freeze(value)


def _check_range(value: Any, meta: dict, where: str) -> None:
    if meta["check"] is not None:
        meta["check"](value, where)
    values = value if isinstance(value, tuple) else (value,)
    for v in values:
        if v is None:
            continue
        if meta["choices"] is not None and v not in meta["choices"]:
            allowed = ", ".join(str(c) for c in meta["choices"])
            raise UserError(f"{where}: {v!r} is not allowed; use one of: {allowed}")
        if meta["positive"] and not v > 0:
            raise UserError(f"{where}: {v!r} must be greater than 0")
        if meta["low"] is not None and v < meta["low"]:
            raise UserError(f"{where}: {v!r} is below the minimum {meta['low']}")
        if meta["high"] is not None and v > meta["high"]:
            raise UserError(f"{where}: {v!r} is above the maximum {meta['high']}")


def _build_section(name: str, values: dict, origin: str) -> Any:
    cls = SECTIONS[name]
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in values.items():
        if f"{name}.{k}" in MOVED_KEYS:
            raise UserError(f"{origin}: '{name}.{k}' is now '{MOVED_KEYS[f'{name}.{k}']}' (a per-model option)")
        if k not in fields:
            raise UserError(f"{origin}: unknown key '{name}.{k}'{_closest(k, fields)}")
        where = f"{origin}: {name}.{k}"
        v = _coerce(v, hints[k], where)
        _check_range(v, fields[k].metadata, where)
        kwargs[k] = v
    return cls(**kwargs)


def _merge(base: dict, update: dict, origin: str) -> None:
    for section, values in update.items():
        if section not in SECTIONS:
            raise UserError(f"{origin}: unknown section '{section}'{_closest(section, SECTIONS)}; sections are {', '.join(SECTIONS)}")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise UserError(f"{origin}: section '{section}' must be a mapping of keys to values")
        for k, v in values.items():
            entries = base.setdefault(section, {})
            if _is_mapping_key(section, k) and isinstance(v, dict) and isinstance(entries.get(k, (None,))[0], dict):
                v = _deep_merge(entries[k][0], v)  # later files add to and override a mapping key by key
            entries[k] = (v, origin)


def _is_mapping_key(section: str, name: str) -> bool:
    hint = typing.get_type_hints(SECTIONS[section]).get(name)
    return typing.get_origin(hint) in (dict, collections.abc.Mapping)


def _deep_merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for k, v in update.items():
        merged[k] = _deep_merge(merged[k], v) if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    return merged


def parse_override(text: str) -> tuple[str, str, Any]:
    """`cam.scales=[1.0,0.5]` -> ("cam", "scales", [1.0, 0.5]); values are YAML. Inside a mapping
    key the path goes on: `segmenter.options.maxdeeplab.num_slots=64` -> ("segmenter", "options",
    {"maxdeeplab": {"num_slots": 64}})."""
    if "=" not in text:
        raise UserError(f"--set {text}: expected KEY=VALUE, e.g. --set cam.epochs=3")
    dotted, raw = text.split("=", 1)
    parts = dotted.strip().split(".")
    deeper = len(parts) > 2 and parts[0] in SECTIONS and _is_mapping_key(parts[0], parts[1])
    if len(parts) < 2 or not all(parts) or (len(parts) > 2 and not deeper):
        raise UserError(f"--set {text}: the key must be SECTION.KEY, e.g. cam.epochs")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    for part in reversed(parts[2:]):
        value = {part: value}
    return parts[0], parts[1], value


def load_config(paths: typing.Sequence[str | Path] = (), overrides: typing.Sequence[str] = ()) -> Config:
    """Load and validate: files in order (later wins), then `--set` overrides."""
    merged: dict[str, dict[str, tuple[Any, str]]] = {}
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            at = f" line {mark.line + 1}" if mark else ""
            raise UserError(f"{path}{at}: not valid YAML ({getattr(error, 'problem', error)})") from None
        if data is None:
            continue
        if not isinstance(data, dict):
            raise UserError(f"{path}: a config is a mapping of sections (run:, data:, cam:, ...)")
        _merge(merged, data, str(path))
    for text in overrides:
        section, name, value = parse_override(text)
        _merge(merged, {section: {name: value}}, f"--set {text}")
    return _build(merged, tuple(str(p) for p in paths))


def config_of_run(run_dir: str | Path) -> Config:
    """The config a run directory was made with: the one its most recently finished stage recorded
    (each stage.json keeps the whole config), checked like a config file."""
    from wsseg.store import read_json

    run_dir = Path(run_dir)
    records = [r for r in (read_json(p) for p in sorted(run_dir.glob("*/stage.json")) + sorted(run_dir.glob("*/*/stage.json")))
               if isinstance(r, dict) and isinstance(r.get("config"), dict)]
    if not records:
        raise UserError(f"{run_dir}: not a wsseg run directory (no stage.json with a config in it); "
                        f"give a run directory or a config file")
    latest = max(records, key=lambda r: (r.get("status") == "complete", r.get("finished") or r.get("started") or ""))
    merged: dict[str, dict[str, tuple[Any, str]]] = {}
    origin = f"{run_dir} (the config its {latest.get('stage', 'stage')} recorded)"
    recorded = {k: dict(v) for k, v in latest["config"].items() if k in SECTIONS and isinstance(v, dict)}
    recorded.setdefault("run", {})["dir"] = str(run_dir)  # where the run is now (it may have moved)
    _merge(merged, recorded, origin)
    return _build(merged, (origin,))


def _build(merged: dict[str, dict[str, tuple[Any, str]]], sources: tuple[str, ...]) -> Config:
    """A checked Config from merged (value, origin) entries per section."""
    sections = {}
    for name in SECTIONS:
        entries = merged.get(name, {})
        # validate key by key so that the message names the file the key came from
        values = {}
        for k, (v, origin) in entries.items():
            _build_section(name, {k: v}, origin)
            values[k] = v
        sections[name] = _build_section(name, values, "config")
    config = _resolve(Config(**sections, sources=sources))
    _check_consistency(config)
    return config


def _resolve(config: Config) -> Config:
    """data.classes: null becomes the format's own class list (the folder layout's: read from tags.csv)."""
    if config.data.classes is not None:
        return config
    if config.data.format == "folder":
        from wsseg.data.folder import classes_from_tags

        classes = classes_from_tags(config.data.root)
    elif config.data.format == "coco":
        from wsseg.data.coco import COCO_CLASSES

        classes = COCO_CLASSES
    else:
        classes = VOC_CLASSES
    return dataclasses.replace(config, data=dataclasses.replace(config.data, classes=tuple(classes)))


def apply_overlay(config: Config, path: str | Path) -> Config:
    """`config` with the keys of the YAML file at `path` on top (validated like --config)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise UserError(f"{path}: not valid YAML ({getattr(error, 'problem', error)})") from None
    merged: dict[str, dict[str, tuple[Any, str]]] = {}
    _merge(merged, data, str(path))
    sections = {}
    for name in SECTIONS:
        values = dataclasses.asdict(getattr(config, name))
        for k, (v, origin) in merged.get(name, {}).items():
            if _is_mapping_key(name, k) and isinstance(v, dict) and isinstance(values.get(k), dict):
                v = _deep_merge(values[k], v)
            _build_section(name, {k: v}, origin)
            values[k] = v
        sections[name] = _build_section(name, values, str(path))
    stacked = _resolve(Config(**sections, sources=(*config.sources, str(path))))
    _check_consistency(stacked)
    return stacked


def _check_consistency(config: Config) -> None:
    cam, irn = config.cam, config.irn
    low, high = cam.resize_long
    if low > high:
        raise UserError(f"cam.resize_long: {list(cam.resize_long)} must be [low, high] with low <= high")
    for name, (low, high) in (("irn.scale_range", irn.scale_range), ("segmenter.scale_range", config.segmenter.scale_range)):
        if not 0 < low <= high:
            raise UserError(f"{name}: [{low}, {high}] must satisfy 0 < low <= high")
    if not config.data.classes:
        raise UserError("data.classes: the class list is empty; list the foreground class names")
    if len(set(config.data.classes)) != len(config.data.classes):
        raise UserError("data.classes: a class name appears twice")
    if len(config.data.classes) > 254:
        raise UserError("data.classes: at most 254 foreground classes fit the uint8 label maps")
    if not set(cam.train_stages) <= {"stem", "layer1", "layer2", "layer3", "layer4"}:
        raise UserError(f"cam.train_stages: {list(cam.train_stages)}; stages are stem, layer1, layer2, layer3, layer4")
    if not cam.scales:
        raise UserError("cam.scales: give at least one scale, e.g. [1.0]")
    if sum((cam.recam, bool(cam.dilations), cam.fickle_window > 0)) > 1:
        raise UserError("cam.recam, cam.dilations and cam.fickle_window do not combine (each replaces or re-weights "
                        "the classification head); choose one")
    if cam.fickle_window and cam.fickle_window % 2 == 0:
        raise UserError(f"cam.fickle_window: {cam.fickle_window} must be odd (a window centred on its position)")
    if config.relations.conf_bg > config.relations.conf_fg:
        raise UserError(
            f"relations.conf_bg ({config.relations.conf_bg}) must not exceed relations.conf_fg "
            f"({config.relations.conf_fg}): the background map uses the lower score"
        )


def to_yaml(config: Config) -> str:
    """The resolved config as YAML (sections in order, keys as declared): what `wsseg config` prints."""
    def plain(value):
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    lines = []
    for section, values in config.to_dict().items():
        lines.append(f"{section}:")
        for name, value in values.items():
            text = yaml.safe_dump(plain(value), default_flow_style=True, width=10**6).strip()
            lines.append(f"  {name}: {text.removesuffix(chr(10) + '...').strip()}")
    return "\n".join(lines) + "\n"


def describe_keys() -> str:
    """All keys with defaults and meanings, for `wsseg config --keys` and the docs."""
    lines = []
    for name, cls in SECTIONS.items():
        lines.append(f"{name}:")
        for f in dataclasses.fields(cls):
            default = json.dumps(f.default) if not isinstance(f.default, tuple) else json.dumps(list(f.default))
            lines.append(f"  {f.name}: {default}  # {f.metadata['doc']}")
    return "\n".join(lines)
