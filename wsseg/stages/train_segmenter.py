"""train-segmenter: a fully supervised segmenter trained on the synthesized labels (docs/ALGORITHMS.md §2).

`segmenter.labels` picks the training masks: `pseudo` (labels/semantic from
synthesize-labels), `gt` (the dataset's own masks, the fully supervised reference) or
`both` (each, with the same recipe, so the pseudo/gt ratio is one command). Outputs go to
segmenter/<model>/<labels>/{model.pt, checkpoint.pt, metrics.json, predictions/}; several
models live side by side in one run directory. Validation: single scale, multi-scale +
flip, and + DenseCRF, on `data.val_list`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from wsseg.checkpoints import load_checkpoint, save_checkpoint
from wsseg.class_ids import IGNORE
from wsseg.config import Config
from wsseg.context import StageContext, resolve_device
from wsseg.data.datasets import LabelledImages
from wsseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD, SegmentationAugment
from wsseg.errors import UserError
from wsseg.metrics import ConfusionMatrix
from wsseg.models.backbones import ResNet, load_weights
from wsseg.models.segmenters import SEGMENTERS, build_segmenter
from wsseg.models.segmenters.common import upsample_to
from wsseg.models.segmenters.distillation import pair_distillation, pixel_distillation
from wsseg.models.segmenters.inference import dense_crf, predict_labels
from wsseg.ops.gated_crf import gated_crf_loss
from wsseg.stage import Stage, fmt
from wsseg.stages import artifacts
from wsseg.stages.panoptic import PseudoPanoptic, TruePanoptic, evaluate_panoptic, is_panoptic, targets_from_codes
from wsseg.stages.synthesize_labels import Paths as LabelPaths
from wsseg.store import RunStore, write_json
from wsseg.training import adamw, seed_everything, sgd, train


def label_sources(config: Config) -> tuple[str, ...]:
    """The label sources the stage trains on: `segmenter.labels`, where `both` on data without any
    ground-truth mask for data.segmenter_train_list (a new domain) is the pseudo labels alone."""
    if config.segmenter.labels != "both":
        return (config.segmenter.labels,)
    data = config.data
    if not _has_ground_truth(config, (data.format, str(Path(data.root).resolve()), data.segmenter_train_list, data.max_side)):
        return ("pseudo",)
    return ("pseudo", "gt")


_GROUND_TRUTH: dict[tuple, bool] = {}  # per dataset and list, for the life of the process (inspect asks per image)


def _has_ground_truth(config: Config, key: tuple) -> bool:
    if key not in _GROUND_TRUTH:
        dataset = artifacts.open_dataset(config)
        ids = artifacts.image_ids(config, "data.segmenter_train_list")
        _GROUND_TRUTH[key] = artifacts.has_any_ground_truth(dataset, ids)
        if not _GROUND_TRUTH[key]:
            artifacts.ids_with_ground_truth(dataset, ids)  # says it, once
    return _GROUND_TRUTH[key]


def folder_of(store: RunStore, config: Config, source: str) -> Path:
    return store.folder(f"segmenter/{config.segmenter.model}/{source}")


class PseudoLabels:
    """label_reader: synthesize-labels' label of an image (picklable for workers): the semantic label, or
    with `panoptic` the panoptic label as a code map (void 255). `ignore_band` > 0: pixels whose background
    margin (labels/margin) is below it become 255 in either."""

    def __init__(self, run_dir: str, ignore_band: float = 0.0, panoptic: bool = False):
        self.run_dir = run_dir
        self.ignore_band = ignore_band
        self.panoptic = panoptic

    def __call__(self, image_id: str) -> np.ndarray:
        paths = LabelPaths(RunStore(self.run_dir), image_id)
        if self.panoptic:
            labels = PseudoPanoptic(self.run_dir)(image_id)
        else:
            labels = artifacts.read_labels(paths.semantic)
            if labels is None:
                raise UserError(f"labels/semantic/{image_id}.png is missing or damaged; data.segmenter_train_list must be "
                                f"covered by data.label_list, and synthesize-labels must have run")
        if self.ignore_band > 0:
            margin = artifacts.read_labels(paths.margin)
            if margin is None or margin.shape != labels.shape:
                raise UserError(f"labels/margin/{image_id}.png is missing or damaged (segmenter.ignore_band needs it); "
                                f"rerun synthesize-labels")
            labels = np.where(margin < round(self.ignore_band * 255), IGNORE, labels).astype(labels.dtype)
        return labels


def build_network(config: Config, *, load_pretrained: bool = True) -> nn.Module:
    segmenter = config.segmenter
    model = build_segmenter(segmenter.model, len(config.data.classes) + 1, depth=segmenter.depth, width=segmenter.width,
                            options=segmenter.options.get(segmenter.model))
    if load_pretrained:
        if segmenter.weights is not None and not isinstance(model.backbone, ResNet):
            # A model with its own encoder (LEDNet): ResNet weights have nowhere to go.
            raise UserError(f"segmenter.weights: {segmenter.model} has its own encoder, not a ResNet, "
                            f"so ResNet weights ('{segmenter.weights}') cannot load into it; "
                            "set segmenter.weights: null (random init)")
        load_weights(model.backbone, segmenter.weights)
        if segmenter.weights is not None:  # a model with more ResNet branches starts them from these too (ACNet)
            getattr(model, "backbone_weights_loaded", lambda: None)()
    return model


def load_network(config: Config, store: RunStore, source: str) -> nn.Module:
    payload = load_checkpoint(folder_of(store, config, source) / "model.pt", f"the trained {config.segmenter.model}")
    model = build_network(config, load_pretrained=False)
    model.load_state_dict(payload["model"])
    return model.eval()


def training_seed(config: Config) -> int:
    return config.run.seed if config.segmenter.seed is None else config.segmenter.seed


def needs_depth(config: Config, model: str | None = None) -> bool:
    """Whether the chosen model (or `model`) takes RGB-D input (`input_channels` 4: ACNet)."""
    return getattr(SEGMENTERS[model or config.segmenter.model], "input_channels", 3) == 4


def check_depth(config: Config, model: str | None = None) -> None:
    """One line when an RGB-D model is chosen (as the model, or `model`: the teacher) without depth maps
    to read (before any training)."""
    if not needs_depth(config, model):
        return
    model, depth_dir = model or config.segmenter.model, config.data.depth_dir
    if depth_dir is None:
        raise UserError(f"segmenter.model: {model} needs depth images; set data.depth_dir to the folder of 16-bit "
                        f"<id>.png depth maps (relative to data.root or absolute; `wsseg demo-data` writes Depth), "
                        f"or choose an RGB model")
    folder = artifacts.open_dataset(config).depth_dir
    if not folder.is_dir():
        raise UserError(f"segmenter.model: {model} needs depth images; set data.depth_dir: {folder} is not a folder "
                        f"(give the folder of 16-bit <id>.png depth maps, relative to data.root or absolute)")


def depth_reads(config: Config) -> tuple[str, ...]:
    """data.depth_dir for an RGB-D model only: an RGB model never reads it, and its fingerprint stays as it was."""
    return ("data.depth_dir",) if needs_depth(config) else ()


def image_depth(config: Config, dataset, image_id: str) -> np.ndarray | None:
    """The image's depth map for an RGB-D model, None for an RGB one."""
    return dataset.read_depth(image_id) if needs_depth(config) else None


