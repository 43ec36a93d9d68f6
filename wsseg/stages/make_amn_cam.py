"""make-amn-cam (on with cam.amn): AMN's maps for every image, in make-cam's format, into amn_cams/<id>.npz.

The trained AMN (train-amn) at make-cam's scales with flips, softmax over background and
classes, each present class min-max stretched except where its relation label is confident
background (wsseg/models/amn.py's amn_maps). The files hold `keys`, `cam` and `high_res` like
make-cam's, plus `plain`, make-cam's CAM of the image, for `inspect` to compare. mine-relations,
synthesize-labels and calibrate read these instead of the CAMs (artifacts.seed_folder);
amn_cams/levels.json holds their Otsu level for relative threshold mode. Resumes per image and
splits the images across torchrun processes, like make-cam.
"""

from __future__ import annotations

import functools

import torch

from wsseg.context import StageContext
from wsseg.data.datasets import multi_hot_tags
from wsseg.data.transforms import normalize
from wsseg.errors import UserError
from wsseg.models.amn import amn_maps
from wsseg.stage import Stage
from wsseg.stages import artifacts, make_cam
from wsseg.stages.per_image import for_each_image, skipped_ids
from wsseg.stages.train_amn import LABELS, label_path, load_network
from wsseg.store import write_json

FOLDER = "amn_cams"


def run(ctx: StageContext) -> dict:
    config = ctx.config
    dataset = artifacts.open_dataset(config)
    ids = artifacts.image_ids(config, "data.label_list", "data.eval_list")
    ids = [i for i in ids if i not in skipped_ids(ctx.store.folder(LABELS))]
    model = load_network(config, ctx.store).to(ctx.device)
    folder = ctx.folder(FOLDER)

    def work(image_id: str) -> None:
        cams = artifacts.read_cams(artifacts.cam_path(ctx.store, image_id))
        labels = artifacts.read_labels(label_path(ctx.store, image_id))
        if cams is None or labels is None:
            raise UserError(f"cams/{image_id}.npz or {LABELS}/{image_id}.png is missing or damaged; rerun "
                            f"make-cam and train-amn")
        image = torch.from_numpy(normalize(dataset.read_image(image_id))).permute(2, 0, 1).to(ctx.device)
        tags = torch.from_numpy(multi_hot_tags(dataset, image_id))
        keys = torch.from_numpy(cams["keys"])
        cam, high_res = amn_maps(model, image, keys, tags, torch.from_numpy(labels == 0), config.cam.scales)
        artifacts.write_cams(artifacts.cam_path(ctx.store, image_id, FOLDER), cams["keys"], cam.cpu().numpy(),
                             high_res.cpu().numpy(), plain=cams["high_res"])

    counts = for_each_image(ctx, ids, lambda i: artifacts.cam_path(ctx.store, i, FOLDER), work, report_folder=folder)
    ctx.dist.barrier()
    metrics = {}
    if ctx.dist.is_main:
        write_json(make_cam.levels_path(ctx.store, FOLDER), {"otsu": make_cam.cam_otsu_level(ids, ctx.store, FOLDER)})
        metrics.update(make_cam.evaluate(config, ctx.store, ctx.progress, folder=FOLDER))
    return {"metrics": metrics, "items": {"done": len(ids) - len(skipped_ids(folder)), "total": len(ids)},
            "counters": counts}


STAGE = Stage(
    name="make-amn-cam",
    help="AMN (cam.amn): its maps for every image (amn_cams/<id>.npz), which replace the CAMs downstream.",
    run=run,
    outputs=(FOLDER,),
    needs=("make-cam", "train-amn"),
    switch="cam.amn",
    reads=("data.root", "data.classes", "data.label_list", "data.eval_list", "data.cls_labels", "cam.scales"),
    headline="miou",
    quality=functools.partial(make_cam.quality, name="AMN"),
    evaluators={"amn-cams": functools.partial(make_cam.evaluate, folder=FOLDER)},
    damaged=functools.partial(make_cam.damaged, folder=FOLDER),
    count_done=functools.partial(make_cam.count_done, folder=FOLDER),
    inspect_tiles=functools.partial(make_cam.inspect_tiles, folder=FOLDER),
    label_map=functools.partial(make_cam.label_map, folder=FOLDER),
)
