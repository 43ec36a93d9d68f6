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


# ---------------------------------------------------------------------------- per-model options

def test_model_options_stack_key_by_key_across_files_overlays_and_set(tmp_path):
    from wsseg.config import apply_overlay

    base = write(tmp_path, "base.yaml", "segmenter:\n  options:\n    maxdeeplab: {num_slots: 16, pixel_dim: 32}\n"
                                        "    deeplab-v3: {output_stride: 8}\n")
    more = write(tmp_path, "more.yaml", "segmenter:\n  options:\n    maxdeeplab: {num_slots: 24}\n")
    config = load_config([base, more], ["segmenter.options.pspnet.bins=[1,2]"])
    assert config.segmenter.options == {"maxdeeplab": {"num_slots": 24, "pixel_dim": 32},
                                        "deeplab-v3": {"output_stride": 8}, "pspnet": {"bins": (1, 2)}}
    overlay = write(tmp_path, "overlay.yaml", "segmenter:\n  options:\n    deeplab-v3: {aux: false}\n")
    stacked = apply_overlay(config, overlay)
    assert stacked.segmenter.options["deeplab-v3"] == {"output_stride": 8, "aux": False}
    assert stacked.segmenter.options["maxdeeplab"]["pixel_dim"] == 32
    with pytest.raises(TypeError):
        config.segmenter.options["maxdeeplab"]["num_slots"] = 3  # frozen like every config value


def test_model_option_errors_name_the_file_the_key_and_the_closest_option(tmp_path):
    path = write(tmp_path, "a.yaml", "segmenter:\n  options:\n    maxdeeplab: {num_slot: 16}\n")
    with pytest.raises(UserError, match=r"a.yaml: segmenter.options.maxdeeplab: model 'maxdeeplab' has no option "
                                        r"'num_slot' \(did you mean 'num_slots'\?\)"):
        load_config([path])
    with pytest.raises(UserError, match=r"segmenter.options: unknown model 'maxdeplab' \(did you mean 'maxdeeplab'\?\)"):
        load_config([], ["segmenter.options.maxdeplab.num_slots=3"])
    with pytest.raises(UserError, match=r"segmenter.options.maxdeeplab.num_slots: 'many' is not an integer"):
        load_config([], ["segmenter.options.maxdeeplab.num_slots=many"])
    with pytest.raises(UserError, match=r"segmenter.model: unknown model 'deeplab-v9' \(did you mean 'deeplab-v3'\?\)"):
        load_config([], ["segmenter.model=deeplab-v9"])


def test_moved_keys_say_where_they_went():
    with pytest.raises(UserError, match=r"'segmenter.num_slots' is now 'segmenter.options.maxdeeplab.num_slots'"):
        load_config([], ["segmenter.num_slots=16"])
    with pytest.raises(UserError, match=r"'segmenter.aux' is now 'segmenter.options.<model>.aux'"):
        load_config([], ["segmenter.aux=false"])


def test_only_the_chosen_models_options_change_the_segmenter_fingerprint():
    from wsseg.pipeline import selected_config
    from wsseg.stages.train_segmenter import STAGE

    def inputs(*overrides):
        config = load_config([], list(overrides))
        return selected_config(config, STAGE.selectors(config))

    plain = inputs()
    assert inputs("segmenter.options.maxdeeplab.num_slots=64") == plain  # another model's option
    assert inputs("segmenter.options.deeplab-v2.msc=true") != plain  # the chosen model's own
    chosen = inputs("segmenter.model=maxdeeplab", "segmenter.options.maxdeeplab.num_slots=64")
    assert chosen["segmenter.options.maxdeeplab"] == {"num_slots": 64}


def test_the_config_command_prints_a_config_that_loads_back_the_same(tmp_path):
    from wsseg.config import to_yaml

    config = load_config(["pipelines/demo.yaml"], ["segmenter.options.maxdeeplab.num_slots=16"])
    resolved = write(tmp_path, "resolved.yaml", to_yaml(config))
    again = load_config([resolved])
    assert again.to_dict() == config.to_dict()