DISTILL_KEYS = ("distill_pixel", "distill_pair", "distill_pool")


def teacher_of(config: Config) -> tuple[str, str | None] | None:
    """segmenter.teacher as (model, label source or None = the student's own), checked: one line when
    it names no model, a bad source, the student itself or a panoptic model; None when off."""
    value = config.segmenter.teacher
    if value is None:
        return None
    model, _, source = value.partition("/")
    if model not in SEGMENTERS:
        raise UserError(f"segmenter.teacher: unknown model '{model}'; give <model> or <model>/<pseudo|gt> with a model "
                        f"of {', '.join(SEGMENTERS)}")
    if source and source not in ("pseudo", "gt"):
        raise UserError(f"segmenter.teacher: '{value}' names label source '{source}'; give <model>/pseudo or <model>/gt, "
                        f"or <model> alone for the student's own labels")
    if model == config.segmenter.model:
        raise UserError(f"segmenter.teacher: {model} is the student itself, whose training would overwrite it; train the "
                        f"teacher as another model")
    if is_panoptic(SEGMENTERS[model]) or is_panoptic(SEGMENTERS[config.segmenter.model]):
        raise UserError(f"segmenter.teacher: distillation is for semantic segmenters, and "
                        f"{model if is_panoptic(SEGMENTERS[model]) else config.segmenter.model} is panoptic; "
                        f"set segmenter.teacher: null")
    return model, source or None


