"""The command line as a user meets it: exit codes, one-line errors, --debug."""

import subprocess
import sys



def wsseg(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "wsseg.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=120)


def one_line_error(result, code, *fragments):
    assert result.returncode == code, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("wsseg: error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_missing_config_file(tmp_path):
    one_line_error(wsseg("status", "--config", tmp_path / "nope.yaml"), 2, "config file not found", "nope.yaml")


def test_unknown_key_names_the_closest(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("cam:\n  epoch: 3\n")
    one_line_error(wsseg("status", "--config", config), 2, "unknown key 'cam.epoch'", "did you mean 'epochs'")


def test_bad_value_in_override():
    one_line_error(wsseg("status", "--config", "pipelines/demo.yaml", "--set", "relations.conf_fg=2"), 2,
                   "relations.conf_fg", "above the maximum")


def test_missing_dataset_root_names_the_key(tmp_path):
    result = wsseg("train-cam", "--config", "pipelines/demo.yaml", "--set", f"data.root={tmp_path / 'missing'}",
                   "--set", f"run.dir={tmp_path / 'run'}")
    one_line_error(result, 2, "data.root")


def test_debug_shows_the_traceback(tmp_path):
    result = wsseg("--debug", "status", "--config", tmp_path / "nope.yaml")
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "UserError" in result.stderr


def test_usage_error_exits_2():
    result = wsseg("status")
    assert result.returncode == 2
    assert "--config" in result.stderr


def test_unknown_command_exits_2():
    assert wsseg("frobnicate").returncode == 2


def test_demo_data_and_status(tmp_path):
    out = tmp_path / "demo"
    result = wsseg("demo-data", "--out", out, "--images", 8, "--size", 48)
    assert result.returncode == 0, result.stderr
    assert (out / "ImageSets" / "Segmentation" / "train.txt").exists()
    result = wsseg("status", "--config", "pipelines/demo.yaml", "--set", f"data.root={out}", "--set", f"run.dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr
    assert "train-cam" in result.stdout and "missing" in result.stdout


def test_run_dir_inside_the_dataset_is_refused(tmp_path):
    out = tmp_path / "demo"
    assert wsseg("demo-data", "--out", out, "--images", 4, "--size", 48).returncode == 0
    result = wsseg("train-cam", "--config", "pipelines/demo.yaml", "--set", f"data.root={out}", "--set", f"run.dir={out}")
    one_line_error(result, 2, "run.dir", "data.root")


def test_config_prints_the_resolved_config_and_names_a_bad_option():
    result = wsseg("config", "--config", "pipelines/demo.yaml", "--set", "segmenter.options.deeplab-v3.output_stride=8")
    assert result.returncode == 0, result.stderr
    assert "root: data/demo" in result.stdout and "deeplab-v3: {output_stride: 8}" in result.stdout
    one_line_error(wsseg("config", "--set", "segmenter.options.maxdeeplab.num_slot=16"), 2,
                   "segmenter.options.maxdeeplab", "did you mean 'num_slots'")
    keys = wsseg("config", "--keys")
    assert keys.returncode == 0 and "conf_fg: 0.3" in keys.stdout and "maxdeeplab: output_stride=16" in keys.stdout


def test_running_out_of_memory_is_one_sentence_pointing_to_max_side():
    """A stage that runs out of memory (numpy's MemoryError, torch's allocator) ends with one line that says
    what to do (data.max_side) and exit code 1, not a traceback."""
    import subprocess
    import sys

    from wsseg.cli import out_of_memory

    assert out_of_memory(MemoryError()) and not out_of_memory(ValueError("x"))
    assert out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough memory: "
                                      "you tried to allocate 8000000000 bytes."))
    script = ("import click, wsseg.cli as c\n"
              "@c.cli.command('hog')\n"
              "def hog():\n"
              "    import numpy\n"
              "    numpy.zeros((1 << 62,), dtype=numpy.uint8)\n"
              "c.main()\n")
    result = subprocess.run([sys.executable, "-c", script, "hog"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("wsseg: error: out of memory (")
    assert "set data.max_side" in lines[0]
