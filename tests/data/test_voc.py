from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsseg.data.images import write_label_png
from wsseg.data.voc import VOC_CLASSES, VOCDataset, read_id_list
from wsseg.errors import UserError

# id -> (height, width, object names in the XML)
IMAGES = {
    "2007_000032": (6, 8, ["aeroplane", "person", "aeroplane"]),
    "2007_000033": (5, 7, ["dog"]),
    "2008_000002": (4, 4, ["tvmonitor", "chair"]),
}


def _write_xml(path: Path, names: list[str]) -> None:
    objects = "".join(
        f"<object><name>{name}</name><difficult>0</difficult>"
        # person layouts carry parts whose names are not classes: they must be ignored
        + ("<part><name>head</name></part>" if name == "person" else "")
        + "<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>2</xmax><ymax>2</ymax></bndbox></object>"
        for name in names
    )
    path.write_text(f"<annotation><filename>x.jpg</filename>{objects}</annotation>")


def make_voc(root: Path) -> Path:
    """A tiny VOC 2012 + SBD tree."""
    for folder in ("JPEGImages", "Annotations", "ImageSets/Segmentation", "ImageSets/Main",
                   "SegmentationClass", "SegmentationClassAug", "SegmentationObject"):
        (root / folder).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for image_id, (height, width, names) in IMAGES.items():
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{image_id}.jpg")
        _write_xml(root / "Annotations" / f"{image_id}.xml", names)
    (root / "ImageSets/Segmentation/train.txt").write_text("2007_000032\n\n2007_000033\n")
    (root / "ImageSets/Segmentation/train_aug.txt").write_text("# SBD + VOC train\n2007_000032\n2007_000033\n2008_000002\n")
    (root / "ImageSets/Main/dog_train.txt").write_text("2007_000032 -1\n 2007_000033  1\n")
    # VOC palette label for 000032; SBD grayscale label for 000032 (must lose) and 000033 (only one).
    voc_label = np.zeros((6, 8), np.uint8)
    voc_label[1:4, 1:5] = 1
    voc_label[4:6, 5:8] = 15
    voc_label[0, :] = 255
    write_label_png(root / "SegmentationClass/2007_000032.png", voc_label)
    Image.fromarray(np.full((6, 8), 3, np.uint8)).save(root / "SegmentationClassAug/2007_000032.png")
    sbd_label = np.zeros((5, 7), np.uint8)
    sbd_label[2:, 2:] = 12
    Image.fromarray(sbd_label).save(root / "SegmentationClassAug/2007_000033.png")
    assert Image.open(root / "SegmentationClassAug/2007_000033.png").mode == "L"
    return root


@pytest.fixture()
def voc_root(tmp_path: Path) -> Path:
    return make_voc(tmp_path / "VOC2012")


def test_voc_classes_are_the_twenty_in_order():
    assert len(VOC_CLASSES) == 20
    assert VOC_CLASSES[0] == "aeroplane" and VOC_CLASSES[14] == "person" and VOC_CLASSES[-1] == "tvmonitor"


def test_read_id_list_by_name_skips_blank_and_comment_lines(voc_root):
    assert read_id_list(voc_root, "train") == ["2007_000032", "2007_000033"]
    assert read_id_list(voc_root, "train_aug") == ["2007_000032", "2007_000033", "2008_000002"]


def test_read_id_list_by_path_takes_first_column(voc_root):
    assert read_id_list(voc_root, "ImageSets/Main/dog_train.txt") == ["2007_000032", "2007_000033"]
    absolute = voc_root / "ImageSets/Main/dog_train.txt"
    assert read_id_list(voc_root, str(absolute)) == ["2007_000032", "2007_000033"]


@pytest.mark.parametrize("bad_id", ["../../etc/passwd", "a/b", "a\\b", "..", "x\x00y"])
def test_read_id_list_rejects_ids_that_escape_the_folder(voc_root, bad_id):
    path = voc_root / "ImageSets/Segmentation/evil.txt"
    path.write_text(f"2007_000032\n{bad_id}\n")
    with pytest.raises(UserError) as error:
        read_id_list(voc_root, "evil")
    assert f"{path}:2" in str(error.value)


