"""train-irn: IRN's boundary and displacement heads, learned from the relation maps (docs/ALGORITHMS.md §1.5).

The backbone is initialised from `irn.backbone_init` (the trained CAM network, ImageNet,
or a file) and frozen unless `irn.train_backbone`. Pair labels are built on the fly from
each batch's relation map (never materialised per sample). After training, the mean
predicted displacement over the training images is stored and subtracted at inference.
irn/model.pt holds the whole network (backbone included) so that later stages never
depend on the file it was initialised from.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from wsseg.checkpoints import load_trained, save_checkpoint
from wsseg.config import Config
from wsseg.context import StageContext
from wsseg.data.datasets import LabelledImages
from wsseg.data.transforms import SegmentationAugment, normalize
from wsseg.errors import UserError
from wsseg.models.backbones import ResNet, load_weights
from wsseg.models.irn import IRNet, irn_losses
from wsseg.ops.path_index import labels_at_stride4
from wsseg.stages import artifacts
from wsseg.stages.mine_relations import relation_path
from wsseg.stage import Stage, fmt
from wsseg.store import RunStore
from wsseg.training import seed_everything, sgd, train

IRN_STRIDES = (1, 2, 2, 1)  # IRN's backbone: output stride 16, like the CAM network
MAX_MEAN_IMAGES = 1000  # images used to estimate the mean displacement


def build_network(config: Config, store: RunStore | None, *, initialise: bool = True) -> IRNet:
    backbone = ResNet(config.backbone.depth, width=config.backbone.width, strides=IRN_STRIDES, frozen_bn=True,
                      trainable=("stem", "layer1", "layer2", "layer3", "layer4") if config.irn.train_backbone else ())
    if initialise:
        source = config.irn.backbone_init
        load_weights(backbone, store.folder("cam") / "model.pt" if source == "cam" else source)
    return IRNet(backbone, train_backbone=config.irn.train_backbone)


def load_network(config: Config, store: RunStore) -> IRNet:
    return load_trained(build_network(config, None, initialise=False), store.folder("irn") / "model.pt",
                        "the trained IRN network")


def run(ctx: StageContext) -> dict:
    config, irn = ctx.config, ctx.config.irn
    seed_everything(config.run.seed)
    dataset = artifacts.open_dataset(config)
    ids = artifacts.image_ids(config, "data.train_list")
    missing = [i for i in ids if not relation_path(ctx.store, i).exists()]
    if missing:
        raise UserError(
            f"train-irn: {len(missing)} images of data.train_list have no relation map (e.g. {missing[0]}); "
            f"data.label_list must include the training images"
        )
    images = LabelledImages(dataset, ids, artifacts.RunLabels(ctx.store.root, "relations", "mine-relations"),
                            SegmentationAugment(scale_range=irn.scale_range, crop_size=irn.crop), seed=config.run.seed)
    model = build_network(config, ctx.store)
    boundary_params, displacement_params = model.param_groups()
    optimizer = sgd([(boundary_params, irn.lr), (displacement_params, irn.lr * irn.displacement_lr_mult)],
                    momentum=irn.momentum, weight_decay=irn.weight_decay)

    def loss_fn(net, batch):
        boundary_logits, displacement = net(batch["image"])
        labels = labels_at_stride4(batch["label"], boundary_logits.shape[2:])
        return irn_losses(boundary_logits.float(), displacement.float(), labels, radius=irn.radius)

    folder = ctx.folder("irn")
    result = train(ctx, model=model, optimizer=optimizer, dataset=images, batch_size=irn.batch_size, epochs=irn.epochs,
                   loss_fn=loss_fn, checkpoint=folder / "checkpoint.pt", seed=config.run.seed)
    model = model.to(ctx.device).eval()
    if ctx.dist.is_main:
        model.mean_displacement.copy_(mean_displacement(model, dataset, ids[:MAX_MEAN_IMAGES], irn.crop, ctx))
        save_checkpoint(folder / "model.pt", {"model": model.cpu().state_dict()})
    final = {k: v[-1] for k, v in result.curves.items() if v}
    return {"metrics": {"final_loss": final.get("total"), **{f"final_{k}": v for k, v in final.items() if k != "total"},
                        "images_per_second": round(result.images_per_second, 2)},
            "curves": result.curves}


@torch.inference_mode()
def mean_displacement(model: IRNet, dataset, ids: list[str], crop: int, ctx: StageContext) -> torch.Tensor:
    """Mean predicted displacement (2,) over images on IRN's top-left crop canvas (IRN's mean shift)."""
    total = torch.zeros(2, dtype=torch.float64)
    for image_id in ctx.progress(ids, desc="train-irn: mean displacement"):
        image = torch.from_numpy(normalize(dataset.read_image(image_id))).permute(2, 0, 1)
        image = image[:, :crop, :crop]
        image = F.pad(image, (0, crop - image.shape[2], 0, crop - image.shape[1]))
        _, displacement = model(image[None].to(ctx.device))
        total += displacement[0].float().mean(dim=(1, 2)).double().cpu()
    return (total / max(len(ids), 1)).float()


STAGE = Stage(
    name="train-irn",
    help="Train IRN's boundary and displacement heads.",
    run=run,
    outputs=("irn",),
    needs=("train-cam", "mine-relations"),
    reads=("run.seed", "data.root", "data.train_list", "backbone", "irn"),
    version=2,  # 2: relation labels sampled at the centre of each stride-4 cell (IRN's), not its corner
    headline="final_loss",
    quality=lambda m: f"final loss {fmt(m.get('final_loss'))}",
)