def teacher_file(config: Config, store: RunStore, source: str) -> Path:
    model, fixed = teacher_of(config)
    return store.folder(f"segmenter/{model}/{fixed or source}") / "model.pt"


def check_teacher(config: Config, store: RunStore) -> None:
    """One line, before any training, when the teacher of a label source the stage trains on is missing."""
    teacher = teacher_of(config)
    if teacher is None:
        return
    check_depth(config, teacher[0])
    for source in label_sources(config):
        path = teacher_file(config, store, source)
        if not path.is_file():
            labels = teacher[1] or source
            raise UserError(f"segmenter.teacher: no {teacher[0]} trained on {labels} labels in {config.run.dir} ({path} "
                            f"is missing); train it first: wsseg train-segmenter --set segmenter.model={teacher[0]} "
                            f"--set segmenter.labels={labels}")


def load_teacher(config: Config, store: RunStore, source: str) -> nn.Module:
    """The frozen teacher of `source`'s student, in eval mode, built as it was trained (model.pt's "build";
    files written before it was recorded: the config's segmenter.depth / width / options)."""
    model, _ = teacher_of(config)
    path = teacher_file(config, store, source)
    payload = load_checkpoint(path, f"the teacher {model}")
    build = payload.get("build") or {"depth": config.segmenter.depth, "width": config.segmenter.width,
                                     "options": config.segmenter.options.get(model)}
    teacher = build_segmenter(model, len(config.data.classes) + 1, depth=build["depth"], width=build["width"],
                              options=build["options"])
    try:
        teacher.load_state_dict(payload["model"])
    except RuntimeError:
        raise UserError(f"segmenter.teacher: {path} is not a {model} with {len(config.data.classes) + 1} classes at depth "
                        f"{build['depth']}, width {build['width']}; retrain the teacher in this run") from None
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    return teacher.eval()


def teacher_reads(config: Config) -> tuple[str, ...]:
    """The distillation weights, left out of the fingerprint when there is no teacher."""
    return () if config.segmenter.teacher is not None else tuple(f"-segmenter.{key}" for key in DISTILL_KEYS)


def build_record(config: Config) -> dict:
    """How model.pt's network was built, kept in the file: a later run that loads it as a teacher builds
    the same network whatever its own segmenter.depth / width say."""
    options = config.segmenter.options.get(config.segmenter.model)
    return {"depth": config.segmenter.depth, "width": config.segmenter.width,
            "options": json.loads(json.dumps(options)) if options is not None else None}


def learning_rates(config: Config) -> tuple[float, float]:
    """(backbone lr, head lr) of the chosen model: segmenter.lr and lr·head_lr_mult, each replaced
    by the model's own entry in segmenter.lr_by_model where it has one."""
    segmenter = config.segmenter
    own = segmenter.lr_by_model.get(segmenter.model, {})
    lr = float(own.get("lr", segmenter.lr))
    return lr, lr * float(own.get("head_lr_mult", segmenter.head_lr_mult))


def own_lr_selector(config: Config) -> tuple[str, ...]:
    """The chosen model's segmenter.lr_by_model entry, when it has one (none: nothing, so runs
    made before the key existed keep their fingerprint)."""
    model = config.segmenter.model
    return (f"segmenter.lr_by_model.{model}",) if model in config.segmenter.lr_by_model else ()


