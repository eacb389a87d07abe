"""mkdocs hook: the CLI reference is generated from the argparse parser, so it cannot drift from the code."""

from __future__ import annotations

import argparse

MARKER = "<!-- cli-reference -->"


def _help(parser: argparse.ArgumentParser) -> str:
    return parser.format_help().replace("```", "'''")


def cli_reference() -> str:
    from sketcharray.app.cli import BENCHMARKS, benchmark_parser, build_parser

    parser = build_parser()
    parts = ["```text", _help(parser).rstrip(), "```"]
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        parts += [f"\n## `sketcharray {name}`\n", "```text", _help(p).rstrip(), "```"]
        if name == "bench":
            for bname in BENCHMARKS:
                parts += [f"\n### `sketcharray bench {bname}`\n", "```text",
                          _help(benchmark_parser(bname)).rstrip(), "```"]
    return "\n".join(parts)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, cli_reference())
    return markdown
