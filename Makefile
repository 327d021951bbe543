# The two set-up commands of the README: `make book` and `make test`.
# Each creates .venv when missing and installs what it needs.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The torch build to install when the environment has none. Pinned here (not in pyproject.toml,
# which only gives lower bounds) so a fresh machine takes the CPU build it has on disk instead of
# pulling a multi-GB CUDA build. Override with `make TORCH_SPEC=torch ...` elsewhere.
TORCH_SPEC ?= torch==2.13.0
# Tests use both cores: one pytest worker per core.
WORKERS ?= 2

.PHONY: book test sandbox margins exercises timings screenshots format device-check bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.book-installed: $(BIN)/python pyproject.toml
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[book]"
	touch $@

$(VENV)/.test-installed: $(BIN)/python pyproject.toml
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

## Execute every notebook (automatic profile: quick, on CUDA when there is one) and build _build/html.
book: $(VENV)/.book-installed
	$(BIN)/python -m icl_course.course.book_cache _build/.jupyter_cache
	$(BIN)/jupyter-book build . --warningiserror --keep-going

## bubblewrap, the sandbox `icl-course grade` runs submissions in (Debian, as root; never fails:
## without it the grader, and its tests, fall back to what the machine allows).
sandbox:
	@command -v bwrap >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		{ apt-get install -y -qq bubblewrap >/dev/null 2>&1 || \
		  { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq bubblewrap >/dev/null 2>&1; }; }; } || \
		echo "make: bubblewrap not installed; icl-course grade will use a weaker sandbox"

## Unit tests, headline-claim tests and every notebook (smoke profile) through nbval.
test: $(VENV)/.test-installed sandbox
	ICL_COURSE_PROFILE=smoke OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n $(WORKERS) --dist loadfile \
		--nbval-lax --nbval-current-env tests chapters exercises

## Measure every claim test over seeds 0-4 and 1 and 2 threads into tests/margins.md (about 30 minutes);
## MARGINS="-k preconditioning" measures only the matching claims and keeps the others' rows.
margins: $(VENV)/.test-installed
	$(BIN)/python tests/margins.py $(MARGINS)

## Regenerate the student versions of the exercises and their book pages from their solution sources.
exercises: $(VENV)/.test-installed
	$(BIN)/python -m icl_course.course.notebooks student exercises/solutions exercises
	$(BIN)/python -m icl_course.course.notebooks book exercises/solutions exercises/book

## Measure every chapter's run time in the quick profile (or PROFILE=full on a GPU) into timings.json;
## CHAPTERS="05_ttt 06_looped" measures only those and keeps the others' times.
timings: $(VENV)/.book-installed
	$(BIN)/python -m icl_course.course timings $(or $(PROFILE),quick) $(CHAPTERS)

## Screenshots of every page of the built book and a report of what a reader would trip over (code
## wider than the column, raw TeX, figures without captions); needs `make book` first and Chromium.
screenshots: $(VENV)/.book-installed
	command -v chromium >/dev/null || apt-get install -y -q chromium fonts-noto-color-emoji
	$(BIN)/pip install --quiet -e ".[screenshots]"
	$(BIN)/python -m icl_course.course.screenshots _build/html --out _build/screenshots

## Format the notebooks' code to fit the book's column (a test checks it is done).
format: $(VENV)/.test-installed
	$(BIN)/python -m ruff format
## On a machine with a GPU (run by whatever python there has torch with CUDA; no install, no network):
## the smoke tests on the GPU, then every chapter in quick and in full, each within a time limit, timed
## into timings.json's GPU columns. Stop it at any point: the same command goes on where it stopped.
## Its logs and results go into OUT (default device-check-logs; results.json and logs.tar.gz hold them all).
## DEVICE=cpu DRY_RUN=1 rehearses it on a CPU in the smoke profile (tests/test_device_check.py does).
DEVICE ?= cuda
DEVICE_PYTHON ?= python3
device-check:
	$(DEVICE_PYTHON) -m icl_course.course device-check --device $(DEVICE) --out $(or $(OUT),device-check-logs) \
		$(if $(DRY_RUN),--dry-run) $(DEVICE_CHECK_ARGS)

## Steps a second of every chapter's training, the share of sampling, and the layer against the naive one
## (benchmarks/speed.py; the README's table); THREADS=2 for two threads.
bench: $(VENV)/.test-installed
	OMP_NUM_THREADS=$(or $(THREADS),1) $(BIN)/python benchmarks/speed.py --threads $(or $(THREADS),1) --markdown

clean:
	rm -rf _build .pytest_cache
