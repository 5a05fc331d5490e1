# `make demo` and `make test` work on a fresh clone: they create .venv, install the CPU build of
# torch where none is present, Debian's graphviz (for `dot`) and chromium + chromium-driver (the
# page's browser tests) when running as root, and the package.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
# The suite on every core, at most four (pytest-xdist; a test file's tests stay on one worker, so its
# module fixtures are built once).
PARALLEL := -n auto --maxprocesses 4 --dist loadfile
BENCH  ?= /tmp/lineage-bench
# torch's CPU build comes from PyTorch's own index: PyPI's Linux torch wheels are CUDA builds, which
# bring several GB of CUDA libraries and Triton. Its dependencies come from PyPI with the package.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: setup test test-fast lint demo bench-hash bench-registry bench-merge bench-kernels bench-apply bench-extract bench-unet clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@command -v dot >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq graphviz >/dev/null; } \
		|| echo "note: graphviz's dot is missing (install the graphviz package to render PNG/SVG trees)"
	@# Debian's Chromium and its driver: the tree page's browser tests (tests/test_page.py) drive them
	@# through selenium; nothing downloads a browser of its own. About 80 s the first time.
	@{ command -v chromium && command -v chromedriver; } >/dev/null 2>&1 \
		|| { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null; } \
		|| echo "note: chromium/chromedriver are missing: the page's browser tests will be skipped"
	@[ -x $(PY) ] || python3 -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q --no-deps --index-url $(TORCH_INDEX) torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

# The whole suite, the tests marked slow (sd-mecha comparisons, larger files) included: what CI runs.
# ruff first (every rule in pyproject.toml's [tool.ruff], line length 120 included), mypy on the
# public API ([tool.mypy]), then the suite on every core ($(PARALLEL)).
test: setup
	$(PY) -m ruff check .
	$(PY) -m mypy
	$(PY) -m pytest $(PARALLEL)

# The suite without the tests marked slow, for quick runs while working.
test-fast: setup
	$(PY) -m pytest $(PARALLEL) -m "not slow"

# ruff with the rules in pyproject.toml ([tool.ruff]), and mypy on the public API ([tool.mypy]).
lint: setup
	$(PY) -m ruff check .
	$(PY) -m mypy

demo: setup
	$(PY) examples/demo.py

# Hash a full-size generated SDXL checkpoint (6.9 GB, written to $(BENCH)) beside `openssl dgst -sha256`.
bench-hash: setup
	$(PY) benchmarks/bench_hash.py --dir $(BENCH)

# A 100,000-node registry: open, ancestors of the deepest node, a 200-node subtree to DOT, beside baselines.
bench-registry: setup
	$(PY) benchmarks/bench_registry.py

# Merges of full-size generated SDXL checkpoints beside the I/O floor and sd-mecha (installs the bench extra).
bench-merge: setup
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) benchmarks/bench_merge.py

# The Triton kernels (adapters and merge) beside the torch path and the GPU's memory bandwidth; needs a CUDA
# build of torch and the cuda extra (without a CUDA device it says so and exits 0).
bench-kernels: setup
	$(PY) benchmarks/bench_kernels.py

# `lmerge apply` of a rank-64 LoRA on a full-size generated SDXL checkpoint beside the I/O floor.
bench-apply: setup
	$(PY) benchmarks/bench_apply.py

# Extraction of a rank-64 LoRA from a full-size generated fine-tune beside kohya's algorithm (timed on one module
# of each shape, scaled to all) and sd-mecha (installs the bench extra). SIZE=tiny|small for a quick run.
SIZE ?= full
bench-extract: setup
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) benchmarks/bench_extract.py --size $(SIZE)

# Our SDXL UNet beside diffusers' UNet2DConditionModel (test extra): a mid-size training step, then the full-size
# forward (~11 GB of RAM per model); about 35 minutes on 2 busy cores. PART=mid|full for one of them.
PART ?= both
bench-unet: setup
	$(PY) benchmarks/bench_unet.py --part $(PART)

clean:
	rm -rf $(VENV) build *.egg-info
