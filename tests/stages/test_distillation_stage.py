"""train-segmenter with segmenter.teacher: the student learns with the teacher's two terms, the record
says who taught it, and a teacher that does not exist (or cannot be one) is one line before training."""

import pytest

from wsseg import pipeline
from wsseg.errors import UserError
from wsseg.store import RunStore

from tiny import tiny_config

GT = ("segmenter.labels=gt", "segmenter.eval_mode=single", "segmenter.iterations=10")


def test_a_student_trains_with_a_teacher_of_the_run(tiny_data, tmp_path):
    import wsseg.stages.train_segmenter as train_segmenter

    run = tmp_path / "run"
    student_config = tiny_config(tiny_data, run, *GT, "segmenter.model=fcn8s", "segmenter.teacher=deeplab-v2",
                                 "segmenter.iterations=40")  # a few epochs: the curve has points to compare
    # no teacher yet: one line naming the key and the command, and nothing trained
    with pytest.raises(UserError) as error:
        pipeline.run_stage(train_segmenter.STAGE, student_config)
    message = str(error.value)
    assert message.startswith("segmenter.teacher: no deeplab-v2 trained on gt labels in ")
    assert "--set segmenter.model=deeplab-v2" in message and "\n" not in message
    assert not list((run / "segmenter").rglob("*.pt"))

    # the teacher, at another width than the student: model.pt records how to build it
    pipeline.run_stage(train_segmenter.STAGE, tiny_config(tiny_data, run, *GT, "segmenter.width=0.5"))
    pipeline.run_stage(train_segmenter.STAGE, student_config)
    record = RunStore(run).record("segmenter/fcn8s")
    assert record["metrics"]["gt"]["teacher"] == {"model": "deeplab-v2", "labels": "gt", "pixel": 10.0, "pair": 1.0}
    curves = record["curves"]["gt"]
    assert curves["distill_pixel"][-1] < curves["distill_pixel"][0]
    assert 0 <= record["metrics"]["gt"]["miou_single"] <= 1

    # the teacher and its weights are in the student's fingerprint; without a teacher the weights are not
    plain = tiny_config(tiny_data, run, *GT, "segmenter.model=fcn8s", "segmenter.iterations=40")
    heavier = tiny_config(tiny_data, run, *GT, "segmenter.model=fcn8s", "segmenter.iterations=40", "segmenter.distill_pixel=1.0")
    assert pipeline.fingerprint(train_segmenter.STAGE, plain) != pipeline.fingerprint(train_segmenter.STAGE, student_config)
    assert pipeline.fingerprint(train_segmenter.STAGE, plain) == pipeline.fingerprint(train_segmenter.STAGE, heavier)
    assert pipeline.fingerprint(train_segmenter.STAGE, student_config) != pipeline.fingerprint(
        train_segmenter.STAGE, tiny_config(tiny_data, run, *GT, "segmenter.model=fcn8s", "segmenter.teacher=deeplab-v2",
                                           "segmenter.iterations=40", "segmenter.distill_pixel=1.0"))


@pytest.mark.parametrize("teacher, start", [
    ("deeplab-v9", "segmenter.teacher: unknown model 'deeplab-v9'"),
    ("deeplab-v2/train", "segmenter.teacher: 'deeplab-v2/train' names label source 'train'"),
    ("fcn8s", "segmenter.teacher: fcn8s is the student itself"),
    ("maxdeeplab", "segmenter.teacher: distillation is for semantic segmenters, and maxdeeplab is panoptic"),
])
def test_a_teacher_that_cannot_be_one_is_one_line(tiny_data, tmp_path, teacher, start):
    import wsseg.stages.train_segmenter as train_segmenter

    config = tiny_config(tiny_data, tmp_path / "run", *GT, "segmenter.model=fcn8s", f"segmenter.teacher={teacher}")
    with pytest.raises(UserError) as error:
        pipeline.run_stage(train_segmenter.STAGE, config)
    assert str(error.value).startswith(start) and "\n" not in str(error.value)
