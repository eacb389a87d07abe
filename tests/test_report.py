"""The report writer: one structure rendered as Markdown, HTML and JSON."""

from __future__ import annotations

import json

from sketcharray.app.report import Report, markdown_table


def test_markdown_table_escapes_pipes_and_shows_missing_numbers_as_a_dash():
    text = markdown_table([{"a": "x|y", "b": float("nan")}, {"a": "z", "b": 0.123456}], [("a", "A"), ("b", "B")])
    assert text.splitlines() == ["| A | B |", "|---|---|", "| x\\|y | – |", "| z | 0.1235 |"]


def test_report_writes_the_same_sections_in_markdown_html_and_json(tmp_path):
    r = Report("title <1>")
    r.section("First")
    r.text("uses `code` & more")
    r.table([{"k": 1}], [("k", "key")])
    r.image("plot.png", "a plot")
    r.data["numbers"] = [1, 2]
    path = r.write(tmp_path)
    md = path.read_text()
    assert md.startswith("# title <1>\n") and "## First" in md and "![a plot](plot.png)" in md and "| key |" in md
    html = (tmp_path / "report.html").read_text()
    assert "<h1>title &lt;1&gt;</h1>" in html and "<code>code</code> &amp; more" in html
    assert "<th>key</th>" in html and "<img src='plot.png'" in html
    assert json.loads((tmp_path / "report.json").read_text()) == {"numbers": [1, 2]}
