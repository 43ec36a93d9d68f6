"""Config loading, validation messages, overrides and stacking."""

import pytest

from wsseg.config import Config, describe_keys, load_config, parse_override
from wsseg.errors import UserError


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_are_irns_voc_recipe():
    config = load_config()
    assert config.cam.scales == (1.0, 0.5, 1.5, 2.0)
    assert config.cam.lr == 0.1 and config.cam.classifier_lr_mult == 10.0 and config.cam.momentum == 0.0
    assert (config.relations.conf_fg, config.relations.conf_bg) == (0.30, 0.05)
    assert config.labels.sem_background == 0.25 and config.labels.walk_steps == 256 and config.labels.beta == 10.0
    assert config.irn.radius == 10 and config.labels.radius == 5
    assert len(config.data.classes) == 20 and config.data.classes[0] == "aeroplane"


def test_yaml_and_typed_overrides(tmp_path):
    path = write(tmp_path, "a.yaml", "cam:\n  epochs: 3\n  scales: [1.0]\nrun:\n  dir: runs/x\n")
    config = load_config([path], ["cam.scales=[1.0,0.5]", "cam.lr=1", "backbone.weights=null"])
    assert config.cam.epochs == 3
    assert config.cam.scales == (1.0, 0.5)
    assert config.cam.lr == 1.0 and isinstance(config.cam.lr, float)
    assert config.backbone.weights is None
    assert config.run.dir == "runs/x"


def test_scientific_notation_without_a_dot_is_a_number(tmp_path):
    path = write(tmp_path, "a.yaml", "cam:\n  weight_decay: 1e-4\n")  # PyYAML reads this as a string
    assert load_config([path], ["cam.lr=1e30"]).cam.weight_decay == 1e-4
    with pytest.raises(UserError, match="is not a number"):
        load_config([], ["cam.lr=fast"])


def test_stacked_files_later_wins(tmp_path):
    base = write(tmp_path, "base.yaml", "relations:\n  conf_fg: 0.3\n  conf_bg: 0.05\n")
    top = write(tmp_path, "top.yaml", "relations:\n  conf_fg: 0.4\n")
    config = load_config([base, top])
    assert config.relations.conf_fg == 0.4 and config.relations.conf_bg == 0.05


def test_unknown_key_names_closest(tmp_path):
    path = write(tmp_path, "a.yaml", "cam:\n  epoch: 3\n")
    with pytest.raises(UserError, match=r"unknown key 'cam.epoch'.*did you mean 'epochs'"):
        load_config([path])
    with pytest.raises(UserError, match=r"unknown section 'relation'.*'relations'"):
        load_config([], ["relation.conf_fg=0.3"])


def test_wrong_type_and_range_name_key_value_and_allowed(tmp_path):
    path = write(tmp_path, "a.yaml", "cam:\n  epochs: three\n")
    with pytest.raises(UserError, match=r"a.yaml: cam.epochs: 'three' is not an integer"):
        load_config([path])
    with pytest.raises(UserError, match=r"relations.conf_fg: 1.5 is above the maximum 1.0"):
        load_config([], ["relations.conf_fg=1.5"])
    with pytest.raises(UserError, match=r"segmenter.labels: 'fake' is not allowed; use one of: pseudo, gt"):
        load_config([], ["segmenter.labels=fake"])
    with pytest.raises(UserError, match=r"backbone.depth: 42 is not allowed"):
        load_config([], ["backbone.depth=42"])
    with pytest.raises(UserError, match=r"cam.resize_long: .* is not a list of 2 values"):
        load_config([], ["cam.resize_long=[1,2,3]"])
    with pytest.raises(UserError, match=r"cam.epochs: True is not an integer"):
        load_config([], ["cam.epochs=true"])


def test_consistency_checks():
    with pytest.raises(UserError, match="relations.conf_bg"):
        load_config([], ["relations.conf_bg=0.5", "relations.conf_fg=0.3"])
    with pytest.raises(UserError, match="cam.train_stages"):
        load_config([], ["cam.train_stages=[layer5]"])


def test_bad_files(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config([tmp_path / "missing.yaml"])
    bad = write(tmp_path, "bad.yaml", "cam: [unclosed\n")
    with pytest.raises(UserError, match=r"bad.yaml line \d+: not valid YAML"):
        load_config([bad])
    listy = write(tmp_path, "list.yaml", "- a\n- b\n")
    with pytest.raises(UserError, match="mapping of sections"):
        load_config([listy])


def test_override_syntax():
    assert parse_override("cam.scales=[1.0, 2.0]") == ("cam", "scales", [1.0, 2.0])
    with pytest.raises(UserError, match="KEY=VALUE"):
        parse_override("cam.scales")
    with pytest.raises(UserError, match="SECTION.KEY"):
        parse_override("scales=1")


def test_config_is_frozen_and_describable():
    config = Config()
    with pytest.raises(Exception):
        config.cam.epochs = 2  # type: ignore[misc]
    text = describe_keys()
    assert "conf_fg: 0.3" in text and "# background score" in text


def test_shipped_pipelines_load():
    for name in ("pipelines/voc.yaml", "pipelines/demo.yaml"):
        load_config([name])
