"""A run's report: sections of text, tables and plots, written as Markdown and HTML side by side."""

from __future__ import annotations

import html
import json
import re
from dataclasses import dataclass, field
from pathlib import Path


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A Markdown table; ``columns`` = [(key, header)].  Readable as plain text too."""
    head = "| " + " | ".join(h for _, h in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(_cell(r.get(k, "")) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def _cell(v) -> str:
    if isinstance(v, float):
        v = f"{v:.4g}" if v == v else "–"
    return str(v).replace("|", "\\|").replace("\n", " ")


@dataclass
class Report:
    """An ordered list of sections; :meth:`write` renders ``report.md``, ``report.html`` and ``report.json``.

    Images are paths relative to the report folder, so the folder can be moved
    or zipped as a whole.
    """

    title: str
    blocks: list[tuple[str, object]] = field(default_factory=list)
    data: dict = field(default_factory=dict)

    def section(self, title: str) -> None:
        self.blocks.append(("section", title))

    def text(self, text: str) -> None:
        self.blocks.append(("text", text))

    def table(self, rows: list[dict], columns: list[tuple[str, str]]) -> None:
        self.blocks.append(("table", (rows, columns)))

    def image(self, path: str, caption: str) -> None:
        self.blocks.append(("image", (path, caption)))

    def markdown(self) -> str:
        out = [f"# {self.title}"]
        for kind, value in self.blocks:
            if kind == "section":
                out.append(f"## {value}")
            elif kind == "text":
                out.append(value)
            elif kind == "table":
                out.append(markdown_table(*value))
            else:
                path, caption = value
                out.append(f"![{caption}]({path})\n\n*{caption}*")
        return "\n\n".join(out) + "\n"

    def html(self) -> str:
        esc = html.escape
        out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(self.title)}</title>",
               "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em}"
               "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.2em .6em;"
               "text-align:left}img{max-width:100%}figcaption{color:#555}</style></head><body>",
               f"<h1>{esc(self.title)}</h1>"]
        for kind, value in self.blocks:
            if kind == "section":
                out.append(f"<h2>{esc(value)}</h2>")
            elif kind == "text":  # Markdown's inline code is the only markup the texts use
                out.append("<p>" + re.sub(r"`([^`]+)`", r"<code>\1</code>", esc(value)) + "</p>")
            elif kind == "table":
                rows, columns = value
                out.append("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for _, h in columns) + "</tr>")
                out.extend("<tr>" + "".join(f"<td>{esc(_cell(r.get(k, '')))}</td>" for k, _ in columns) + "</tr>"
                           for r in rows)
                out.append("</table>")
            else:
                path, caption = value
                out.append(f"<figure><img src='{esc(path)}' alt='{esc(caption)}'>"
                           f"<figcaption>{esc(caption)}</figcaption></figure>")
        out.append("</body></html>")
        return "\n".join(out) + "\n"

    def write(self, folder) -> Path:
        """Write ``report.md``, ``report.html`` and ``report.json`` (the numbers) into ``folder``; returns the .md path."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "report.html").write_text(self.html(), encoding="utf-8")
        (folder / "report.json").write_text(json.dumps(self.data, indent=2, default=str), encoding="utf-8")
        path = folder / "report.md"
        path.write_text(self.markdown(), encoding="utf-8")
        return path
