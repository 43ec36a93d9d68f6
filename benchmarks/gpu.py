"""CUDA: training-step and make-cam speed at VOC sizes, by precision and memory format.

    python3 benchmarks/gpu.py                       # prints a table and writes --json
    python3 benchmarks/gpu.py --steps 5 --stages train-cam

Needs a CUDA device. For each training stage at IRN's / DeepLab's VOC recipe
(pipelines/voc.yaml: ResNet-50 train-cam at 512 crops, batch 16; train-irn at 512, batch 32;
DeepLab-v2 train-segmenter at 321, batch 10; random init, speed does not depend on the
weights), and for make-cam's per-image multi-scale CAMs of a 500x375 image (IRN's four
scales and flips, the folded inference network), it times the stage's own code under:

- fp32: plain float32 (cuDNN's convolutions may use TF32, PyTorch's default);
- bf16 / fp16: torch.autocast as `run.amp` does it (fp16 with the GradScaler);
- contiguous / channels_last memory format (model and input).

One batch, drawn from the stage's own dataset and augmentation on random smooth 500x375
JPEGs, is reused for every step: this is the GPU's compute, not the data loader's. Each
setting gets a fresh network and optimiser, `--warmup` untimed steps, then `--steps` steps
timed with torch.cuda.synchronize; peak memory is torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from training import STAGES, stage_config, stage_parts, write_voc_folder

SETTINGS = (("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True), ("fp16", True))
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def to_device(batch: dict, channels_last: bool) -> dict:
    moved = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.cuda(non_blocking=True)
            if channels_last and value.dim() == 4:
                value = value.contiguous(memory_format=torch.channels_last)
        moved[key] = value
    return moved


def time_training(stage: str, config, precision: str, channels_last: bool, steps: int, warmup: int) -> dict:
    torch.manual_seed(0)
    images, model, optimizer, loss_fn, batch_size = stage_parts(stage, config, None)
    loader = torch.utils.data.DataLoader(images, batch_size=batch_size, shuffle=False, drop_last=True, num_workers=4)
    batch = to_device(next(iter(loader)), channels_last)
    model = model.cuda()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    dtype = DTYPES[precision]
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    torch.cuda.reset_peak_memory_stats()
    times = []
    for index in range(warmup + steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
            loss = loss_fn(model, batch)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        torch.cuda.synchronize()
        if index >= warmup:
            times.append(time.perf_counter() - start)
    seconds = float(np.median(times))
    return {"stage": stage, "precision": precision, "channels_last": channels_last, "batch": batch_size,
            "crop": int(batch["image"].shape[-1]), "ms_per_step": 1000 * seconds,
            "images_per_second": batch_size / seconds, "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            "loss": float(loss.detach())}


def time_make_cam(config, precision: str, channels_last: bool, steps: int, warmup: int) -> dict:
    from wsseg.data.transforms import normalize
    from wsseg.models.cam import inference_network, multiscale_cams
    from wsseg.stages import artifacts
    from wsseg.stages.train_cam import build_network

    torch.manual_seed(0)
    dataset = artifacts.open_dataset(config)
    image_id = artifacts.image_ids(config, "data.train_list")[0]
    image = torch.from_numpy(normalize(dataset.read_image(image_id))).permute(2, 0, 1).cuda()
    keys = torch.from_numpy(dataset.tags(image_id)).cuda()
    network = build_network(config, load_pretrained=False).cuda().eval()
    model = inference_network(network, channels_last=channels_last)
    dtype = DTYPES[precision]
    torch.cuda.reset_peak_memory_stats()
    times = []
    for index in range(warmup + steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        cam, high_res = multiscale_cams(model, image, keys, config.cam.scales, amp_dtype=dtype)
        torch.cuda.synchronize()
        if index >= warmup:
            times.append(time.perf_counter() - start)
    seconds = float(np.median(times))
    return {"stage": "make-cam", "precision": precision, "channels_last": channels_last, "batch": 1,
            "crop": int(max(image.shape[1:])), "ms_per_step": 1000 * seconds, "images_per_second": 1 / seconds,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "loss": float(high_res.float().mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", default=",".join(STAGES + ("make-cam",)))
    parser.add_argument("--steps", type=int, default=10, help="timed steps per setting")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per setting (cuDNN's autotuning, allocator)")
    parser.add_argument("--json", default="gpu.json", help="where to write the rows")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py needs a CUDA device")
    torch.backends.cudnn.benchmark = True
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        write_voc_folder(Path(tmp), count=32)  # train-irn's batch is 32
        config = stage_config("voc", tmp)
        for stage in args.stages.split(","):
            for precision, channels_last in SETTINGS:
                if stage == "make-cam":
                    row = time_make_cam(config, precision, channels_last, args.steps, args.warmup)
                else:
                    row = time_training(stage, config, precision, channels_last, args.steps, args.warmup)
                rows.append(row)
                print(f"{row['stage']:16s} {precision:5s} {'channels_last' if channels_last else 'contiguous':14s} "
                      f"batch {row['batch']:3d} crop {row['crop']:4d}: {row['ms_per_step']:8.1f} ms/step "
                      f"{row['images_per_second']:8.1f} img/s  peak {row['peak_gib']:6.2f} GiB", flush=True)
                torch.cuda.empty_cache()
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "steps": args.steps, "warmup": args.warmup, "rows": rows}
    Path(args.json).write_text(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