def test_missing_list_names_key_path_and_origin_of_train_aug(tmp_path):
    root = tmp_path / "VOC2012"
    (root / "JPEGImages").mkdir(parents=True)
    with pytest.raises(UserError) as error:
        read_id_list(root, "train_aug", key="data.train_list")
    message = str(error.value)
    assert "data.train_list" in message
    assert str(root / "ImageSets/Segmentation/train_aug.txt") in message
    assert "SBD" in message and "train_aug.txt" in message
    with pytest.raises(UserError, match="data.val_list.*nope.txt"):
        read_id_list(root, "lists/nope.txt", key="data.val_list")


def test_empty_list_is_an_error(voc_root):
    (voc_root / "ImageSets/Segmentation/empty.txt").write_text("\n# nothing\n")
    with pytest.raises(UserError, match="no image ids"):
        read_id_list(voc_root, "empty")


def test_missing_root_or_jpegimages_names_data_root(tmp_path):
    with pytest.raises(UserError, match="data.root"):
        VOCDataset(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="data.root.*JPEGImages"):
        VOCDataset(tmp_path / "empty")


def test_image_reading_and_size_from_header(voc_root):
    voc = VOCDataset(voc_root)
    assert voc.num_classes == 20
    assert voc.image_path("2007_000033") == voc_root / "JPEGImages/2007_000033.jpg"
    image = voc.read_image("2007_000033")
    assert image.shape == (5, 7, 3) and image.dtype == np.uint8
    assert voc.image_size("2007_000033") == (5, 7)
    (voc_root / "JPEGImages/broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(UserError, match="broken.jpg"):
        voc.image_size("broken")
    with pytest.raises(UserError, match="missing.jpg"):
        voc.read_image("missing")


def test_tags_from_xml(voc_root):
    voc = VOCDataset(voc_root)
    tags = voc.tags("2007_000032")
    assert tags.dtype == np.int64
    assert tags.tolist() == [0, 14]  # aeroplane twice, person once; the part "head" is not a tag
    assert voc.tags("2008_000002").tolist() == [8, 19]


def test_tags_from_cls_labels_agree_with_xml(voc_root):
    table = {}
    for image_id, (_, _, names) in IMAGES.items():
        vector = np.zeros(20, np.float32)
        vector[[VOC_CLASSES.index(name) for name in names]] = 1
        table[int(image_id.replace("_", ""))] = vector  # IRN's int-encoded keys
    np.save(voc_root / "cls_labels.npy", table)
    xml_tags = {image_id: VOCDataset(voc_root).tags(image_id) for image_id in IMAGES}
    from_npy = VOCDataset(voc_root, cls_labels="cls_labels.npy")
    for path in (voc_root / "Annotations").iterdir():  # the XML must not be read
        path.unlink()
    for image_id in IMAGES:
        tags = from_npy.tags(image_id)
        assert tags.dtype == np.int64
        np.testing.assert_array_equal(tags, xml_tags[image_id])
    with pytest.raises(UserError, match="cls_labels.npy.*2009_000001"):
        from_npy.tags("2009_000001")


def _xml_tags(names: list[str]) -> np.ndarray:
    return np.array(sorted({VOC_CLASSES.index(name) for name in names}), dtype=np.int64)


def test_tags_from_xml_match_reference(voc_root):
    voc = VOCDataset(voc_root)
    for image_id, (_, _, names) in IMAGES.items():
        np.testing.assert_array_equal(voc.tags(image_id), _xml_tags(names))


def test_cls_labels_with_string_keys_and_wrong_width(voc_root):
    np.save(voc_root / "strings.npy", {"2007_000033": np.eye(20)[11]})
    assert VOCDataset(voc_root, cls_labels=str(voc_root / "strings.npy")).tags("2007_000033").tolist() == [11]
    np.save(voc_root / "narrow.npy", {"2007_000033": np.ones(3)})
    with pytest.raises(UserError, match="3 classes.*data.classes"):
        VOCDataset(voc_root, cls_labels="narrow.npy")
    with pytest.raises(UserError, match="data.cls_labels.*absent.npy"):
        VOCDataset(voc_root, cls_labels="absent.npy")


def test_unknown_tag_names_file_tag_and_fix(voc_root):
    _write_xml(voc_root / "Annotations/2007_000033.xml", ["dog", "unicorn"])
    with pytest.raises(UserError) as error:
        VOCDataset(voc_root).tags("2007_000033")
    message = str(error.value)
    assert "2007_000033.xml" in message and "'unicorn'" in message and "data.classes" in message


def test_custom_classes_and_untagged_image(voc_root):
    voc = VOCDataset(voc_root, classes=("dog", "aeroplane", "person"))
    assert voc.num_classes == 3
    assert voc.tags("2007_000032").tolist() == [1, 2]
    _write_xml(voc_root / "Annotations/2007_000033.xml", [])
    with pytest.raises(UserError, match="2007_000033.xml.*no <object>"):
        voc.tags("2007_000033")


def test_tags_are_cached_and_not_aliased(voc_root):
    voc = VOCDataset(voc_root)
    first = voc.tags("2007_000033")
    first[0] = 99
    (voc_root / "Annotations/2007_000033.xml").unlink()
    assert voc.tags("2007_000033").tolist() == [11]


def test_semantic_label_priority_across_label_dirs(voc_root):
    voc = VOCDataset(voc_root)
    voc_label = voc.read_semantic("2007_000032")  # both folders have it: SegmentationClass wins
    assert voc_label.dtype == np.uint8 and voc_label.shape == (6, 8)
    assert sorted(np.unique(voc_label).tolist()) == [0, 1, 15, 255]
    sbd = voc.read_semantic("2007_000033")  # only SBD's grayscale map
    assert sbd[4, 6] == 12 and sbd[0, 0] == 0
    assert voc.has_semantic("2007_000033") and not voc.has_semantic("2008_000002")
    aug_first = VOCDataset(voc_root, label_dirs=("SegmentationClassAug", "SegmentationClass"))
    assert np.all(aug_first.read_semantic("2007_000032") == 3)
    with pytest.raises(UserError, match="2008_000002.*SegmentationClass"):
        voc.read_semantic("2008_000002")


def test_semantic_label_beyond_classes_is_an_error(voc_root):
    voc = VOCDataset(voc_root, classes=("aeroplane", "bicycle"))
    with pytest.raises(UserError, match="label 15.*data.classes"):
        voc.read_semantic("2007_000032")


def test_instances_classes_by_majority_and_void(voc_root):
    # Two instances of class 1 and one of class 15; instance 3's semantic pixels are mostly 15
    # with one stray 1 and some void; VOC object indices need not be contiguous.
    semantic = np.zeros((6, 8), np.uint8)
    objects = np.zeros((6, 8), np.uint8)
    objects[0:2, 0:3] = 1
    semantic[0:2, 0:3] = 1
    objects[3:5, 0:2] = 2
    semantic[3:5, 0:2] = 1
    objects[2:6, 4:8] = 5
    semantic[2:6, 4:8] = 15
    semantic[2, 4] = 1
    semantic[3, 4:8] = 255  # void pixels do not vote
    objects[:, 3] = 255
    semantic[:, 3] = 255
    write_label_png(voc_root / "SegmentationClass/2007_000032.png", semantic)
    write_label_png(voc_root / "SegmentationObject/2007_000032.png", objects)
    voc = VOCDataset(voc_root)
    assert voc.has_instances("2007_000032") and not voc.has_instances("2007_000033")
    ids, classes = voc.read_instances("2007_000032")
    assert ids.dtype == np.uint16 and ids.shape == (6, 8)
    assert classes.dtype == np.int64 and classes.tolist() == [1, 1, 15]
    expected = np.zeros((6, 8), np.uint16)
    expected[objects == 1] = 1
    expected[objects == 2] = 2
    expected[objects == 5] = 3
    expected[objects == 255] = 65535
    np.testing.assert_array_equal(ids, expected)


def test_instances_with_mismatched_sizes_is_an_error(voc_root):
    write_label_png(voc_root / "SegmentationObject/2007_000032.png", np.ones((3, 3), np.uint8))
    with pytest.raises(UserError, match="SegmentationObject.*must match"):
        VOCDataset(voc_root).read_instances("2007_000032")


def test_malicious_cls_labels_is_refused_not_executed(tmp_path):
    import os

    import pytest

    from wsseg.data.voc import load_pickled_npy

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "cls_labels.npy"
    np.save(path, np.array({"2007_000032": Evil()}, dtype=object), allow_pickle=True)  # a crafted cls_labels.npy
    with pytest.raises(Exception, match="refusing"):
        load_pickled_npy(path)
    assert not marker.exists()
    good = tmp_path / "good.npy"
    np.save(good, {2007000032: np.array([0, 1], np.float32)})
    assert np.array_equal(load_pickled_npy(good)[2007000032], [0, 1])