def unused_noisy_label_keys(config: Config) -> tuple[str, ...]:
    """The per-pixel pseudo-label options, left out of the fingerprint of a model they do not apply to (panoptic)."""
    if not is_panoptic(SEGMENTERS[config.segmenter.model]):
        return ()
    return tuple(f"-segmenter.{key}" for key in PER_PIXEL_KEYS)


def make_optimizer(config: Config, model: nn.Module) -> torch.optim.Optimizer:
    """`segmenter.optimizer` over the model's (backbone, heads) groups at `learning_rates`."""
    segmenter = config.segmenter
    backbone_params, head_params = model.param_groups()
    backbone_lr, head_lr = learning_rates(config)
    groups = [(backbone_params, backbone_lr), (head_params, head_lr)]
    if segmenter.optimizer == "adamw":
        return adamw(groups, weight_decay=segmenter.weight_decay)
    return sgd(groups, momentum=segmenter.momentum, weight_decay=segmenter.weight_decay)


def validation_miou(config: Config, model: nn.Module, device: torch.device) -> float:
    """Single-scale val mIoU of `model` (switched to eval mode) against the val list's masks."""
    dataset = artifacts.open_dataset(config)
    ids = artifacts.ids_with_ground_truth(dataset, artifacts.image_ids(config, "data.val_list"))
    matrix = ConfusionMatrix(len(config.data.classes) + 1)
    model.eval()
    for image_id in ids:
        labels, _ = predict_labels(model, dataset.read_image(image_id), device=device, mode="single", scales=(1.0,),
                                   window=config.segmenter.window or None, depth=image_depth(config, dataset, image_id))
        matrix.update(labels, dataset.read_semantic(image_id))
    return matrix.summary()["miou"]


# The gated CRF term is computed on the prediction at half the crop's size (σ_xy scaled to match).
GATED_CRF_SCALE = 0.5


def gated_crf_term(logits: torch.Tensor, images: torch.Tensor, corner_aligned: bool = False) -> torch.Tensor:
    """The gated CRF loss of the main logits (B, K, h, w) on the normalised crops (B, 3, H, W),
    at GATED_CRF_SCALE of the crop; gated to the image proper. The crop's padding is exactly 0
    in every channel after normalisation, which no real pixel is (the ImageNet mean x 255 is not
    an integer in any channel). corner_aligned: how the model's logits are read back (`Segmenter.corner_aligned`)."""
    size = (max(1, round(images.shape[-2] * GATED_CRF_SCALE)), max(1, round(images.shape[-1] * GATED_CRF_SCALE)))
    probs = torch.softmax(upsample_to(logits.float(), size, corner_aligned), dim=1)
    mean = torch.as_tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.as_tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    rgb = nn.functional.interpolate(images.float() * std + mean, size=size, mode="bilinear", align_corners=False)
    padding = (images == 0).all(dim=1, keepdim=True).float()
    gate = nn.functional.interpolate(padding, size=size, mode="bilinear", align_corners=False)[:, 0] == 0
    return gated_crf_loss(probs, rgb, gate, xy_scale=GATED_CRF_SCALE)


# The options for partly wrong (pseudo) labels that act on per-pixel class scores: the semantic segmenters
# only (segmenter.ignore_band, which voids label pixels, applies to every model).
PER_PIXEL_KEYS = ("label_relaxation", "gated_crf")


def _unwrap(net: nn.Module) -> nn.Module:
    return net.module if isinstance(net, nn.parallel.DistributedDataParallel) else net


