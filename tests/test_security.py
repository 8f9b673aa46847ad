"""The shipped configuration and source keep the promises of SECURITY.md. Reads files only: no server, no model."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from deploy_helpers import (
    DOCKER_CONFIG,
    DOCKERFILE,
    KSERVE_CONFIG,
    MAIN_CONFIG,
    ROOT,
    dockerfile_stages,
    instructions,
    is_loopback,
    read_properties,
)

ALL_CONFIGS = {"host": MAIN_CONFIG, "docker": DOCKER_CONFIG, "kserve": KSERVE_CONFIG}
ADDRESS_KEYS = ("inference_address", "management_address", "metrics_address",
                "grpc_inference_address", "grpc_management_address")
MAX_REQUEST_BYTES = 32 * 1024 * 1024
# What a management-API caller could ask TorchServe to fetch; TorchServe full-matches each allowed_urls regex.
REMOTE_URLS = (
    "https://evil.example/x.mar",
    "http://evil.example/x.mar",
    "HTTPS://EVIL.EXAMPLE/X.MAR",
    "http://127.0.0.1:9/evil.mar",
    "http://169.254.169.254/latest/meta-data/",
    "s3://bucket/x.mar",
    "file:///etc/passwd",
    "file:///tmp/evil.mar",
)
SOURCE_DIRS = ("train", "handler", "batch", "model_store")
SKIP_DIRS = {".venv", "runs", "data", "build", "logs", "node_modules", "__pycache__"}


@pytest.fixture(params=sorted(ALL_CONFIGS), ids=sorted(ALL_CONFIGS))
def config(request: pytest.FixtureRequest) -> dict[str, str]:
    return read_properties(ALL_CONFIGS[request.param])


# --- every shipped TorchServe config ------------------------------------------------------------------

def test_model_api_is_off(config: dict[str, str]):
    assert config.get("enable_model_api") == "false"


def test_allowed_urls_match_no_remote_url(config: dict[str, str]):
    # TorchServe's default (absent) allows file:// and every http(s) URL
    assert config.get("allowed_urls"), "allowed_urls must be set: its default allows every http(s) URL"
    patterns = [re.compile(p) for p in config["allowed_urls"].split(",")]  # TorchServe splits on commas
    allowed = [(url, p.pattern) for url in REMOTE_URLS for p in patterns if p.fullmatch(url)]
    assert not allowed, f"allowed_urls lets TorchServe fetch: {allowed}"


def test_request_size_is_bounded(config: dict[str, str]):
    assert 0 < int(config["max_request_size"]) <= MAX_REQUEST_BYTES


def test_no_per_model_pip_installs_and_no_env_overrides(config: dict[str, str]):
    assert config.get("install_py_dep_per_model") == "false"  # a .mar's requirements.txt is never installed
    assert config.get("enable_envvars_config") == "false"  # TS_* variables cannot undo any of this


def test_management_and_grpc_stay_on_loopback(config: dict[str, str]):
    for key in ("management_address", "grpc_inference_address", "grpc_management_address"):
        assert key in config and is_loopback(config[key]), f"{key}={config.get(key)}"


# --- per deployment ------------------------------------------------------------------------------------

def test_host_config_binds_only_loopback():
    config = read_properties(MAIN_CONFIG)
    addresses = {k: v for k, v in config.items() if k.endswith("_address")}
    assert set(ADDRESS_KEYS) <= set(addresses), "every API's address is set explicitly, gRPC included"
    assert {k: v for k, v in addresses.items() if not is_loopback(v)} == {}


def test_host_and_docker_configs_keep_token_auth_on():
    for path in (MAIN_CONFIG, DOCKER_CONFIG):
        # absent means on (TorchServe >= 0.11.1); anything but "false" would need a reason in SECURITY.md
        assert read_properties(path).get("disable_token_authorization", "false") == "false", path


def test_docker_config_opens_only_inference_and_metrics():
    config = read_properties(DOCKER_CONFIG)
    assert config["management_address"] == "http://127.0.0.1:8081"
    open_keys = {k for k, v in config.items() if k.endswith("_address") and not is_loopback(v)}
    assert open_keys <= {"inference_address", "metrics_address"}


def test_kserve_config_without_tokens_is_loopback_only():
    # KServe's TorchServe wrapper sends no token; that is acceptable only while nothing but the wrapper,
    # in the same container, can reach TorchServe.
    config = read_properties(KSERVE_CONFIG)
    if config.get("disable_token_authorization", "false") != "false":
        addresses = {k: v for k, v in config.items() if k.endswith("_address")}
        assert set(ADDRESS_KEYS) <= set(addresses)
        assert {k: v for k, v in addresses.items() if not is_loopback(v)} == {}


# --- container -----------------------------------------------------------------------------------------

def final_stage() -> list:
    _, stages = dockerfile_stages(DOCKERFILE)
    assert len(stages) >= 2, "multi-stage: build tools stay out of the runtime image"
    return stages[-1]


def test_container_runs_as_fixed_non_root_user():
    users = instructions(final_stage(), "USER")
    assert users, "the runtime stage sets USER"
    user = users[-1].args.split(":")[0]
    assert user.isdigit() and int(user) != 0, f"USER {users[-1].args}: a numeric non-zero UID (Kubernetes runAsNonRoot)"


def test_container_has_healthcheck():
    checks = instructions(final_stage(), "HEALTHCHECK")
    assert checks and checks[-1].args.upper() != "NONE"


def test_container_does_not_expose_management_or_grpc():
    exposed = {int(p.split("/")[0]) for e in instructions(final_stage(), "EXPOSE") for p in e.args.split()}
    assert exposed and not exposed & {8081, 7070, 7071}
    assert exposed <= {8080, 8082}


# --- source --------------------------------------------------------------------------------------------

def source_files(dirs: tuple[str, ...] | None = None) -> list[Path]:
    if dirs is not None:
        return sorted(p for d in dirs for p in (ROOT / d).rglob("*.py") if "__pycache__" not in p.parts)
    files = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT).parts
        if not any(part in SKIP_DIRS or part.startswith(".") for part in rel[:-1]):
            files.append(path)
    return sorted(files)


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else "?"


def test_every_torch_load_is_weights_only():
    calls, bad = 0, []
    for path in source_files(SOURCE_DIRS):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "torch" and any(a.name == "load" for a in node.names):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: `from torch import load` hides the call")
            if isinstance(node, ast.Call) and _dotted(node.func) == "torch.load":
                calls += 1
                flag = next((k.value for k in node.keywords if k.arg == "weights_only"), None)
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: torch.load without weights_only=True")
    assert calls >= 3, "the scan found the known checkpoint loads (train/model.py, train/train.py)"
    assert not bad, "\n".join(bad)


def test_no_pickle_loading_in_source():
    unpicklers = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve"}
    bad = []
    for path in source_files(SOURCE_DIRS):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            modules = [a.name.split(".")[0] for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                modules.append(node.module.split(".")[0])
            if set(modules) & unpicklers:
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: imports {sorted(set(modules) & unpicklers)}")
            if isinstance(node, ast.Call) and _dotted(node.func).endswith((".load", ".loads")) \
                    and _dotted(node.func).split(".")[0] in unpicklers:
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: {_dotted(node.func)}(...)")
    assert not bad, "\n".join(bad)


def test_served_model_is_torchscript():
    artifacts = (ROOT / "handler" / "artifacts.py").read_text(encoding="utf-8")
    assert "torch.jit.load(" in artifacts
    for path in source_files(("handler",)):
        text = path.read_text(encoding="utf-8")
        assert "torch.load(" not in text, f"{path}: the handler loads TorchScript only"
        # arrays it reads (the uncertainty statistics) are plain .npz, never pickle
        assert all("allow_pickle=False" in call for call in re.findall(r"np\.load\([^)]*\)", text)), path


def test_pil_decompression_bomb_guard_is_never_switched_off():
    # Image.MAX_IMAGE_PIXELS assigned None (or set via setattr) anywhere in the project's Python
    switch_off = re.compile(r"""MAX_IMAGE_PIXELS["']?\s*[=,]\s*None\b""")
    files = source_files()
    assert any(p.parts[-2] == "handler" for p in files), "the scan covers the source tree"
    bad = [f"{p.relative_to(ROOT)}:{text[:m.start()].count(chr(10)) + 1}"
           for p in files for text in [p.read_text(encoding="utf-8", errors="replace")] for m in switch_off.finditer(text)]
    assert not bad, f"PIL's bomb guard switched off at {bad}"


def test_security_md_covers_the_enforced_settings():
    text = (ROOT / "SECURITY.md").read_text(encoding="utf-8")
    for term in ("allowed_urls", "CVE-2023-43654", "enable_model_api", "max_request_size", "token_expiration_min",
                 "key_file.json", "weights_only=True", "MAX_IMAGE_PIXELS", "non-root", ".mar"):
        assert term.lower() in text.lower(), f"SECURITY.md does not mention {term}"
