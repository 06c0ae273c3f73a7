# plgk: `make demo` installs into .venv and runs the digits demo; `make test` runs the test suite.
VENV ?= .venv
PY := $(VENV)/bin/python
PLGK := $(VENV)/bin/plgk
DEMO_RUN ?= runs/demo
DEMO_LM_RUN ?= runs/demo-lm

.PHONY: install demo demo-lm test bench clean

# Without a GPU, take torch's CPU wheel first: a bare `torch` requirement can pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(PLGK) train --config configs/demo.toml --out $(DEMO_RUN) --overwrite
	$(PLGK) replay --ckpts $(DEMO_RUN) --audit-set 'test[:64]' --rule adaptive:1e-2 --out $(DEMO_RUN).h5 --overwrite
	$(PLGK) inspect $(DEMO_RUN).h5
	$(PLGK) inspect $(DEMO_RUN).h5 --audit 0 --top 5

# A byte-level GPT on two-digit sums with planted wrong answers: which training sums helped and
# hurt each prompt's completion, and where the planted ones rank (docs/tutorial-lm.md).
demo-lm: install
	rm -rf $(DEMO_LM_RUN)
	$(PLGK) train --config configs/lm_addition.toml --out $(DEMO_LM_RUN)
	$(PY) scripts/demo_lm.py prompts $(DEMO_LM_RUN)-prompts.jsonl
	$(PLGK) replay --ckpts $(DEMO_LM_RUN) --audit-set $(DEMO_LM_RUN)-prompts.jsonl --target sequence-logprob --rule supersample:2 \
		--out $(DEMO_LM_RUN).h5 --overwrite
	$(PLGK) inspect $(DEMO_LM_RUN).h5
	$(PLGK) inspect $(DEMO_LM_RUN).h5 --audit 0 --top 5
	$(PY) scripts/demo_lm.py report $(DEMO_LM_RUN).h5

# One pytest worker per CPU (pytest-xdist), a test file per worker at a time: the suite, docs pages
# included, needs about 10 CPU-minutes, which one process on 2 cores would take past CI's 10.
test: install
	$(PY) -m pytest -q -n auto --dist loadfile

bench: install
	$(PY) scripts/bench.py

clean:
	rm -rf runs bench-results
