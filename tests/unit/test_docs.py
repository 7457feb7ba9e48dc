"""The documentation says only what farmkeys has: every `farmkeys` command line it shows
parses with the real parser's commands and options, every config key it names is a field
of the config model, and every link between the pages leads to a file and a heading that
exist. No server is involved: the pages are read as text.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import re
import tomllib
import typing
from collections.abc import Iterator
from pathlib import Path

import pytest

from farmkeys.cli import parser as cli_parser
from farmkeys.config import load, model

REPO = Path(__file__).resolve().parents[2]
PAGES = sorted([REPO / "README.md", REPO / "deploy" / "README.md", *(REPO / "docs").glob("*.md")])

# Every section of the config model, as the loader reads them: a field of Config each.
KEYS = {
    section: {f.name for f in dataclasses.fields(cls)}
    for section, cls in typing.get_type_hints(model.Config).items()
}

_FENCE = re.compile(r"^```([\w-]*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
_SPAN = re.compile(r"`([^`\n]+)`")
# `farmkeys` as a program: at the start, after white space or a path's slash.
_INVOCATION = re.compile(r"(?:^|(?<=[\s/]))farmkeys[ \t]+(.*)")
# Where a command line ends: a pipe, a list or a redirection between words.
_END = re.compile(r"\s(?:\||;|&&|\|\||2?>|<)\s|\s#")
_OPTION = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")
_INLINE_KEY = re.compile(r"^\[(\w+)\]\s+(\w+)$|^(\w+)\.(\w+)(?:\s*=.*)?$")


def test_the_pages_are_found() -> None:
    names = {p.name for p in PAGES}
    assert {"deploy-walkthrough.md", "integrations.md", "procedures.md", "operations.md"} <= names


# -- what the pages say ----------------------------------------------------------------------


def _code(text: str) -> Iterator[str]:
    """The lines of every fenced block (continuations joined), and every inline code span
    outside them."""
    for found in _FENCE.finditer(text):
        yield from found.group(2).replace("\\\n", " ").splitlines()
    for found in _SPAN.finditer(_FENCE.sub("", text)):
        yield found.group(1).replace("\\|", "|")


def _invocations(page: Path) -> Iterator[str]:
    for line in _code(page.read_text(encoding="utf-8")):
        for found in _INVOCATION.finditer(line):
            yield _END.split(found.group(1))[0]


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {s for action in parser._actions for s in action.option_strings}


def _check_invocation(line: str) -> str | None:
    """What is wrong with ``farmkeys <line>``; None when it parses or is no invocation."""
    top = cli_parser.build()
    words = line.split()
    if not words:
        return None
    if words[0].startswith("-"):
        if words[0] not in _options(top):
            return None  # `-u farmkeys --`, `install -o farmkeys -g`: an account, not the program
    elif not re.fullmatch(r"[a-z][a-z-]*", words[0]):
        return None  # `farmkeys /path`, `farmkeys 0600`: not a command line
    parser = top
    path: list[str] = []
    for word in words:
        commands = _subcommands(parser)
        if not commands:
            break
        word = word.strip("[]()")
        if word.startswith("-"):
            continue  # an option (`farmkeys nodes [--json]`), not a command
        # `escrow export|import`: each alternative must be a command; follow the first.
        alternatives = word.strip("[]()").split("|")
        if len(alternatives) > 1 and all(a in commands for a in alternatives):
            word = alternatives[0]
        if word not in commands:
            if not path and not _looks_like_command(word, top):
                return None  # prose in a code span ("farmkeys runs ...") is not an invocation
            return f"`farmkeys {line}`: {' '.join(path) or 'farmkeys'} has no command {word!r}"
        parser = commands[word]
        path.append(word)
    known = _options(parser) | _options(top)
    for option in _OPTION.findall(line):
        if option not in known:
            where = "farmkeys " + " ".join(path)
            return f"`farmkeys {line}`: `{where}` has no option {option}"
    return None


def _looks_like_command(word: str, top: argparse.ArgumentParser) -> bool:
    """A word a reader would take for a command: one within an edit or two of a real
    command (a typo); other words after `farmkeys` are prose ("farmkeys runs it ...")."""
    return bool(difflib.get_close_matches(word, _subcommands(top), n=1, cutoff=0.75))


def _toml_blocks(text: str) -> Iterator[str]:
    for found in _FENCE.finditer(text):
        if found.group(1) == "toml":
            yield found.group(2)


def _key_problems(section: str, key: str, where: str) -> str | None:
    if section not in KEYS:
        return f"{where}: no config section [{section}]"
    if key not in KEYS[section]:
        return f"{where}: no key {key!r} in [{section}]"
    return None


# -- the tests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_command_line_a_page_shows_is_one_farmkeys_has(page: Path) -> None:
    problems = [p for line in _invocations(page) if (p := _check_invocation(line))]
    assert problems == [], "\n".join(problems)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_toml_block_names_only_keys_the_config_model_has(page: Path) -> None:
    problems = []
    for block in _toml_blocks(page.read_text(encoding="utf-8")):
        document = tomllib.loads(block)
        for section, body in document.items():
            assert isinstance(body, dict), f"{page.name}: [{section}] is not a table"
            for key in body:
                if problem := _key_problems(section, key, page.name):
                    problems.append(problem)
    assert problems == [], "\n".join(problems)


NEW_PAGES = [
    REPO / "docs" / n for n in ("deploy-walkthrough.md", "integrations.md", "procedures.md")
]


@pytest.mark.parametrize("page", NEW_PAGES, ids=lambda p: p.name)
def test_every_config_key_a_guide_names_in_passing_exists(page: Path) -> None:
    """`[node] store_group` and `directory.password_file` in the text, not only in blocks.
    (The older pages also name modules as `policy.decide_master_keys`; these do not.)"""
    problems = []
    for span in _SPAN.findall(_FENCE.sub("", page.read_text(encoding="utf-8"))):
        found = _INLINE_KEY.match(span.strip())
        if found is None:
            continue
        section, key = (found.group(1), found.group(2)) if found.group(1) else found.group(3, 4)
        if section in KEYS and (problem := _key_problems(section, key, page.name)):
            problems.append(f"{problem} (`{span}`)")
    assert problems == [], "\n".join(problems)


def test_the_checker_catches_a_wrong_command_option_and_key() -> None:
    assert _check_invocation("check --json") is None
    assert _check_invocation("sync --allow-unreachable") is None
    assert _check_invocation("db upgrade --config /etc/farmkeys/farmkeys.toml") is None
    assert "no option --frobnicate" in (_check_invocation("rollover --urgent --frobnicate") or "")
    assert "no option --no-such-flag" in (_check_invocation("check --no-such-flag") or "")
    assert "no command 'upgarde'" in (_check_invocation("db upgarde") or "")
    assert "no command 'stauts'" in (_check_invocation("stauts --json") or "")
    assert _check_invocation("runs it without a shell") is None  # prose
    assert _check_invocation("escrow export|import") is None
    assert _check_invocation("status [--json] [--wide]") is None
    assert _key_problems("node", "store_group", "x") is None
    assert _key_problems("node", "store_grp", "x") == "x: no key 'store_grp' in [node]"
    assert _key_problems("nodes", "id", "x") == "x: no config section [nodes]"


# -- links between the pages -------------------------------------------------------------------

_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but - and _ dropped, spaces to -."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for line in _FENCE.sub("", page.read_text(encoding="utf-8")).splitlines():
        found = re.match(r"^#{1,6}\s+(.*)$", line)
        if not found:
            continue
        slug = _slug(found.group(1))
        count = seen.get(slug, 0)
        anchors.add(slug if count == 0 else f"{slug}-{count}")
        seen[slug] = count + 1
    return anchors


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_link_between_pages_leads_to_a_file_and_a_heading(page: Path) -> None:
    problems = []
    for target in _LINK.findall(_FENCE.sub("", page.read_text(encoding="utf-8"))):
        if re.match(r"^[a-z]+:", target):
            continue  # http:, https:, file:, mailto:
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            problems.append(f"{page.name}: {target}: no file {path}")
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            problems.append(f"{page.name}: {target}: no heading #{anchor} in {linked.name}")
    assert problems == [], "\n".join(problems)


def test_the_slugs_are_githubs() -> None:
    assert _slug("7. `hooks.on_change`: let the federation service reload") == (
        "7-hookson_change-let-the-federation-service-reload"
    )
    assert _slug("`/healthz` says 503") == "healthz-says-503"
    assert _slug("4a. `farmkeys check` on every node") == "4a-farmkeys-check-on-every-node"


# -- the guides' configurations load -----------------------------------------------------------


def _walkthrough_config() -> str:
    blocks = [b for b in _toml_blocks(NEW_PAGES[0].read_text(encoding="utf-8")) if "[farm]" in b]
    assert len(blocks) == 1, "deploy-walkthrough.md shows one complete node configuration"
    return blocks[0]


def test_the_walkthroughs_node_configuration_loads(tmp_path: Path) -> None:
    path = tmp_path / "farmkeys.toml"
    path.write_text(_walkthrough_config())
    path.chmod(0o600)
    config = load(path, environ={})
    assert config.directory.layout == "ad"
    assert config.node.store_group == "svc-federation"
    assert config.publish.address == ("0.0.0.0", 9464)


@pytest.mark.parametrize("page", NEW_PAGES[1:], ids=lambda p: p.name)
def test_every_fragment_a_guide_shows_loads_on_top_of_the_walkthroughs(
    page: Path, tmp_path: Path
) -> None:
    """`[node] store_group = "jetty"` and `[hooks] on_change = ...` in integrations.md:
    valid values, not only known keys (given as the environment overrides them)."""
    path = tmp_path / "farmkeys.toml"
    path.write_text(_walkthrough_config())
    path.chmod(0o600)
    fragments = [b for b in _toml_blocks(page.read_text(encoding="utf-8")) if "[farm]" not in b]
    for fragment in fragments:
        environ = {
            f"FARMKEYS_{section.upper()}_{key.upper()}": str(value)
            for section, body in tomllib.loads(fragment).items()
            for key, value in body.items()
        }
        load(path, environ=environ)
