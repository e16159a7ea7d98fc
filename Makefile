# Two entry points: `make quickstart` and `make test`. Both create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-dev

.PHONY: quickstart test lint benchmark clean

# PyPI's torch with the torchvision built for it (see DEVELOPERS.md: the local CPU wheel
# of torch would break PyPI's torchvision). The import of torchvision.ops proves they match.
$(STAMP): setup.py pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -c "import torch, torchvision.ops; torchvision.ops.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)" \
		|| { echo "torch and torchvision do not match: see DEVELOPERS.md"; exit 1; }
	touch $@

quickstart: $(STAMP)
	$(VENV)/bin/dinospec info configs/quickstart.yaml
	$(PY) -m eval.quickstart configs/quickstart.yaml

test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

benchmark: $(STAMP)
	$(PY) benchmarks/specialize_overhead.py
	$(PY) benchmarks/backbone_vs_reference.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
