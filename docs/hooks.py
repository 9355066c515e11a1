"""MkDocs hooks: pages generated from the code at build time, so each fact is stated once.

- ``<!-- uapx:cli-reference -->`` becomes the reference of every subcommand, read from
  :func:`uapx.cli.build_parser`;
- ``<!-- uapx:readme-commands -->`` becomes the README's install and test commands;
- ``<!-- uapx:include PATH -->`` becomes the text of the repository file PATH.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _cell(text: str) -> str:
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|").replace("\n", " ")


def _flags(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{action.metavar or action.dest}`"
    names = ", ".join(f"`{s}`" for s in action.option_strings)
    if action.nargs == 0:
        return names
    metavar = action.metavar or (f"{{{','.join(map(str, action.choices))}}}" if action.choices else
                                 action.dest.upper())
    return f"{names} `{metavar}`"


def _options_table(parser: argparse.ArgumentParser) -> str:
    rows = []
    for action in parser._actions:  # argparse keeps no public list of its actions
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) or action.help == argparse.SUPPRESS:
            continue
        choices = ", ".join(f"`{c}`" for c in action.choices) if action.choices else ""
        help_ = (action.help or "") % {"default": action.default, "prog": parser.prog} if action.help else ""
        rows.append(f"| {_flags(action)} | {_cell(help_)} | {choices} |")
    if not rows:
        return "No options.\n"
    return "| option | what (default) | choices |\n| --- | --- | --- |\n" + "\n".join(rows) + "\n"


def cli_reference() -> str:
    """Markdown for the top-level parser and each subcommand, in the parser's order."""
    from uapx.cli import build_parser

    parser = build_parser()
    out = ["## `uapx`", "", "```text", parser.format_usage().strip(), "```", "", _options_table(parser)]
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.dest: a.help for a in sub._choices_actions}
    for name, p in sub.choices.items():
        out += [f"## `uapx {name}`", "", _cell(helps.get(name) or p.description or ""), "", "```text",
                p.format_usage().strip(), "```", "", _options_table(p)]
    return "\n".join(out)


def readme_commands() -> str:
    """The README's set-up (install + main job) and test commands, verbatim."""
    readme = (REPO / "README.md").read_text()
    install = re.search(r"^    (pip install .*)$", readme, re.M)
    test = re.search(r"^    (python -m pytest.*)$", readme, re.M)
    if not install or not test:
        raise RuntimeError("README.md lost its install or test command (indented lines 'pip install ...', "
                           "'python -m pytest ...')")
    return f"```bash\n{install.group(1)}\n```\n\nRun the tests:\n\n```bash\n{test.group(1)}\n```\n"


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ARG001 - MkDocs hook signature
    if "<!-- uapx:cli-reference -->" in markdown:
        markdown = markdown.replace("<!-- uapx:cli-reference -->", cli_reference())
    markdown = re.sub(r"<!-- uapx:include (\S+) -->", lambda m: (REPO / m.group(1)).read_text().rstrip("\n"),
                      markdown)
    if "<!-- uapx:readme-commands -->" in markdown:
        markdown = markdown.replace("<!-- uapx:readme-commands -->", readme_commands())
    return markdown
