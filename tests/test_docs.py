"""The docs state today's truth: BENCHMARKS.md quotes the shipped configuration as the files hold it, and every
relative link in the docs points at a file (and heading) that exists. Reads files only: no server, no model."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from deploy_helpers import MAIN_CONFIG, MODEL_CONFIG, ROOT, read_properties

README = ROOT / "README.md"
BENCHMARKS = ROOT / "BENCHMARKS.md"
RELIABILITY = ROOT / "RELIABILITY.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
LOGS = [page for page in DOCS if page.name.endswith("-log.md")]
CURRENT_PAGES = [README, BENCHMARKS, RELIABILITY, *(page for page in DOCS if page not in LOGS)]
CONFIG_FILES = {"config.properties": MAIN_CONFIG, "model_store/model-config.yaml": MODEL_CONFIG}
# Keys the shipped-configuration table must list: the ones the serving and reliability figures depend on.
REQUIRED_KEYS = {"minWorkers", "maxWorkers", "batchSize", "maxBatchDelay", "handler.torch_threads", "job_queue_size",
                 "number_of_netty_threads", "netty_client_threads", "default_workers_per_model", "vmargs"}
# Numeric settings that prose may quote next to the word "shipped", e.g. "`maxBatchDelay` 3 ms" (all in REQUIRED_KEYS).
QUOTABLE_KEYS = ("batchSize", "maxBatchDelay", "minWorkers", "maxWorkers", "job_queue_size", "number_of_netty_threads",
                 "netty_client_threads", "default_workers_per_model")
QUOTED = re.compile(r"\b(" + "|".join(QUOTABLE_KEYS) + r")\b`?\s*[=:]?\s*\**(\d+)")

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")


def prose(path: Path) -> str:
    """The page without fenced code blocks, which hold shell comments that look like headings."""
    return FENCE.sub("", path.read_text(encoding="utf-8"))


def section(path: Path, title: str) -> str:
    text = prose(path)
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    assert match, f"{path.name} has no '## {title}' section"
    return match.group(1)


def shipped_table() -> list[tuple[str, str, str | None]]:
    """(file, key, value) per row of BENCHMARKS.md's Shipped configuration table; value None means 'unset'."""
    lines = [line for line in section(BENCHMARKS, "Shipped configuration").splitlines() if line.startswith("|")]
    assert len(lines) > 2, "the Shipped configuration table is missing"
    header = [cell.strip().lower() for cell in lines[0].strip().strip("|").split("|")]
    file_col, key_col, value_col = header.index("file"), header.index("key"), header.index("shipped value")
    rows = []
    for line in lines[2:]:
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        value_cell = cells[value_col]
        code = re.match(r"`([^`]*)`", value_cell)
        if code:
            value = code.group(1)
        else:
            assert value_cell.lower().startswith("unset"), f"value cell is neither `code` nor 'unset': {value_cell!r}"
            value = None
        rows.append((cells[file_col].strip("`"), cells[key_col].strip("`"), value))
    return rows


def config_value(file: str, key: str) -> str | None:
    """What the shipped file says for ``key`` (dotted for YAML sections), as text; None when the key is absent."""
    assert file in CONFIG_FILES, f"unknown config file {file!r}: expected one of {sorted(CONFIG_FILES)}"
    path = CONFIG_FILES[file]
    if path.suffix == ".yaml":
        node: object = yaml.safe_load(path.read_text(encoding="utf-8"))
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return str(node).lower() if isinstance(node, bool) else str(node)
    return read_properties(path).get(key)


def shipped_values() -> dict[str, str | None]:
    """Each key of the Shipped configuration table with the value its config file holds (not the table's)."""
    return {key: config_value(file, key) for file, key, _ in shipped_table()}


@pytest.mark.parametrize(("file", "key", "value"), [pytest.param(*row, id=row[1]) for row in shipped_table()])
def test_shipped_configuration_table_matches_the_files(file: str, key: str, value: str | None) -> None:
    assert config_value(file, key) == value, f"BENCHMARKS.md says {file} ships {key} = {value!r}"


def test_shipped_configuration_table_lists_every_setting_the_figures_depend_on() -> None:
    keys = [key for _, key, _ in shipped_table()]
    assert set(keys) >= REQUIRED_KEYS, REQUIRED_KEYS - set(keys)
    assert len(keys) == len(set(keys)), "a key is listed twice"


def test_config_value_reads_what_the_files_hold() -> None:
    """The reader the table test relies on sees real values (so a wrong table cannot pass by reading nothing)."""
    assert (config_value("model_store/model-config.yaml", "batchSize") or "").isdigit()
    assert config_value("model_store/model-config.yaml", "handler.max_images_per_request") is not None
    assert config_value("model_store/model-config.yaml", "handler.no_such_key") is None
    assert (config_value("config.properties", "job_queue_size") or "").isdigit()
    assert config_value("config.properties", "no_such_key") is None
    assert "-XX:+UseSerialGC" in (config_value("config.properties", "vmargs") or "")


