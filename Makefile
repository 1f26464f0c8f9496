# Two commands on a fresh machine:
#   make demo   installs into .venv, exports a model, computes distances on sample photos,
#               prints a short ONNX Runtime vs PyTorch speed table
#   make test   installs into .venv and runs the test suite
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test install bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test,plot]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/perceptual-engine demo

test: $(VENV)/.installed
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(VENV)/bin/perceptual-engine bench --quick

clean:
	rm -rf $(VENV) out bench-out
