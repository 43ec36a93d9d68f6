"""DUpsampling and its parts: the patch layout of W·code, the data-free W, the fit of W to label
patches (against an explicit SVD, better than a random projection, exact on the labels' span),
the patch sample, the temperature, the feature aggregation, W in the state dict, and the fit that
train-segmenter runs on the stage's labels before step 1."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wsseg.config import load_config
from wsseg.errors import UserError
from wsseg.models.segmenters import build_segmenter
from wsseg.models.segmenters.dupsampling import (
    DataDependentUpsampling,
    DUpsampling,
    PatchSample,
    dct_basis,
    fit_projection,
    initial_projection,
    label_patches,
    patch_one_hot,
    principal_projection,
)
from segmenter_batches import assert_param_groups_partition, randomise_bn, train_steps

NUM_CLASSES = 5


def tiny(seed: int = 0, **kwargs) -> DUpsampling:
    torch.manual_seed(seed)
    return DUpsampling(NUM_CLASSES, depth=18, width=0.25, **kwargs)


def shapes(count: int, size: int = 64, seed: int = 0, num_classes: int = NUM_CLASSES) -> list[torch.Tensor]:
    """Label maps of a few discs and boxes on background, with an ignored rim: demo-like."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    maps = []
    for _ in range(count):
        labels = np.zeros((size, size), dtype=np.int64)
        for _ in range(rng.integers(1, 4)):
            cls = int(rng.integers(1, num_classes))
            cy, cx, radius = rng.uniform(0, size, 2).tolist() + [float(rng.uniform(4, size / 3))]
            if rng.random() < 0.5:
                labels[(yy - cy) ** 2 + (xx - cx) ** 2 < radius ** 2] = cls
            else:
                labels[(abs(yy - cy) < radius) & (abs(xx - cx) < radius / 2)] = cls
        labels[:, :2] = 255
        maps.append(torch.from_numpy(labels))
    return maps


def reconstruction_error(projection: torch.Tensor, patches: torch.Tensor, num_classes: int) -> float:
    x = patch_one_hot(patches, num_classes)
    w = projection.double()
    return float(((x - x @ w @ w.T) ** 2).sum())


def test_codes_become_patches_cell_by_cell():
    """scores[b, c, r·i + dy, r·j + dx] = (r·W·code[b, :, i, j])[c·r² + dy·r + dx]."""
    torch.manual_seed(0)
    layer = DataDependentUpsampling(3, 4, 7)
    layer.projection.copy_(torch.randn(3 * 16, 7))
    codes = torch.randn(2, 7, 3, 2)
    scores = layer.scores(codes)
    assert scores.shape == (2, 3, 12, 8)
    for b, i, j in ((0, 0, 0), (1, 2, 1), (0, 1, 1)):
        patch = (4 * layer.projection @ codes[b, :, i, j]).reshape(3, 4, 4)
        torch.testing.assert_close(scores[b, :, 4 * i:4 * i + 4, 4 * j:4 * j + 4], patch)
    # The temperature divides the logits: T = exp(log_temperature).
    with torch.no_grad():
        layer.log_temperature.fill_(float(np.log(2.0)))
    torch.testing.assert_close(layer(codes), scores / 2)


def test_data_free_projection_is_orthonormal_and_starts_with_nearest_upsampling():
    basis = dct_basis(8)
    torch.testing.assert_close(basis.T @ basis, torch.eye(64, dtype=torch.float64))
    torch.testing.assert_close(basis[:, 0], torch.full((64,), 1 / 8, dtype=torch.float64))
    projection = initial_projection(NUM_CLASSES, 8, 40)
    torch.testing.assert_close(projection.T @ projection, torch.eye(40, dtype=torch.float64))
    # Column c < C: a constant 1/r over class c's r² rows — one score per cell, nearest-upsampled.
    for cls in range(NUM_CLASSES):
        expected = torch.zeros(NUM_CLASSES * 64, dtype=torch.float64)
        expected[cls * 64:(cls + 1) * 64] = 1 / 8
        torch.testing.assert_close(projection[:, cls], expected)
    with pytest.raises(ValueError, match="compressed_channels"):
        DataDependentUpsampling(2, 4, 33)


