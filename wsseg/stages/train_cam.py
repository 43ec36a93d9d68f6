"""train-cam: the classification network whose CAMs seed everything (IRN, docs/ALGORITHMS.md §1.1).

Writes cam/model.pt (weights + the architecture facts needed to rebuild it) and
cam/checkpoint.pt (resumable after every epoch). The record keeps the loss curves and
the classification mAP on the training and validation lists.
"""

from __future__ import annotations

import numpy as np
import torch

from wsseg.config import Config
from wsseg.context import StageContext
from wsseg.data.datasets import TaggedImages
from wsseg.data.objects import ObjectBank
from wsseg.data.transforms import ClassificationAugment, normalize
from wsseg.metrics import classification_average_precision
from wsseg.models.backbones import ResNet, load_weights
from wsseg.models.cam import CAMNet, cam_loss, recam_loss
from wsseg.checkpoints import load_checkpoint, save_checkpoint
from wsseg.stages.artifacts import image_ids, open_dataset
from wsseg.stage import Stage, fmt
from wsseg.store import RunStore
from wsseg.training import seed_everything, sgd, train

# IRN's CAM network: output stride 16 without dilation (layer4 keeps stride 1).
CAM_STRIDES = (1, 2, 2, 1)
MAX_EVAL_IMAGES = 1000  # classification mAP is a sanity check; a sample of this size is plenty


def build_network(config: Config, *, load_pretrained: bool = True) -> CAMNet:
    """The CAM network the config describes (ImageNet/file weights loaded when asked)."""
    backbone = ResNet(config.backbone.depth, width=config.backbone.width, strides=CAM_STRIDES,
                      frozen_bn=config.cam.frozen_bn, trainable=config.cam.train_stages)
    if load_pretrained:
        load_weights(backbone, config.backbone.weights)
    return CAMNet(backbone, len(config.data.classes), recam=config.cam.recam, dilations=config.cam.dilations,
                  fickle_window=config.cam.fickle_window, fickle_dropout=config.cam.fickle_dropout,
                  pooling=config.cam.pooling, pooling_r=config.cam.pooling_r)


def load_network(config: Config, store: RunStore) -> CAMNet:
    """The trained CAM network from cam/model.pt, in eval mode on the CPU."""
    payload = load_checkpoint(store.folder("cam") / "model.pt", "the trained CAM network")
    model = build_network(config, load_pretrained=False)
    model.load_state_dict(payload["model"])
    return model.eval()


