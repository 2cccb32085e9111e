"""The two renderings of the document model: Markdown (text from the results HTML-escaped, so a viewer
that passes raw HTML through shows a model's `<script>` as text) and self-contained HTML (figures inline)."""

from __future__ import annotations

import base64
import html
import re

from fedleak.reports.document import Figure, Section, Table


def _md_text(text: str) -> str:
    """Text from the results as Markdown shows it: HTML-escaped, so a renderer that passes raw HTML
    through shows a model's `<script>` as text instead of running it."""
    return html.escape(text, quote=False)


def _md_cell(text: str) -> str:
    return _md_text(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(sections: list[Section]) -> str:
    """The document as Markdown, figures linked from plots/."""
    lines = ["# fedleak leakage report", ""]
    for section in sections:
        lines += [f"## {_md_text(section.title)}", ""]
        for block in section.blocks:
            if isinstance(block, Table):
                lines.append("| " + " | ".join(_md_cell(h) for h in block.header) + " |")
                lines.append("|" + "---|" * len(block.header))
                lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows]
            elif isinstance(block, Figure):
                alt = _md_text(block.caption).replace("[", "(").replace("]", ")").replace("\n", " ")
                lines.append(f"![{alt}](plots/{block.name}.png)")
            else:
                lines.append(_md_text(block))
            lines.append("")
    return "\n".join(lines)


STYLE = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:12px;display:block;overflow-x:auto;max-width:100%}
th,td{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top;overflow-wrap:anywhere;min-width:3em}
th{background:#f3f3f3;position:sticky;top:0}figure{display:inline-block;margin:.5em}img{max-width:100%;border:1px solid #eee}
figcaption{font-size:12px;max-width:60em}p{max-width:60em}"""


def _html_text(text: str) -> str:
    """Escape first, then mark up the Markdown `code` spans our own paragraphs use."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def render_html(sections: list[Section]) -> str:
    """The document as one self-contained HTML page, figures inline."""
    body = []
    for section in sections:
        body.append(f"<h2>{html.escape(section.title)}</h2>")
        for block in section.blocks:
            if isinstance(block, Table):
                head = "".join(f"<th>{html.escape(h)}</th>" for h in block.header)
                rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in block.rows)
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
            elif isinstance(block, Figure):
                data = base64.b64encode(block.png).decode()
                body.append(f'<figure><img alt="{html.escape(block.caption)}" src="data:image/png;base64,{data}">'
                            f"<figcaption>{_html_text(block.caption)}</figcaption></figure>")
            else:
                body.append(f"<p>{_html_text(block)}</p>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>fedleak leakage report</title>"
            f"<style>{STYLE}</style></head>\n<body><h1>fedleak leakage report</h1>\n" + "\n".join(body) + "\n</body></html>\n")
