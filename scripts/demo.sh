#!/usr/bin/env bash
# `make demo`: the whole product once — train, package fruit.mar, serve it with TorchServe,
# classify one image with curl, score a folder with fruit-batch, stop the server.
# DATA=dir picks the dataset (default: Fruits-360 when ../shared has it, else synthetic); EPOCHS=n.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=$PWD/.venv/bin
export PATH="$BIN:$PATH"
DATA=${DATA:-data/demo}
if [ "$DATA" = data/demo ] && [ ! -d data/demo/Training ]; then
    fruit-train make-demo-data data/demo
fi
if [ -z "${EPOCHS:-}" ]; then
    # enough to show the pipeline; the full recipe (BENCHMARKS.md) is plain `make train`
    if [ "$DATA" = data/demo ]; then EPOCHS=10; else EPOCHS=2; fi
fi
# the synthetic set is small: smaller batches give the one-cycle schedule enough steps
BATCH=64
[ "$DATA" = data/demo ] && BATCH=16
TEST_DIR=$DATA/Test
[ -d "$TEST_DIR" ] || TEST_DIR=$DATA
RUN_NAME=demo-$(date +%Y%m%d-%H%M%S)

echo "== 1. train ($DATA, $EPOCHS epochs)"
fruit-train train --data "$DATA" --output-dir runs --run-name "$RUN_NAME" --epochs "$EPOCHS" --batch-size "$BATCH"

echo "== 2. package model_store/fruit.mar"
fruit-archive "runs/$RUN_NAME"

echo "== 3. start torchserve (config.properties: loopback, token auth, batching)"
JH=$(python -m fruitserve.model_store.torchserve_process java-home)
[ -z "$JH" ] || export JAVA_HOME="$JH"
if curl -s -o /dev/null --max-time 2 http://127.0.0.1:8080/ping; then
    echo "something already listens on 127.0.0.1:8080; stop it first (make stop)" >&2
    exit 1
fi
torchserve --stop >/dev/null 2>&1 || true
trap 'echo "== 6. stop torchserve"; torchserve --stop >/dev/null || true' EXIT
mkdir -p logs
torchserve --start --ncs --ts-config config.properties > logs/torchserve.out 2>&1
python -m fruitserve.model_store.torchserve_process wait --url http://127.0.0.1:8080 --key-file key_file.json

echo "== 4. classify one image"
TOKEN=$(python -c 'import json; print(json.load(open("key_file.json"))["inference"]["key"])')
# the first image in sorted order; `sort | head` would kill sort with SIGPIPE on a large folder under pipefail
IMAGE=$(find "$TEST_DIR" -type f -name '*.jpg' | sort | sed -n 1p)
[ -n "$IMAGE" ] || { echo "no .jpg under $TEST_DIR to classify" >&2; exit 1; }
echo "curl -H \"Authorization: Bearer \$TOKEN\" http://127.0.0.1:8080/predictions/fruit -T \"$IMAGE\""
curl -sS --fail-with-body --max-time 30 -H "Authorization: Bearer $TOKEN" http://127.0.0.1:8080/predictions/fruit \
    -T "$IMAGE"
echo

echo "== 5. score $TEST_DIR with fruit-batch"
fruit-batch score "$TEST_DIR" "runs/$RUN_NAME/scores.csv" --key-file key_file.json --concurrency 16
echo "artifacts: runs/$RUN_NAME (model.pt, model.int8.onnx, metrics.json, confusion_matrix.png, reliability.png, uncertainty_scores.png,"
echo "           scores.csv); archive: model_store/fruit.mar"
if [ -f mlflow.db ]; then
    echo "the run is tracked in MLflow: .venv/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db"
fi