def train_one(ctx: StageContext, source: str) -> dict:
    config, segmenter = ctx.config, ctx.config.segmenter
    dataset = artifacts.open_dataset(config)
    ids = artifacts.image_ids(config, "data.segmenter_train_list")
    model = build_network(config)
    panoptic = is_panoptic(model)
    if source == "gt":
        ids = [i for i in ids if (dataset.has_instances(i) if panoptic else dataset.has_semantic(i))]
        if not ids:
            raise UserError(f"segmenter.labels: gt needs ground-truth {'instance ' if panoptic else ''}masks for "
                            f"data.segmenter_train_list; none were found")
        reader = TruePanoptic(dataset) if panoptic else dataset.read_semantic
    else:
        reader = PseudoLabels(str(ctx.store.root), segmenter.ignore_band, panoptic)
    # The options for partly wrong labels: on pseudo labels only (the ground-truth run is the plain reference).
    # The ignore band voids pixels of either kind of label; relaxation and the gated CRF loss act on per-pixel
    # class scores, which a panoptic model's segment targets are not.
    pseudo = source == "pseudo"
    noisy = pseudo and not panoptic
    if pseudo and panoptic and any(getattr(segmenter, key) for key in PER_PIXEL_KEYS):
        ctx.log.info("%s trains on panoptic labels: segmenter.%s do not apply to it", segmenter.model,
                     " / ".join(PER_PIXEL_KEYS))
    seed = training_seed(config)
    teacher = load_teacher(config, ctx.store, source).to(ctx.device) if segmenter.teacher is not None else None
    teacher_depth = teacher is not None and teacher.input_channels == 4
    images = LabelledImages(dataset, ids, reader, SegmentationAugment(scale_range=segmenter.scale_range, crop_size=segmenter.crop),
                            seed=seed, depth=needs_depth(config) or teacher_depth)
    channels = model.input_channels  # an RGB student of an RGB-D teacher sees the crops' first three
    per_process = segmenter.batch_size // ctx.dist.world_size
    if per_process < 2 and not (segmenter.sync_bn and ctx.dist.enabled):
        raise UserError(f"segmenter.batch_size: {segmenter.batch_size} gives {per_process} image per process; BatchNorm "
                        f"needs at least 2 (or segmenter.sync_bn: true under torchrun)")
    # The recipe counts optimisation steps; the loop counts epochs (checkpoints are per epoch).
    steps_per_epoch = len(images) // segmenter.batch_size
    epochs = max(1, math.ceil(segmenter.iterations * segmenter.batch_size / len(images)))
    if not panoptic:  # the model's look at its training labels (DUpsampling fits W to them; a no-op for most)
        model.fit_to_labels(torch.from_numpy(np.asarray(reader(i), dtype=np.int64)) for i in ids)
    model.begin_training(steps_per_epoch=steps_per_epoch, max_steps=epochs * steps_per_epoch)
    model.label_relaxation = segmenter.label_relaxation if noisy else 0
    crf_weight = segmenter.gated_crf if noisy else 0.0
    if segmenter.sync_bn and ctx.dist.enabled:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = make_optimizer(config, model)

    def loss_fn(net, batch):
        outputs = net(batch["image"][:, :channels])
        batch["_outputs"] = outputs
        targets = targets_from_codes(batch["label"]) if panoptic else batch["label"]
        terms = _unwrap(net).loss(outputs, targets)
        if crf_weight > 0:
            terms["gated_crf"] = gated_crf_term(outputs["out"], batch["image"][:, :3],  # RGB (an RGB-D crop has depth 4th)
                                                getattr(_unwrap(net), "corner_aligned", False))
            terms["total"] = terms["total"] + crf_weight * terms["gated_crf"]
        if teacher is not None:
            with torch.no_grad():
                taught = teacher(batch["image"][:, :teacher.input_channels])["out"]
            total = terms.pop("total")
            terms["distill_pixel"] = pixel_distillation(outputs["out"], taught)
            terms["distill_pair"] = pair_distillation(outputs["out"], taught, segmenter.distill_pool)
            terms["total"] = total + segmenter.distill_pixel * terms["distill_pixel"] + segmenter.distill_pair * terms["distill_pair"]
        return terms

    # The model's per-step hook (MCIBI's memory update, dilated-context's stage switch; a no-op for most).
    def after_step(net, batch, step, max_steps):
        with torch.no_grad():
            _unwrap(net).after_step(batch["_outputs"], batch["label"], step, max_steps)

    # The val curve: single-scale val mIoU every `val_every` epochs and at the last (main process only).
    def after_epoch(net, epoch):
        if not (segmenter.val_every and ctx.dist.is_main and (epoch % segmenter.val_every == 0 or epoch == epochs)):
            return {}
        return {"val_epoch": epoch, "val_miou": validation_miou(config, _unwrap(net), ctx.device)}

    folder = folder_of(ctx.store, config, source)
    folder.mkdir(parents=True, exist_ok=True)
    result = train(ctx, model=model, optimizer=optimizer, dataset=images, batch_size=segmenter.batch_size, epochs=epochs,
                   loss_fn=loss_fn, checkpoint=folder / "checkpoint.pt", seed=seed, after_step=after_step,
                   phase=f"{segmenter.model} on {source} labels", warmup_steps=segmenter.warmup, after_epoch=after_epoch)
    model = model.cpu().eval()
    if ctx.dist.is_main:
        save_checkpoint(folder / "model.pt", {"model": model.state_dict(), "model_name": segmenter.model,
                                              "build": build_record(config)})
    applied = {"label_relaxation": model.label_relaxation, "gated_crf": crf_weight,
               "ignore_band": segmenter.ignore_band if pseudo else 0.0}
    taught_by = None if teacher is None else {"model": teacher_of(config)[0], "labels": teacher_of(config)[1] or source,
                                              "pixel": segmenter.distill_pixel, "pair": segmenter.distill_pair}
    return {"curves": result.curves, "train_images": len(ids), "epochs": epochs, "steps": result.steps,
            "noisy_label_options": applied, "teacher": taught_by,
            "images_per_second": round(result.images_per_second, 2)}


