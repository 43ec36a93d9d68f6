"""train-amn (on with cam.amn): AMN's per-pixel classifier, learned from the CAMs' confident regions.

AMN (Lee, Kim, Shim, CVPR 2022; wsseg/models/amn.py) first turns make-cam's CAMs into
IRN's relation maps (mine-relations' rule and settings, into amn/ir_labels/, for the images
of data.label_list and data.eval_list), then trains AMNet on the training images with them:
random rescale, flip and crop, Adam with constant learning rates, the balanced
label-smoothed cross-entropy. amn/model.pt holds the whole network. make-amn-cam then writes
its maps, which replace the CAMs for mine-relations and everything after.
"""

from __future__ import annotations

import functools

from wsseg.checkpoints import load_trained, save_checkpoint
from wsseg.config import Config
from wsseg.context import StageContext
from wsseg.data.datasets import LabelledImages
from wsseg.data.transforms import SegmentationAugment
from wsseg.errors import UserError
from wsseg.models.amn import AMNet, amn_loss
from wsseg.models.backbones import ResNet, load_weights
from wsseg.stage import Stage, fmt
from wsseg.stages import artifacts, mine_relations
from wsseg.stages.make_cam import cam_power
from wsseg.stages.per_image import for_each_image, skipped_ids
from wsseg.stages.train_cam import CAM_STRIDES
from wsseg.store import RunStore
from wsseg.training import adam, seed_everything, train

LABELS = "amn/ir_labels"  # the relation maps AMN learns from, one PNG per image


def label_path(store: RunStore, image_id: str):
    return store.folder(LABELS) / f"{image_id}.png"


def build_network(config: Config, store: RunStore | None, *, initialise: bool = True) -> AMNet:
    # AMN trains every backbone stage but the stem, with BatchNorm frozen (IRN's ResNet-50)
    backbone = ResNet(config.backbone.depth, width=config.backbone.width, strides=CAM_STRIDES, frozen_bn=True,
                      trainable=("layer1", "layer2", "layer3", "layer4"))
    if initialise:
        source = config.amn.backbone_init
        load_weights(backbone, store.folder("cam") / "model.pt" if source == "cam" else source)
    return AMNet(backbone, len(config.data.classes), rates=config.amn.rates)


def load_network(config: Config, store: RunStore) -> AMNet:
    return load_trained(build_network(config, None, initialise=False), store.folder("amn") / "model.pt",
                        "the trained AMN network")


def run(ctx: StageContext) -> dict:
    config, amn = ctx.config, ctx.config.amn
    dataset = artifacts.open_dataset(config)
    ids = artifacts.image_ids(config, "data.label_list", "data.eval_list")
    ids = [i for i in ids if i not in skipped_ids(ctx.store.folder("cams"))]
    ctx.folder("amn")
    folder = ctx.folder(LABELS)
    power = cam_power(config, ctx.store, "cams")
    work = functools.partial(mine_relations.mine_image, config, str(ctx.store.root), power, "cams", LABELS)
    counts = for_each_image(ctx, ids, lambda i: label_path(ctx.store, i), work, report_folder=folder,
                            processes=config.run.workers, desc="train-amn: relation labels")
    ctx.dist.barrier()

    seed_everything(config.run.seed)
    train_ids = artifacts.image_ids(config, "data.train_list")
    missing = [i for i in train_ids if not label_path(ctx.store, i).exists()]
    if missing:
        raise UserError(f"train-amn: {len(missing)} images of data.train_list have no relation label (e.g. "
                        f"{missing[0]}); data.label_list must include the training images")
    images = LabelledImages(dataset, train_ids, artifacts.RunLabels(ctx.store.root, LABELS, "train-amn"),
                            SegmentationAugment(scale_range=amn.scale_range, crop_size=amn.crop), seed=config.run.seed,
                            tags=True)
    model = build_network(config, ctx.store)
    backbone_params, head_params = model.param_groups()
    optimizer = adam([(backbone_params, amn.lr * amn.backbone_lr_mult), (head_params, amn.lr)],
                     weight_decay=amn.weight_decay)

    def loss_fn(net, batch):
        return {"total": amn_loss(net(batch["image"], batch["tags"]), batch["label"], amn.label_smoothing)}

    result = train(ctx, model=model, optimizer=optimizer, dataset=images, batch_size=amn.batch_size, epochs=amn.epochs,
                   loss_fn=loss_fn, checkpoint=ctx.store.folder("amn") / "checkpoint.pt", seed=config.run.seed,
                   lr_power=0.0)  # AMN keeps its learning rates constant
    metrics = {"final_loss": result.curves["total"][-1] if result.curves.get("total") else None,
               "images_per_second": round(result.images_per_second, 2), "label_images": counts["done"]}
    if ctx.dist.is_main:
        save_checkpoint(ctx.store.folder("amn") / "model.pt", {"model": model.cpu().state_dict()})
        labels = mine_relations.evaluate(config, ctx.store, ctx.progress, folder=LABELS)
        metrics.update({f"label_{k}": v for k, v in labels.items() if k != "evaluated_images"})
    return {"metrics": metrics, "curves": result.curves}


def quality(m: dict) -> str:
    return (f"final loss {fmt(m.get('final_loss'))}; its labels: precision {fmt(m.get('label_precision'))}, "
            f"coverage {fmt(m.get('label_coverage'))}")


STAGE = Stage(
    name="train-amn",
    help="AMN (cam.amn): train a per-pixel classifier on the CAMs' confident regions.",
    run=run,
    outputs=("amn",),
    needs=("train-cam", "make-cam"),
    switch="cam.amn",
    reads=("run.seed", "data.root", "data.classes", "data.train_list", "data.label_list", "data.eval_list",
           "data.cls_labels", "backbone", "cam.threshold_mode", "cam.eval_threshold", "relations", "amn"),
    headline="final_loss",
    quality=quality,
)
