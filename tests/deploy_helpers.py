"""Readers for the deployment files that test_deploy.py and test_security.py check.

TorchServe properties, the Dockerfile and ``.dockerignore`` are parsed here with small, strict readers
(standard library only), so both test modules judge the same parse.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
MAIN_CONFIG = ROOT / "config.properties"
DOCKER_CONFIG = ROOT / "docker" / "config.properties"
KSERVE_DIR = ROOT / "deploy" / "kserve"
KSERVE_CONFIG = KSERVE_DIR / "config" / "config.properties"
INFERENCE_SERVICE = KSERVE_DIR / "inference-service.yaml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
HEALTHCHECK = ROOT / "docker" / "healthcheck.py"
MODEL_CONFIG = ROOT / "model_store" / "model-config.yaml"

LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}
_PROPERTY = re.compile(r"^([^=:\s]+)\s*[=:]\s*(.*)$")


def read_properties(path: Path) -> dict[str, str]:
    """The subset of Java properties syntax TorchServe configs use: ``key=value`` lines and ``#``/``!`` comments.

    Anything fancier (line continuations, escapes, a key given twice, where Java silently keeps the last)
    is an error here, so a config cannot mean something other than what this parse says.
    """
    settings: dict[str, str] = {}
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#!":
            continue
        match = _PROPERTY.match(line)
        if match is None or line.endswith("\\"):
            raise ValueError(f"{path}:{number}: not a plain key=value line: {raw!r}")
        key, value = match.group(1), match.group(2).strip()
        if key in settings:
            raise ValueError(f"{path}:{number}: {key} is set twice (TorchServe would silently take the last)")
        settings[key] = value
    return settings


def address_host(value: str) -> str:
    """The host an ``*_address`` property binds: a URL for the HTTP APIs, a bare host for gRPC."""
    if value.startswith("unix:"):
        return "localhost"  # a Unix socket is not reachable from the network
    if "://" in value:
        return urlsplit(value).hostname or ""
    return value.strip("[]")


def is_loopback(value: str) -> bool:
    return address_host(value) in LOOPBACK_HOSTS


def address_port(value: str) -> int | None:
    match = re.search(r":(\d+)/?$", value)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    args: str
    line: int


def dockerfile_stages(path: Path = DOCKERFILE) -> tuple[dict[str, str], list[list[Instruction]]]:
    """Global ARG defaults, and the instructions of each build stage (``FROM`` first), continuations joined."""
    instructions: list[Instruction] = []
    pending, start = "", 0
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue  # comments (also inside a continued instruction) and blank lines
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, args = (pending + stripped).strip().partition(" ")
        instructions.append(Instruction(keyword.upper(), " ".join(args.split()), start))
        pending = ""
    global_args: dict[str, str] = {}
    stages: list[list[Instruction]] = []
    for instruction in instructions:
        if instruction.keyword == "FROM":
            stages.append([instruction])
        elif stages:
            stages[-1].append(instruction)
        elif instruction.keyword == "ARG":
            name, _, default = instruction.args.partition("=")
            global_args[name] = default.strip('"')
    return global_args, stages


def stage_args(stage: list[Instruction], inherited: dict[str, str] | None = None) -> dict[str, str]:
    """ARG defaults visible in a stage (its own ARGs over the global ones)."""
    values = dict(inherited or {})
    for instruction in stage:
        if instruction.keyword == "ARG":
            name, _, default = instruction.args.partition("=")
            values[name] = default.strip('"')
    return values


def substitute(text: str, values: dict[str, str]) -> str:
    """``${NAME}`` and ``$NAME`` replaced by ARG defaults, as the build does when no --build-arg is given."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values.get(m.group(1) or m.group(2), m.group(0)), text)


def instructions(stage: list[Instruction], keyword: str) -> list[Instruction]:
    return [i for i in stage if i.keyword == keyword]


def context_copies(stage: list[Instruction], inherited: dict[str, str] | None = None) -> dict[str, str]:
    """``source -> destination`` of the stage's COPY instructions from the build context (not ``--from``)."""
    values = stage_args(stage, inherited)
    copies = {}
    for copy_ in instructions(stage, "COPY"):
        if not copy_.args.startswith("--from"):
            source, destination = substitute(copy_.args, values).split()[-2:]
            copies[source] = destination
    return copies


def dockerignore_patterns(path: Path = DOCKERIGNORE) -> list[tuple[bool, str]]:
    """(is an exception ``!``, pattern) in file order, cleaned the way Docker cleans them."""
    patterns = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = str(PurePosixPath(line.lstrip("!").strip().lstrip("/")))
        patterns.append((negated, pattern))
    return patterns


def _segments_match(pattern: list[str], path: list[str]) -> bool:
    if not pattern:
        return not path
    if pattern[0] == "**":
        return any(_segments_match(pattern[1:], path[i:]) for i in range(len(path) + 1))
    return bool(path) and fnmatchcase(path[0], pattern[0]) and _segments_match(pattern[1:], path[1:])


def is_ignored(relative_path: str, patterns: list[tuple[bool, str]]) -> bool:
    """Whether Docker leaves ``relative_path`` out of the build context.

    As in Docker: a pattern matches a path or any of its parent directories, ``*`` stays within one path
    segment, ``**`` spans any number, and the last matching pattern decides.
    """
    parts = PurePosixPath(relative_path).parts
    candidates = [parts[: i + 1] for i in range(len(parts))]
    ignored = False
    for negated, pattern in patterns:
        pattern_parts = pattern.split("/")
        if any(_segments_match(pattern_parts, list(candidate)) for candidate in candidates):
            ignored = not negated
    return ignored