def run(ctx: StageContext) -> dict:
    config = ctx.config
    check_depth(config)
    check_teacher(config, ctx.store)
    seed_everything(training_seed(config))
    metrics: dict = {"model": config.segmenter.model}
    curves: dict = {}
    for source in label_sources(config):
        trained = train_one(ctx, source)
        curves[source] = trained.pop("curves")
        metrics[source] = trained
    ctx.dist.barrier()
    if ctx.dist.is_main:
        evaluation = evaluate(config, ctx.store, ctx.progress, device=ctx.device)
        for source, values in evaluation.items():
            metrics.setdefault(source, {}).update(values)
        metrics.update(headline(metrics))
    return {"metrics": metrics, "curves": curves}


def headline(metrics: dict) -> dict:
    """The numbers `status` and README's table show: best-mode val mIoU per label source and their ratio."""
    out = {}
    for source in ("pseudo", "gt"):
        values = metrics.get(source, {})
        modes = [values.get(f"miou_{mode}") for mode in ("single", "msflip", "crf")]
        best = max((v for v in modes if v is not None), default=None)  # the best evaluation mode
        if best is not None:
            out[f"miou_{source}"] = best
    if "miou_pseudo" in out:
        out["miou"] = out["miou_pseudo"]
    elif "miou_gt" in out:
        out["miou"] = out["miou_gt"]
    if out.get("miou_pseudo") and out.get("miou_gt"):
        out["pseudo_to_gt"] = round(out["miou_pseudo"] / out["miou_gt"], 4)
    for source in ("pseudo", "gt"):
        if metrics.get(source, {}).get("pq") is not None:
            out[f"pq_{source}"] = metrics[source]["pq"]
    return out


