"""The README and docs/ hold together: the settings reference is the configuration model's, every relative link
(and its #anchor) resolves, and every `captioning` command they show parses with the CLI."""

import re
import shlex
from pathlib import Path

import pytest
import typer

from captioning.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "manifests" / "README.md"]
# [text](target "title") and ![alt](target): the target
LINK = re.compile(r"!?\[[^\]]*\]\(<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\)")


def test_the_settings_reference_is_the_configuration_models():
    from captioning.settings_reference import render

    page = REPO / "docs" / "configuration.md"
    assert page.read_text() == render(), f"{page} differs from the configuration model: run `make docs`"


def test_the_settings_reference_has_every_setting_with_both_presets_values():
    from captioning.config import Config
    from captioning.settings_reference import render

    cells = [re.split(r"(?<!\\)\|", line)[1:-1] for line in render().splitlines() if line.startswith("| `")]
    rows = {row[0].strip(" `"): [c.strip() for c in row[1:]] for row in cells}
    keys = {f"{s}.{k}" for s, f in Config.model_fields.items() for k in f.annotation.model_fields}
    assert set(rows) == keys and len(keys) > 70
    assert all(len(cells) == 4 and all(cells) for cells in rows.values())
    assert rows["train.units"][:2] == ["`256`", "`1024`"]  # demo, coco2014


def test_a_setting_without_a_description_stops_the_reference(monkeypatch):
    from captioning.config import TrainConfig
    from captioning.settings_reference import render

    monkeypatch.setattr(TrainConfig.model_fields["units"], "description", None)
    with pytest.raises(ValueError, match=r"train\.units has no description"):
        render()


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but hyphens and underscores dropped, spaces as
    hyphens (markup's backticks and asterisks go with the punctuation)."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {_slug(line.lstrip("#")) for line in text.splitlines() if re.match(r"#{1,6} ", line)}


def _links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return [target for target in LINK.findall(text) if not re.match(r"[a-z]+:", target)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    broken = []
    for target in _links(page):
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(f"{target}: no heading #{anchor} in {resolved.relative_to(REPO)}")
    assert not broken, f"{page.relative_to(REPO)}: " + "; ".join(broken)


def test_the_docs_are_linked_from_the_readme():
    linked = {(REPO / target.partition("#")[0]).resolve() for target in _links(REPO / "README.md")}
    assert not [p.name for p in (REPO / "docs").glob("*.md") if p.resolve() not in linked]


def test_the_link_check_sees_a_broken_link_and_anchor(tmp_path):
    (tmp_path / "a.md").write_text("# A\n\n## Two words\n\n## The `log_raw_data` step: *what* it does\n\n"
                                   "[ok](#two-words) [bad](b.md \"a title\") [gone](#nowhere) ![fig](c.png)\n")
    assert _links(tmp_path / "a.md") == ["#two-words", "b.md", "#nowhere", "c.png"]
    anchors = _anchors(tmp_path / "a.md")
    assert {"two-words", "the-log_raw_data-step-what-it-does"} <= anchors and "nowhere" not in anchors


def shown_commands(page: Path) -> list[tuple[str, bool]]:
    """Every `captioning ...` line in the page's code blocks (a continued line joined, prompts removed), and
    whether the block shows it refused (the next line starts with ``error:``)."""
    commands = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", page.read_text(), flags=re.S):
        lines = re.sub(r"\\\n\s*", " ", block).splitlines()
        for line, after in zip(lines, [*lines[1:], ""]):
            line = re.sub(r"^\s*(\$ )?(\.venv/bin/)?", "", line)
            if line.startswith("captioning "):
                commands.append((line.split(" | ")[0].split(" && ")[0].split(" > ")[0], after.startswith("error:")))
    return commands


def parse(command: str) -> None:
    """What the CLI makes of the command line (options, their types and choices) and the configuration of its
    --preset and --set values, without running it."""
    from captioning.cli import app
    from captioning.config import load_config

    args = shlex.split(command, comments=True)[1:]
    sets = [value for option, value in zip(args, args[1:]) if option == "--set"]
    presets = [value for option, value in zip(args, args[1:]) if option == "--preset"]
    if sets or presets:
        load_config(overrides=sets, preset=presets[-1] if presets else "demo")  # a ConfigError names the key
    cmd = typer.main.get_command(app)
    name = "captioning"
    while True:
        ctx = cmd.make_context(name, list(args))
        if not hasattr(cmd, "resolve_command"):  # a command, not a group: parsed
            return
        rest = [*ctx._protected_args, *ctx.args]
        assert rest, f"{command}: names no command"
        name, cmd, args = cmd.resolve_command(ctx, rest)


def _all_commands() -> list[tuple[str, str, bool]]:
    return [(str(page.relative_to(REPO)), command, refused) for page in PAGES
            for command, refused in shown_commands(page)]


def test_the_pages_show_commands_at_all():
    shown = _all_commands()
    assert len(shown) > 30
    assert {c.split()[1] for _, c, _ in shown} >= {"run", "caption", "serve", "compile", "submit", "deploy", "bench"}


@pytest.mark.parametrize("page, command, refused", _all_commands())
def test_every_command_shown_parses(page, command, refused):
    if refused:  # shown with its error: the CLI must refuse it
        with pytest.raises((typer.TyperException, ConfigError)):
            parse(command)
        return
    try:
        parse(command)
    except typer.TyperException as exc:  # typer's own click raises these: a usage error, a bad value
        pytest.fail(f"{page}: `{command}`: {getattr(exc, 'format_message', exc.__str__)()}")
    except ConfigError as exc:
        pytest.fail(f"{page}: `{command}`: {exc}")


def test_the_parse_check_refuses_what_the_cli_would():
    with pytest.raises(ConfigError, match="train.epochz"):
        parse("captioning run --set train.epochz=3")
    for wrong in ("captioning caption --decoder sideways x.png", "captioning serve --port x", "captioning nosuch",
                  "captioning bench features --imagez 3"):
        with pytest.raises(typer.TyperException):
            parse(wrong)