def run(ctx: StageContext) -> dict:
    config, cam = ctx.config, ctx.config.cam
    seed_everything(config.run.seed)
    dataset = open_dataset(config)
    ids = image_ids(config, "data.train_list")
    objects = None
    if cam.context_decoupling:
        objects = ObjectBank.from_labels(dataset, ids, cam.context_decoupling)
        ctx.log.info("train-cam: context decoupling with %d objects cut out of %s", sum(objects.counts()),
                     cam.context_decoupling)
    images = TaggedImages(dataset, ids, ClassificationAugment(resize_long=cam.resize_long, crop_size=cam.crop),
                          seed=config.run.seed, objects=objects, object_probability=cam.context_decoupling_probability)
    model = build_network(config)
    folder = ctx.folder("cam")

    backbone_params, head_params = model.param_groups()
    recam_params = [model.recam_classifier.weight] if cam.recam else []
    classifier_params = [p for p in head_params if all(p is not q for q in recam_params)]
    for p in recam_params:  # unused in the BCE phase (and DDP refuses parameters that get no gradient)
        p.requires_grad_(False)
    optimizer = sgd([(backbone_params, cam.lr), (classifier_params, cam.lr * cam.classifier_lr_mult)],
                    momentum=cam.momentum, weight_decay=cam.weight_decay)

    def bce(net, batch):
        # every classification head has its own loss (one head unless cam.dilations adds more)
        loss = cam_loss(net(batch["image"], branches=bool(cam.dilations)), batch["tags"])
        return {"total": loss}

    result = train(ctx, model=model, optimizer=optimizer, dataset=images, batch_size=cam.batch_size, epochs=cam.epochs,
                   loss_fn=bce, checkpoint=folder / "checkpoint.pt", seed=config.run.seed)
    curves = {f"bce_{k}" if k == "total" else k: v for k, v in result.curves.items()}

    if cam.recam:
        # ReCAM (CVPR 2022): more epochs adding a softmax CE on class-specific features. As in
        # its code, the backbone and the BCE classifier get a tenth of recam_lr, the new classifier all of it.
        for p in recam_params:
            p.requires_grad_(True)
        optimizer = sgd([(backbone_params + classifier_params, 0.1 * cam.recam_lr), (recam_params, cam.recam_lr)],
                        momentum=cam.momentum, weight_decay=cam.weight_decay)

        def bce_and_recam(net, batch):
            logits, recam_logits = net(batch["image"], with_recam=True)
            bce_term = cam_loss(logits, batch["tags"])
            recam_term = recam_loss(recam_logits, batch["tags"])
            return {"total": bce_term + cam.recam_loss_weight * recam_term, "bce": bce_term, "recam": recam_term}

        recam_result = train(ctx, model=model, optimizer=optimizer, dataset=images, batch_size=cam.batch_size,
                             epochs=cam.recam_epochs, loss_fn=bce_and_recam, checkpoint=folder / "checkpoint_recam.pt",
                             seed=config.run.seed + 1, phase="recam")
        curves.update({f"recam_{k}": v for k, v in recam_result.curves.items()})

    model = model.cpu().eval()
    metrics: dict = {"train_images": len(ids), "images_per_second": round(result.images_per_second, 2)}
    if objects is not None:
        metrics["context_decoupling_objects"] = dict(zip(config.data.classes, objects.counts()))
    if ctx.dist.is_main:
        save_checkpoint(folder / "model.pt", {"model": model.state_dict(), "classes": list(config.data.classes),
                                         "recam": cam.recam, "depth": config.backbone.depth, "width": config.backbone.width})
        model.to(ctx.device)
        train_sample = ids[:: max(1, len(ids) // MAX_EVAL_IMAGES)][:MAX_EVAL_IMAGES]
        metrics["train_map"] = classification_map(model, dataset, train_sample, ctx)
        val_ids = image_ids(config, "data.val_list")
        metrics["val_map"] = classification_map(model, dataset, val_ids[:MAX_EVAL_IMAGES], ctx)
        ctx.log.info("train-cam: classification mAP train %.3f, val %.3f", metrics["train_map"] or 0, metrics["val_map"] or 0)
    return {"metrics": metrics, "curves": curves}


@torch.inference_mode()
def classification_map(model: CAMNet, dataset, ids: list[str], ctx: StageContext) -> float | None:
    """mAP over classes of the image-level scores on whole images (no augmentation)."""
    model.eval()
    scores, targets = [], []
    for image_id in ctx.progress(ids, desc="train-cam: classification mAP"):
        image = torch.from_numpy(normalize(dataset.read_image(image_id))).permute(2, 0, 1)[None].to(ctx.device)
        scores.append(model(image)[0].float().cpu().numpy())
        target = np.zeros(dataset.num_classes, dtype=np.float32)
        target[dataset.tags(image_id)] = 1
        targets.append(target)
    if not scores:
        return None
    value = classification_average_precision(np.stack(scores), np.stack(targets))["map"]
    return None if value is None else round(value, 4)


def quality(metrics: dict) -> str:
    return f"classification mAP train {fmt(metrics.get('train_map'))}, val {fmt(metrics.get('val_map'))}"


STAGE = Stage(
    name="train-cam",
    help="Train the classification network whose CAMs seed everything.",
    run=run,
    outputs=("cam",),
    reads=("run.seed", "data.root", "data.classes", "data.train_list", "data.cls_labels", "backbone", "cam",
           "-cam.scales", "-cam.eval_threshold", "-cam.sweep", "-cam.threshold_mode", "-cam.fickle_samples", "-cam.advcam",
           "-cam.advcam_steps",
           "-cam.advcam_step_size", "-cam.advcam_mask_threshold", "-cam.advcam_regularisation", "-cam.amn"),
    headline="val_map",
    quality=quality,
)
