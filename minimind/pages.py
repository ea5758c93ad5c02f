"""Reports as a list of blocks, written as Markdown and as one self-contained HTML page.

A block is a tuple: ``("h1"|"h2"|"h3", text)``, ``("p", text)``, ``("ul", [items])``,
``("table", header, rows)``, ``("img", title, source)`` (a PNG: a path relative to the page's directory,
or its bytes) or ``("pre", text)``. Text (not table cells) may hold Markdown's `code` spans and
``[text](https://...)`` links. The sweep report
(``tune/report.py``) and the experiment page (``experiment/page.py``) are built this way, so their Markdown
and HTML never drift apart.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path


def to_markdown(blocks: list[tuple]) -> str:
    lines: list[str] = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2", "h3"):
            lines += ["#" * int(kind[1]) + " " + block[1], ""]
        elif kind == "p":
            lines += [block[1], ""]
        elif kind == "ul":
            lines += [f"- {item}" for item in block[1]] + [""]
        elif kind == "table":
            _, header, rows = block
            lines.append("| " + " | ".join(_md_cell(cell) for cell in header) + " |")
            lines.append("|" + "---|" * len(header))
            lines += ["| " + " | ".join(_md_cell(cell) for cell in row) + " |" for row in rows]
            lines.append("")
        elif kind == "img" and isinstance(block[2], str):
            lines += [f"![{block[1]}]({block[2]})", ""]
        elif kind == "pre":
            lines += ["```", block[1], "```", ""]
    return "\n".join(lines)


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
code { background: #f4f4f4; padding: 0 0.2em; }
pre { background: #f7f7f7; padding: 0.6em; overflow-x: auto; }
img { max-width: 100%; }
"""


def to_html(blocks: list[tuple], title: str, base_dir: str | Path) -> str:
    """The blocks as one self-contained page: PNGs inlined as data URIs, no external resources."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head><body>",
    ]
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2", "h3"):
            parts.append(f"<{kind}>{_inline_html(block[1])}</{kind}>")
        elif kind == "p":
            parts.append(f"<p>{_inline_html(block[1])}</p>")
        elif kind == "ul":
            parts.append("<ul>" + "".join(f"<li>{_inline_html(item)}</li>" for item in block[1]) + "</ul>")
        elif kind == "table":
            _, header, rows = block
            head = "".join(f"<th>{html.escape(str(cell))}</th>" for cell in header)
            body = "".join(
                "<tr>" + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in row) + "</tr>" for row in rows
            )
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif kind == "img":
            png = block[2] if isinstance(block[2], bytes) else (Path(base_dir) / block[2]).read_bytes()
            encoded = base64.b64encode(png).decode("ascii")
            parts.append(f'<p><img alt="{html.escape(block[1])}" src="data:image/png;base64,{encoded}"></p>')
        elif kind == "pre":
            parts.append(f"<pre>{html.escape(block[1])}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _inline_html(text: str) -> str:
    """Escaped text, with Markdown's `code` spans as <code> and its [text](https://...) links as links."""
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))
    return re.sub(r"\[([^\]]+)\]\((https?://[^\s)]+)\)", r'<a href="\2">\1</a>', text)
