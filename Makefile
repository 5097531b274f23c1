# onnx-merge: the two commands a newcomer needs are `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
FASHION := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz

.PHONY: install demo test test-slow fashion reproduce bench large fuzz clean

$(BIN)/onnx-merge: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[cpu,test,bench,ray]'
	@touch $@

install: $(BIN)/onnx-merge

# Test-only extras for the exporter tests: torch (a local CPU wheel on these machines; torchvision
# pinned beside it so that nothing pulls a CUDA build of torch), transformers and timm for real
# architectures with random weights.
$(VENV)/.torch: $(BIN)/onnx-merge
	-$(BIN)/pip install -q torch==2.13.0 torchvision==0.28.0 onnxscript transformers timm && touch $@

fashion:
	@test -f $(FASHION) || (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	  (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1)) || \
	  echo "FashionMNIST could not be installed: the tests that need it will say so and skip"

demo: install
	$(BIN)/python benchmarks/export_models.py out
	$(BIN)/onnx-merge inspect out/lenet_300_100.onnx
	$(BIN)/onnx-merge compress out/lenet_300_100.onnx -o out/lenet_300_100_merged.onnx --ratio 0.5 \
	  --report out/lenet_300_100_merged.json

test: install fashion $(VENV)/.torch
	$(BIN)/python -m pytest

test-slow: install fashion
	$(BIN)/python -m pytest -m slow

reproduce: install fashion
	$(BIN)/python benchmarks/reproduce.py

bench: install $(VENV)/.torch
	$(BIN)/python benchmarks/speed.py
	$(BIN)/python benchmarks/latency.py out/arch

large: install
	$(BIN)/python benchmarks/large_model.py

fuzz: install
	FUZZ_EXAMPLES=2000 $(BIN)/python -m pytest tests/test_fuzz.py

clean:
	rm -rf out .pytest_cache