@pytest.mark.parametrize("page", CURRENT_PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_current_pages_quote_the_shipped_values(page: Path) -> None:
    """A line that calls a setting shipped quotes the value the config files hold (no '1 ms shipped' drift)."""
    shipped, wrong = shipped_values(), []
    for line in prose(page).splitlines():
        if "shipped" not in line.lower():
            continue
        for key, number in QUOTED.findall(line):
            if number != shipped[key]:
                wrong.append(f"{key} {number} (shipped: {shipped[key]}): {line.strip()[:120]}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("page", LOGS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_logs_mark_what_was_shipped_then(page: Path) -> None:
    """History may quote older values, but a line calling an older value shipped says when ('then', 'until')."""
    shipped, wrong = shipped_values(), []
    for line in prose(page).splitlines():
        lowered = line.lower()
        if "shipped" not in lowered or "then" in lowered or "until" in lowered:
            continue
        for key, number in QUOTED.findall(line):
            if number != shipped[key]:
                wrong.append(f"{key} {number}: {line.strip()[:120]}")
    assert not wrong, "\n".join(wrong)


def test_page_sizes() -> None:
    assert BENCHMARKS.stat().st_size < 20_000, "BENCHMARKS.md holds the current tables; history goes to docs/"
    assert README.stat().st_size < 12_000, "README.md is the user's guide; details go to docs/"


def test_readme_keeps_the_two_commands() -> None:
    block = re.search(r"^## Two commands\n+```bash\n(.*?)^```", README.read_text(encoding="utf-8"), re.MULTILINE | re.DOTALL)
    assert block, "README.md has no '## Two commands' code block"
    assert [line.split()[:2] for line in block.group(1).splitlines()] == [["make", "demo"], ["make", "test"]]


def test_every_bench_result_is_linked_and_every_link_exists() -> None:
    linked = set()
    for page in (BENCHMARKS, RELIABILITY):
        for target in LINK.findall(INLINE_CODE.sub("", prose(page))):
            if target.startswith("bench/results/") and target.endswith(".json"):
                assert (ROOT / target).is_file(), f"{page.name} links {target}, which does not exist"
                linked.add(target)
    for mention in re.findall(r"bench/results/[\w.-]+\.json", BENCHMARKS.read_text(encoding="utf-8")):
        assert (ROOT / mention).is_file(), f"BENCHMARKS.md names {mention}, which does not exist"
    results = {path.relative_to(ROOT).as_posix() for path in (ROOT / "bench" / "results").glob("*.json")}
    assert results, "bench/results/ holds no JSON"
    assert results <= linked, f"raw results no page links to: {sorted(results - linked)}"


def heading_anchors(path: Path) -> set[str]:
    """GitHub's anchors for the page's headings: lower case, punctuation dropped, spaces to hyphens, -1 for repeats."""
    anchors: set[str] = set()
    for title in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", prose(path), re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", title.replace("`", "").lower()).replace(" ", "-")
        candidate, n = slug, 0
        while candidate in anchors:
            n += 1
            candidate = f"{slug}-{n}"
        anchors.add(candidate)
    return anchors


def broken_links(page: Path) -> list[str]:
    """Relative links of ``page`` whose file does not exist, or whose #anchor is no heading of that Markdown file."""
    broken = []
    for target in LINK.findall(INLINE_CODE.sub("", prose(page))):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        resolved = (page.parent / path_part).resolve() if path_part else page
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in heading_anchors(resolved):
            broken.append(f"{target}: no heading #{anchor} in {resolved.name}")
    return broken


@pytest.mark.parametrize("page", [README, BENCHMARKS, RELIABILITY, *DOCS], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_point_at_existing_files_and_headings(page: Path) -> None:
    broken = broken_links(page)
    assert not broken, "\n".join(broken)


def test_link_checker_finds_broken_links(tmp_path: Path) -> None:
    """The link check can fail: a missing file and a missing heading are caught, links inside code are not read."""
    (tmp_path / "other.md").write_text("# Other page\n\n## Run of `today`, evening\n")
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n[ok](#title) [ok](other.md#run-of-today-evening) [gone](missing.md)\n"
                    "[bad anchor](other.md#nowhere) `[in code](x.md)`\n\n```\n# not a heading\n[in a block](y.md)\n```\n")
    assert broken_links(page) == ["missing.md: no such file", "other.md#nowhere: no heading #nowhere in other.md"]
    assert heading_anchors(page) == {"title"}
