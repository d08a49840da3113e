# Everything a fresh machine needs comes from these targets: `make run`, `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup run test bench image image-offline compile clean

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c requirements.lock -e '.[cpu,dev,vertex]'
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/captioning run

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(VENV)/bin/captioning bench features --images 128 --batch 32 --repeats 3 --json

compile: $(STAMP)
	$(VENV)/bin/captioning compile --output captioning_pipeline.yaml

image: $(STAMP)
	$(VENV)/bin/captioning image build

# No registry reachable: a Debian base made with debootstrap, TensorFlow for CPUs.
image-offline: $(STAMP)
	docker/local-debian-base.sh debian-local:bookworm
	$(VENV)/bin/captioning image build --base-image debian-local:bookworm --variant cpu

clean:
	rm -rf work .pytest_cache
