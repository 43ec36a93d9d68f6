# The two commands a new user runs: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
WSSEG  := $(VENV)/bin/wsseg
# torch first and pinned, so pip never resolves a newer (CUDA, several GB) build.
# On a GPU machine: make demo TORCH_SPEC="torch --index-url <your CUDA wheel index>"
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.installed
DEMO_DATA := data/demo
DEMO_CONFIG := pipelines/demo.yaml

.PHONY: demo test bench install clean-demo

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test,coco,plots,tensorboard]"
	touch $(STAMP)

$(DEMO_DATA)/ImageSets/Segmentation/val.txt: | $(STAMP)
	$(WSSEG) demo-data --out $(DEMO_DATA)

demo: $(STAMP) $(DEMO_DATA)/ImageSets/Segmentation/val.txt
	$(WSSEG) run-all --config $(DEMO_CONFIG)

# Two workers, one per core of the 2-core machine the suite is sized for: every test runs torch on
# one thread (tests/conftest.py), so a serial run leaves a core idle (604 s serial, 314 s with two).
test: $(STAMP)
	$(PY) -m pytest -q -n 2

bench: $(STAMP) $(DEMO_DATA)/ImageSets/Segmentation/val.txt
	$(PY) benchmarks/run_all.py

clean-demo:
	rm -rf runs/demo
