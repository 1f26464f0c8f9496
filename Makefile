# Two commands on a fresh machine:
#   make demo   installs into .venv, exports a model, computes distances on sample photos,
#               prints a short ONNX Runtime vs PyTorch speed table
#   make test   installs into .venv (with every optional extra the tests cover) and runs
#               the test suite
# Both install the exact versions in constraints.txt; pyproject.toml declares the ranges.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q -c constraints.txt

.PHONY: demo test install bench clean

$(VENV)/.venv-created:
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	touch $@

# The demo needs the base install, plots, the lpips and DISTS weights (their columns) and OpenVINO (its row).
$(VENV)/.installed-demo: pyproject.toml constraints.txt $(VENV)/.venv-created
	$(PIP) -e '.[plot,lpips,openvino,dists]'
	touch $@

# The tests cover every optional feature (lpips, ray, triton, openvino, dists, torchmetrics).
$(VENV)/.installed-test: pyproject.toml constraints.txt $(VENV)/.venv-created
	$(PIP) -e '.[test,plot]'
	touch $@

install: $(VENV)/.installed-test

demo: $(VENV)/.installed-demo
	$(VENV)/bin/perceptual-engine demo

test: $(VENV)/.installed-test
	$(PY) -m pytest -q

bench: $(VENV)/.installed-demo
	$(VENV)/bin/perceptual-engine bench --quick

clean:
	rm -rf $(VENV) out bench-out
