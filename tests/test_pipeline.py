"""Stage records, fingerprints, stale detection, resume after a kill, run-all and status."""

from pathlib import Path

import pytest

import fake_stages
from interrupt import kill_when_written
from wsseg import pipeline
from wsseg.config import load_config
from wsseg.errors import UserError

TESTS = Path(__file__).parent


@pytest.fixture
def fakes(monkeypatch):
    monkeypatch.setattr(pipeline, "STAGES", fake_stages.STAGES)
    return fake_stages


def config_for(run_dir, *overrides):
    return load_config([], [f"run.dir={run_dir}", "run.device=cpu", *overrides])


def states(config):
    return {s.name: s for s in pipeline.status(config)}


def test_run_all_then_nothing_to_do(tmp_path, fakes):
    config = config_for(tmp_path / "run")
    assert [s.state for s in pipeline.status(config)] == ["missing", "missing", "missing"]
    pipeline.run_all(config)
    table = states(config)
    assert [s.state for s in table.values()] == ["done", "done", "done"]
    assert table["first"].headline == "loss 0.500"
    before = (tmp_path / "run" / "computed.log").read_text()
    pipeline.run_all(config)  # unchanged config: nothing recomputed
    assert (tmp_path / "run" / "computed.log").read_text() == before


def test_changed_key_makes_that_stage_and_downstream_stale_only(tmp_path, fakes):
    run = tmp_path / "run"
    pipeline.run_all(config_for(run))
    first_record = (run / "first" / "stage.json").read_text()
    changed = config_for(run, "cam.scales=[1.0]")
    table = states(changed)
    assert table["first"].state == "done"
    assert table["items"].state == "stale" and "cam.scales" in table["items"].reason
    assert table["last"].state == "stale"
    (run / "computed.log").unlink()
    pipeline.run_all(changed)
    assert (run / "first" / "stage.json").read_text() == first_record  # upstream untouched
    assert len((run / "computed.log").read_text().split()) == fake_stages.NUM_ITEMS  # stale outputs removed, all redone
    assert "scales=(1.0,)" in (run / "items" / "0000.txt").read_text()
    assert all(s.state == "done" for s in pipeline.status(changed))


def test_forced_upstream_rerun_makes_downstream_stale(tmp_path, fakes):
    run = tmp_path / "run"
    config = config_for(run)
    pipeline.run_all(config)
    pipeline.run_stage(fake_stages.FIRST, config, force=True)
    table = states(config)
    assert table["items"].state == "stale" and "first was rerun" in table["items"].reason


def test_missing_upstream_is_a_clear_error(tmp_path, fakes):
    with pytest.raises(UserError, match=r"items needs first, which is missing; run `wsseg first`"):
        pipeline.run_stage(fake_stages.ITEMS, config_for(tmp_path / "run"))


def test_from_to_select_stages(tmp_path, fakes):
    config = config_for(tmp_path / "run")
    pipeline.run_all(config, stop="items")
    assert [s.state for s in pipeline.status(config)] == ["done", "done", "missing"]
    with pytest.raises(UserError, match="unknown stage"):
        pipeline.run_all(config, start="nope")


SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import fake_stages
from wsseg import pipeline
from wsseg.config import load_config
pipeline.STAGES = fake_stages.STAGES
config = load_config([], ["run.dir={run}", "run.device=cpu"])
pipeline.run_stage(fake_stages.FIRST, config)
pipeline.run_stage(fake_stages.ITEMS, config)
"""


def test_killed_per_item_stage_resumes_without_redoing_finished_items(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    items = run / "items"
    kill_when_written(SCRIPT.format(tests=str(TESTS), run=str(run)), tmp_path, str(items / "0*.txt"), count=5)
    finished = sorted(p.name for p in items.glob("0*.txt"))
    assert len(finished) == 5

    config = config_for(run)
    import fake_stages as fs  # the same module the subprocess used
    original = pipeline.STAGES
    pipeline.STAGES = fs.STAGES
    try:
        table = states(config)
        assert table["items"].state == "partial"
        assert table["items"].items == f"{len(finished)}/{fs.NUM_ITEMS}"
        computed_before = (run / "computed.log").read_text().split()
        pipeline.run_stage(fs.ITEMS, config)
    finally:
        pipeline.STAGES = original
    computed_after = (run / "computed.log").read_text().split()[len(computed_before):]
    finished_indices = {str(int(name[:4])) for name in finished}
    assert not finished_indices & set(computed_after)  # nothing finished was redone
    assert len(computed_after) == fs.NUM_ITEMS - len(finished)
    assert not list(items.glob(".tmp-*"))  # no half-written file left behind


def test_an_option_at_its_neutral_value_stays_out_of_the_fingerprint():
    """cam.dilations came after runs existed: at [] (no extra heads: what wsseg did before the key)
    it must not change train-cam's fingerprint, or every earlier run would turn stale."""
    from wsseg.stages.train_cam import STAGE

    plain = pipeline.selected_config(load_config(), STAGE.selectors(load_config()))
    assert "cam.dilations" not in plain and "cam.epochs" in plain
    dilated = load_config([], ["cam.dilations=[3,6]"])
    chosen = pipeline.selected_config(dilated, STAGE.selectors(dilated))
    assert chosen["cam.dilations"] == (3, 6) and {k: v for k, v in chosen.items() if k != "cam.dilations"} == plain
