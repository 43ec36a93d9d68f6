"""Adding a stage is one `Stage` object and one line in `pipeline.STAGES`.

A stage registered in a temporary list gets its command, its `status` row, its `report`
row and its `eval --stage` name without any other code being touched; a broken list or a
stage module that fails to import is an error, never a silently missing stage.
"""

import subprocess
import sys

import pytest
from click.testing import CliRunner

import fake_stages
from wsseg import pipeline
from wsseg.cli import cli
from wsseg.errors import UserError
from wsseg.stage import Stage, check_stages, fmt
from wsseg.store import atomic_path, read_json


def _run_count(ctx):
    """Counts the files of the fake `items` stage and writes the count as its artifact."""
    count = len(list(ctx.store.folder("items").glob("[0-9]*.txt")))
    with atomic_path(ctx.folder("count") / "count.json") as tmp:
        tmp.write_text(f'{{"files": {count}}}')
    return {"metrics": {"share": count / fake_stages.NUM_ITEMS}}


def _evaluate_count(config, store, progress):
    return {"files": read_json(store.folder("count") / "count.json")["files"]}


COUNT = Stage(
    name="count-items",
    help="Count what the items stage wrote.",
    run=_run_count,
    outputs=("count",),
    needs=("items",),
    reads=("labels.beta",),
    headline="share",
    quality=lambda metrics: f"share of items written {fmt(metrics.get('share'))}",
    evaluators={"item-files": _evaluate_count},
)


@pytest.fixture
def with_count_stage(monkeypatch, tmp_path):
    monkeypatch.setattr(pipeline, "STAGES", (*fake_stages.STAGES, COUNT))
    config = tmp_path / "run.yaml"
    config.write_text(f"run:\n  dir: {tmp_path / 'run'}\n  device: cpu\n")
    return str(config)


def invoke(*args):
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_a_registered_stage_gets_its_command_status_report_and_eval(with_count_stage):
    assert "count-items" in invoke("--help") and "Count what the items stage wrote." in invoke("--help")
    assert "item-files" in invoke("eval", "--help")
    table = invoke("status", "--config", with_count_stage)
    assert "count-items" in table and "waits for items" in table

    invoke("run-all", "--config", with_count_stage, "--to", "items")
    assert "count-items  done" in invoke("count-items", "--config", with_count_stage)
    assert "share 1.000" in invoke("status", "--config", with_count_stage)
    assert "| count-items | share of items written 1.000 |" in invoke("report", "--config", with_count_stage).replace("  ", "")
    assert '"files": 20' in invoke("eval", "--config", with_count_stage, "--stage", "item-files")


def test_the_shipped_pipeline_is_consistent():
    check_stages(pipeline.STAGES)
    assert [s.name for s in pipeline.STAGES] == ["train-cam", "make-cam", "train-amn", "make-amn-cam", "mine-relations",
                                                 "train-irn", "synthesize-labels", "train-segmenter"]
    assert pipeline.evaluation_names() == ["cams", "amn-cams", "relations", "semantic", "instance", "panoptic", "segmenter"]
    from wsseg.config import Config

    for stage in pipeline.STAGES:  # a switch is a boolean key, off by default
        if stage.switch is not None:
            assert Config().get(stage.switch) is False, stage.name


def _run_extra(ctx):
    with atomic_path(ctx.folder("extra") / "extra.txt") as tmp:
        tmp.write_text("extra")
    return {"metrics": {"extra": 1.0}}


EXTRA = Stage(name="extra", help="An optional stage.", run=_run_extra, outputs=("extra",), needs=("first",),
              switch="cam.amn")
# `last` as it would be declared once `extra` exists: it reads extra's output when that is on
LAST_WITH_EXTRA = Stage(name="last", help="reads both", run=fake_stages.LAST.run, outputs=("last",),
                        needs=("first", "extra", "items"), reads=("labels.beta",))


def test_a_switched_off_stage_is_passed_by_and_does_not_touch_its_readers(monkeypatch, tmp_path):
    """An optional stage that is off: run-all skips it, its readers' fingerprints are what they
    were before it existed, its own command refuses with the key to set; on, it runs and its
    readers are rerun after it."""
    config = tmp_path / "run.yaml"
    config.write_text(f"run:\n  dir: {tmp_path / 'run'}\n  device: cpu\n")
    monkeypatch.setattr(pipeline, "STAGES", fake_stages.STAGES)  # the pipeline before `extra` existed
    invoke("run-all", "--config", str(config))
    record_before = read_json(tmp_path / "run" / "last" / "stage.json")

    monkeypatch.setattr(pipeline, "STAGES", (fake_stages.FIRST, EXTRA, fake_stages.ITEMS, LAST_WITH_EXTRA))
    table = invoke("status", "--config", str(config))
    assert "extra  off (cam.amn is false)" in table and "last   done" in table
    invoke("run-all", "--config", str(config))
    assert read_json(tmp_path / "run" / "last" / "stage.json")["token"] == record_before["token"]  # not rerun
    assert not (tmp_path / "run" / "extra").exists()
    result = CliRunner().invoke(cli, ["extra", "--config", str(config)])
    assert isinstance(result.exception, UserError)  # `wsseg` prints it as one line and exits 2
    assert "extra is off: it runs when cam.amn is true" in str(result.exception)

    invoke("run-all", "--config", str(config), "--set", "cam.amn=true")
    assert (tmp_path / "run" / "extra" / "extra.txt").read_text() == "extra"
    after = read_json(tmp_path / "run" / "last" / "stage.json")
    assert after["token"] != record_before["token"] and set(after["needs"]) == {"first", "extra", "items"}
    assert "| extra |" in invoke("report", "--config", str(config), "--set", "cam.amn=true").replace("  ", "")
    assert "| extra |" not in invoke("report", "--config", str(config)).replace("  ", "")


def test_a_broken_list_is_refused():
    with pytest.raises(ValueError, match="needs items, which is not an earlier stage"):
        check_stages((COUNT, *fake_stages.STAGES))
    with pytest.raises(ValueError, match="two stages are named first"):
        check_stages((*fake_stages.STAGES, fake_stages.FIRST))
    twice = Stage(name="again", help="", run=_run_count, outputs=("again",), evaluators={"item-files": _evaluate_count})
    with pytest.raises(ValueError, match="item-files is claimed by count-items and again"):
        check_stages((*fake_stages.STAGES, COUNT, twice))
    with pytest.raises(ValueError, match="at least one output folder"):
        Stage(name="nothing", help="", run=_run_count, outputs=())
    with pytest.raises(TypeError, match="tuples of strings"):
        Stage(name="typo", help="", run=_run_count, outputs=("x",), needs="items")


def test_a_stage_module_that_fails_to_import_fails_the_pipeline():
    """A typo in a stage module must stop wsseg with that error, not drop the stage from the list."""
    script = ("import sys; sys.modules['wsseg.stages.mine_relations'] = None\n"
              "import wsseg.pipeline\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "ModuleNotFoundError" in result.stderr or "ImportError" in result.stderr
    assert "wsseg.stages.mine_relations" in result.stderr
