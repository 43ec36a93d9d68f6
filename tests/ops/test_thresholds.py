import numpy as np
import pytest
from skimage.filters import threshold_otsu

from wsseg.ops.thresholds import otsu_threshold, relative_power, value_histogram


def test_otsu_matches_scikit_image_on_a_bimodal_sample():
    rng = np.random.default_rng(0)
    values = np.clip(np.concatenate([rng.normal(0.2, 0.05, 5000), rng.normal(0.7, 0.08, 2000)]), 0, 1)
    ours = otsu_threshold(value_histogram(values))
    assert abs(ours - threshold_otsu(values, nbins=256)) < 2 / 256
    assert 0.35 < ours < 0.55  # between the modes


def test_power_maps_otsu_onto_the_reference():
    gamma = relative_power(0.44, 0.15)
    assert 0.44**gamma == pytest.approx(0.15)
    assert relative_power(0.15, 0.15) == pytest.approx(1.0)  # CAMs already at the reference: unchanged
    with pytest.raises(ValueError):
        relative_power(0.0, 0.15)


def test_histogram_clips_and_counts_every_value():
    histogram = value_histogram(np.array([-1.0, 0.0, 0.5, 1.0, 2.0]), bins=4)
    assert histogram.tolist() == [2, 0, 1, 2]