def test_label_patches_pad_with_ignore_and_drop_unlabelled_ones():
    labels = torch.arange(5 * 7).reshape(5, 7) % 3
    labels[:, 4:] = 255  # the right column of patches has no labelled pixel
    patches = label_patches(labels, 4)
    assert patches.shape == (2, 16)  # 2 x 2 patches on the padded 8 x 8 map, the right two unlabelled
    torch.testing.assert_close(patches[0], labels[:4, :4].reshape(-1))
    expected = torch.full((4, 4), 255)
    expected[0, :] = labels[4, :4]
    torch.testing.assert_close(patches[1], expected.reshape(-1))
    batch = torch.stack([labels, labels])
    assert label_patches(batch, 4).shape == (4, 16)
    onehot = patch_one_hot(patches, 3)
    assert onehot.shape == (2, 48) and onehot[1].sum() == 4  # 12 ignored pixels set nothing
    assert onehot[0, 0 * 16 + 0] == (labels[0, 0] == 0) and onehot[0, 1 * 16 + 1] == (labels[0, 1] == 1)


@pytest.mark.parametrize("scale, num_classes", [(4, 3), (2, 2)])  # K <= D (Gram of patches) and K > D (D x D)
def test_fit_is_the_pca_of_the_one_hot_patches(scale, num_classes):
    """Against an explicit SVD of every patch's one-hot vector (no merging): the same subspace."""
    maps = shapes(6, size=16, seed=1, num_classes=num_classes)
    patches = torch.cat([label_patches(m, scale) for m in maps])
    dims = 5
    projection = principal_projection(patches, num_classes, dims)
    matrix = patch_one_hot(patches, num_classes).numpy()
    _, singular, vt = np.linalg.svd(matrix, full_matrices=False)
    assert singular[dims - 1] > singular[dims] * 1.001  # a gap: the top subspace is unique
    reference = torch.from_numpy(vt[:dims].T)
    torch.testing.assert_close(projection @ projection.T, reference @ reference.T)
    # The optimum's error: the energy past the top `dims` singular values.
    assert reconstruction_error(projection, patches, num_classes) == pytest.approx(float((singular[dims:] ** 2).sum()))


def test_fitted_projection_beats_a_random_one_and_the_data_free_one_on_new_labels():
    train, held_out = shapes(40, seed=2), shapes(20, seed=3)
    projection, seen = fit_projection(train, NUM_CLASSES, 16, 24)
    assert seen == sum(len(label_patches(m, 16)) for m in train)
    patches = torch.cat([label_patches(m, 16) for m in held_out])
    generator = torch.Generator().manual_seed(0)
    random, _ = torch.linalg.qr(torch.randn(NUM_CLASSES * 256, 24, dtype=torch.float64, generator=generator))
    fitted = reconstruction_error(projection, patches, NUM_CLASSES)
    assert fitted < 0.2 * reconstruction_error(random, patches, NUM_CLASSES)
    assert fitted < reconstruction_error(initial_projection(NUM_CLASSES, 16, 24), patches, NUM_CLASSES)


