"""A small self-contained HTML report: figures next to the tables of numbers behind them."""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path

from vitlab.checkpoints.io import atomic_write


@dataclass(frozen=True, kw_only=True)
class Section:
    """Args:
    title: heading.
    figure: file name of a PNG next to the report (relative link), or None.
    text: a paragraph under the heading.
    table: header row + data rows; cells are formatted with ``str`` (floats to 4 significant digits).
    """

    title: str
    figure: str | None = None
    text: str = ""
    table: list[list] = field(default_factory=list)


STYLE = (
    "body{font-family:sans-serif;max-width:960px;margin:2em auto;}"
    "table{border-collapse:collapse;margin:0.5em 0;}td,th{border:1px solid #bbb;padding:2px 8px;"
    "text-align:right;}th{background:#eee;}code{background:#f4f4f4;padding:1px 4px;}"
    "img{max-width:100%;border:1px solid #ddd;}"
)


def _cell(v) -> str:
    if isinstance(v, float):
        return html.escape(f"{v:.4g}")
    return html.escape(str(v))


def render_report(*, title: str, meta: list[tuple[str, str]], sections: list[Section]) -> str:
    parts = [
        "<!DOCTYPE html>",
        "<html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        f"<style>{STYLE}</style>",
        "</head><body>",
        f"<h1>{html.escape(title)}</h1>",
        "<table>",
    ]
    for k, v in meta:
        parts.append(f"<tr><th>{html.escape(k)}</th><td style='text-align:left'><code>{html.escape(v)}</code></td></tr>")
    parts.append("</table>")
    for s in sections:
        parts.append(f"<h2>{html.escape(s.title)}</h2>")
        if s.text:
            parts.append(f"<p>{html.escape(s.text)}</p>")
        if s.figure:
            parts.append(f"<p><a href='{html.escape(s.figure)}'><img src='{html.escape(s.figure)}' "
                         f"alt='{html.escape(s.title)}'></a></p>")
        if s.table:
            head, *rows = s.table
            parts.append("<table><tr>" + "".join(f"<th>{_cell(h)}</th>" for h in head) + "</tr>")
            for row in rows:
                parts.append("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>")
            parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report(path: str | Path, *, title: str, meta: list[tuple[str, str]], sections: list[Section]) -> Path:
    """Write the report atomically; figures are linked relative to the report's folder."""
    text = render_report(title=title, meta=meta, sections=sections)
    out = atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    out.chmod(0o644)  # the temporary file was private; a report is meant to be read
    return out