def evaluate(config: Config, store: RunStore, progress=None, device: torch.device | None = None) -> dict:
    """Val mIoU of every trained label source: single scale, ms+flip, ms+flip+CRF (per `segmenter.eval_mode`)."""
    device = device or resolve_device(config.run.device)
    check_depth(config)
    dataset = artifacts.open_dataset(config)
    ids = artifacts.ids_with_ground_truth(dataset, artifacts.image_ids(config, "data.val_list"))
    names = ["background", *config.data.classes]
    results = {}
    for source in label_sources(config):
        if not (folder_of(store, config, source) / "model.pt").exists():
            continue
        model = load_network(config, store, source).to(device)
        modes = {"single": ["single"], "msflip": ["msflip"], "all": ["single", "msflip"]}[config.segmenter.eval_mode]
        matrices = {mode: ConfusionMatrix(len(names)) for mode in modes}
        use_crf = config.segmenter.crf and config.segmenter.eval_mode == "all"
        if use_crf:
            matrices["crf"] = ConfusionMatrix(len(names))
        crf_params = {**(getattr(model, "crf_defaults", None) or {}), "method": config.segmenter.crf_method,
                      "window": config.segmenter.crf_window, "blur": config.segmenter.crf_blur}
        predictions = folder_of(store, config, source) / "predictions"
        for image_id in (progress(ids, desc=f"evaluating {config.segmenter.model} ({source})") if progress else ids):
            image, truth = dataset.read_image(image_id), dataset.read_semantic(image_id)
            depth = image_depth(config, dataset, image_id)
            best = None
            for mode in modes:
                labels, probs = predict_labels(model, image, device=device, mode=mode, scales=config.segmenter.test_scales,
                                               window=config.segmenter.window or None, depth=depth)
                matrices[mode].update(labels, truth)
                best = (labels, probs)
            if use_crf:
                refined = dense_crf(image, best[1], **crf_params).argmax(axis=0).astype(np.uint8)
                matrices["crf"].update(refined, truth)
                best = (refined, None)
            artifacts.write_labels(predictions / f"{image_id}.png", best[0])
        values = {"val_images": len(ids)}
        for mode, matrix in matrices.items():
            summary = matrix.summary(names)
            values[f"miou_{mode}"] = summary["miou"]
            if mode == list(matrices)[-1]:
                values["per_class_iou"] = summary["per_class_iou"]
                values["pixel_accuracy"] = summary["pixel_accuracy"]
                values["mean_class_accuracy"] = summary["mean_class_accuracy"]
        if is_panoptic(model):
            values.update(evaluate_panoptic(model, dataset, ids, device, len(names), names, progress,
                                            out=folder_of(store, config, source) / "panoptic"))
        write_json(folder_of(store, config, source) / "metrics.json", values)
        results[source] = values
    return results


def inspect_tiles(view) -> list[np.ndarray]:
    tiles = []
    for source in label_sources(view.config):
        path = folder_of(view.store, view.config, source) / "predictions" / f"{view.id}.png"
        labels = artifacts.read_labels(path)
        if labels is not None:
            tiles.append(view.labels_tile(f"{view.config.segmenter.model} ({source} labels)", labels))
        panoptic = artifacts.read_panoptic(folder_of(view.store, view.config, source) / "panoptic", view.id)
        if panoptic is not None:
            tiles.append(view.segments_tile(f"{view.config.segmenter.model} panoptic ({source})", *panoptic))
    return tiles


def quality(m: dict) -> str:
    return (f"{m.get('model', '?')} val mIoU: pseudo {fmt(m.get('miou_pseudo'))}, gt {fmt(m.get('miou_gt'))}, "
            f"ratio {fmt(m.get('pseudo_to_gt'))}")


STAGE = Stage(
    name="train-segmenter",
    help="Train a fully supervised segmenter on the synthesized labels.",
    run=run,
    # one folder per model: several models live side by side in one run directory
    outputs=lambda config: (f"segmenter/{config.segmenter.model}",),
    needs=("synthesize-labels",),
    uses=lambda config, need: config.segmenter.labels != "gt",  # ground truth alone needs no pseudo labels
    # the chosen model's options only: another model's options do not change this one
    reads=lambda config: ("run.seed", "data.root", "data.classes", "data.segmenter_train_list", "data.val_list",
                          "segmenter", "-segmenter.test_scales", "-segmenter.crf", "-segmenter.crf_method",
                          "-segmenter.crf_window", "-segmenter.crf_blur", "-segmenter.eval_mode",
                          "-segmenter.window", "-segmenter.sync_bn", "-segmenter.val_every", "-segmenter.options",
                          f"segmenter.options.{config.segmenter.model}", "-segmenter.lr_by_model",
                          *own_lr_selector(config), *unused_noisy_label_keys(config), *depth_reads(config),
                          *teacher_reads(config)),
    headline="miou",
    quality=quality,
    evaluators={"segmenter": evaluate},
    inspect_tiles=inspect_tiles,
)