def test_fit_is_exact_on_the_span_of_the_training_patches():
    """With N >= the patches' rank every training patch, and every one-hot patch in their span, comes
    back exactly; the columns past the rank are zero."""
    def patch(left: int, right: int) -> torch.Tensor:
        labels = torch.full((4, 4), left)
        labels[:, 2:] = right
        return labels

    train = [patch(1, 0), patch(0, 2), patch(0, 0), patch(3, 3)]
    projection, seen = fit_projection(train, 4, 4, 10)
    assert seen == 4
    rank = torch.linalg.matrix_rank(patch_one_hot(torch.stack([t.reshape(-1) for t in train]), 4)).item()
    assert rank == 4 and (projection[:, rank:] == 0).all()
    new = patch(1, 2)  # = patch(1, 0) + patch(0, 2) − patch(0, 0): in the span, not in the set
    for labels in [*train, new]:
        x = patch_one_hot(labels.reshape(1, -1), 4)
        torch.testing.assert_close(x @ projection @ projection.T, x)
    outside = patch_one_hot(patch(2, 1).reshape(1, -1), 4)
    assert not torch.allclose(outside @ projection @ projection.T, outside)


def test_patch_sample_is_uniform_seeded_and_bounded():
    def stream():  # 2000 distinct patches, each its index in two bytes
        index = torch.arange(2000)
        return [torch.stack([index[k:k + 100] // 256, index[k:k + 100] % 256], dim=1) for k in range(0, 2000, 100)]

    counts = torch.zeros(2000)
    for seed in range(100):
        sample = PatchSample(200, seed=seed)
        for batch in stream():
            sample.add(batch)
        assert sample.seen == 2000
        rows = sample.patches()
        assert rows.shape == (200, 2)
        counts[rows[:, 0] * 256 + rows[:, 1]] += 1
    # Each item is kept with probability 200 / 2000: early and late items alike (100 draws each).
    assert counts[:1000].mean() == pytest.approx(10, abs=0.6) and counts[1000:].mean() == pytest.approx(10, abs=0.6)
    again = PatchSample(200, seed=99)
    for batch in stream():
        again.add(batch)
    torch.testing.assert_close(again.patches(), rows)
    small = PatchSample(5000)
    small.add(stream()[0])
    assert small.patches().shape == (100, 2) and small.seen == 100


def test_fit_to_labels_sets_the_buffer_and_the_state_dict_carries_it():
    model = tiny()
    initial = model.upsample.projection.clone()
    assert int(model.upsample.fitted_patches) == 0
    model.fit_to_labels(iter([torch.full((40, 40), 255)]))  # no labelled pixel: the data-free W stays
    torch.testing.assert_close(model.upsample.projection, initial)
    maps = shapes(4, size=64)
    model.fit_to_labels(iter(maps))
    expected, seen = fit_projection(maps, NUM_CLASSES, 32, 256)
    torch.testing.assert_close(model.upsample.projection, expected.float())
    assert int(model.upsample.fitted_patches) == seen == 16
    state = model.state_dict()
    assert {"upsample.projection", "upsample.fitted_patches"} <= set(state)
    assert "upsample.projection" not in dict(model.named_parameters())  # fixed: not trained
    fresh = tiny(seed=1)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.upsample.projection, model.upsample.projection)
    with pytest.raises(ValueError, match="label 7 is outside 0..4"):
        model.fit_to_labels([torch.full((8, 8), 7)])


def test_aggregation_pools_the_low_level_features_to_layer4():
    model = tiny()
    randomise_bn(model)
    model.eval()
    x = torch.randn(2, 3, 70, 50)
    with torch.no_grad():
        features = model.backbone(x)
        size = features["layer4"].shape[-2:]
        assert tuple(size) == (3, 2)
        pooled = [model.reduce[s](F.adaptive_avg_pool2d(features[s], size)) for s in ("stem", "layer3")]
        parts = [features["layer4"], *pooled]
        torch.testing.assert_close(model.aggregate(features), torch.cat(parts, dim=1))
        # Pooling averages: a 16 x 16 stem map to 2 x 2 is the mean of each 8 x 8 block.
        stem = torch.randn(1, 4, 16, 16)
        torch.testing.assert_close(F.adaptive_avg_pool2d(stem, (2, 2))[0, :, 1, 0], stem[0, :, 8:, :8].mean(dim=(1, 2)))


def test_contract_full_resolution_logits_loss_and_groups():
    model = tiny()
    losses, history = train_steps(model, lr=0.01, steps=15)  # with the data-free W
    assert losses[-1] < 0.8 * losses[0], losses
    assert set(history[-1]) == {"main", "total"}
    assert_param_groups_partition(model)
    _, heads = model.param_groups()
    assert any(p is model.upsample.log_temperature for p in heads)
    assert model.upsample.log_temperature.grad is not None and model.upsample.log_temperature.grad != 0
    model.eval()
    x = torch.randn(1, 3, 65, 49)
    with torch.no_grad():
        out = model(x)["out"]
        full = model.head(model.backbone(x))
        assert full.shape == (1, NUM_CLASSES, 96, 64)  # 3 x 2 cells of 32 x 32
        torch.testing.assert_close(out, full[..., :65, :49])  # cropped, not resized
        torch.testing.assert_close(model.predict(x), out)
    # The loss is the cross-entropy of those logits at the labels' resolution.
    labels = torch.randint(0, NUM_CLASSES, (1, 65, 49))
    labels[:, :3] = 255
    expected = F.cross_entropy(out, labels, ignore_index=255)
    torch.testing.assert_close(model.loss({"out": out}, labels)["main"], expected)


def test_output_stride_sixteen_and_option_errors():
    model = tiny(output_stride=16)
    assert model.upsample.scale == 16 and model.upsample.projection.shape == (NUM_CLASSES * 256, 256)
    assert model(torch.randn(2, 3, 48, 40))["out"].shape == (2, NUM_CLASSES, 48, 40)
    with pytest.raises(UserError, match="segmenter.options.dupsampling: dupsampling: output_stride must be 16 or 32"):
        build_segmenter("dupsampling", NUM_CLASSES, options={"output_stride": 8})
    with pytest.raises(UserError, match="low_level"):
        build_segmenter("dupsampling", NUM_CLASSES, options={"low_level": ["layer4"]})
    assert set(tiny(low_level=("layer1",)).reduce) == {"layer1"}


def test_other_models_never_read_the_labels():
    def labels():
        raise AssertionError("read")
        yield

    build_segmenter("deeplab-v2", NUM_CLASSES, depth=18, width=0.25).fit_to_labels(labels())


def test_train_segmenter_fits_w_to_the_stage_labels_before_training(tmp_path):
    """The stage shows the model its training labels (here the ground truth) before step 1: the saved
    model's W is the fit to exactly those maps, and it loads with the weights."""
    from wsseg import pipeline
    from wsseg.data.demo import generate_demo
    from wsseg.stages import artifacts
    from wsseg.stages import train_segmenter
    from wsseg.store import RunStore

    data = tmp_path / "demo"
    generate_demo(data, num_images=12, seed=4, size=64)
    config = load_config(["pipelines/demo.yaml"], [
        f"data.root={data}", f"run.dir={tmp_path / 'run'}", "run.workers=0", "run.device=cpu",
        "segmenter.model=dupsampling", "segmenter.labels=gt", "segmenter.crop=64", "segmenter.batch_size=2",
        "segmenter.iterations=2", "segmenter.eval_mode=single", "segmenter.test_scales=[1.0]",
        "segmenter.options={dupsampling: {compressed_channels: 32, output_stride: 32}}"])
    pipeline.run_stage(train_segmenter.STAGE, config)
    dataset = artifacts.open_dataset(config)
    ids = [i for i in artifacts.image_ids(config, "data.segmenter_train_list") if dataset.has_semantic(i)]
    maps = [torch.from_numpy(dataset.read_semantic(i).astype(np.int64)) for i in ids]
    expected, seen = fit_projection(maps, 6, 32, 32)
    model = train_segmenter.load_network(config, RunStore(config.run.dir), "gt")
    assert int(model.upsample.fitted_patches) == seen > 0
    torch.testing.assert_close(model.upsample.projection, expected.float())
