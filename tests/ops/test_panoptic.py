import numpy as np

from wsseg.ops.panoptic import decode_ids, encode_ids, panoptic_from_instances


def test_rgb_round_trip_uses_cocos_encoding():
    ids = np.array([[0, 1, 255], [256, 65536 + 3, 256**3 - 1]])
    rgb = encode_ids(ids)
    assert tuple(rgb[1, 0]) == (0, 1, 0) and tuple(rgb[1, 1]) == (3, 0, 1)
    assert np.array_equal(decode_ids(rgb), ids)


def test_instances_become_things_and_the_rest_background_stuff():
    instances = np.array([[0, 1, 1], [2, 2, 0], [0, 0, 0]])
    void = np.zeros((3, 3), bool)
    void[2, 2] = True
    segments, info = panoptic_from_instances(instances, np.array([3, 5]), void)
    assert segments[2, 2] == 0 and segments[0, 1] == 1 and segments[1, 0] == 2 and segments[0, 0] == 3
    by_id = {s["id"]: s for s in info}
    assert by_id[1]["category_id"] == 3 and by_id[2]["category_id"] == 5 and by_id[3]["category_id"] == 0
    assert by_id[3]["isthing"] == 0 and by_id[1]["isthing"] == 1
    assert sum(s["area"] for s in info) == 8  # every non-void pixel in exactly one segment


def test_no_instances_is_all_background():
    segments, info = panoptic_from_instances(np.zeros((2, 2), int), np.zeros(0, int))
    assert info == [{"id": 1, "category_id": 0, "iscrowd": 0, "area": 4, "isthing": 0}]
    assert (segments == 1).all()
