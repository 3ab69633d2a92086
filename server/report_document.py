"""A report as a sequence of blocks, rendered as Markdown and as one self-contained HTML page.

The content is built once (headings, paragraphs, bullet lists, tables, plots as
PNG bytes) and rendered twice: :func:`to_markdown` links each plot as a file
under a plots directory, :func:`to_html` embeds it as a base64 ``data:`` URI
with minimal inline CSS, so the page needs no other file. Every text is
escaped for its format. :func:`write_report_files` writes both with the
project's atomic writer.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from common.atomic_files import atomic_write_bytes, atomic_write_text


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class Bullets:
    items: tuple[str, ...]


@dataclass(frozen=True)
class Table:
    """A table; ``key`` names it (the HTML id) and ``caption`` says what it holds."""

    key: str
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    caption: str = ""


@dataclass(frozen=True)
class Plot:
    """A PNG chart; ``key`` is its file stem under the plots directory and its HTML id."""

    key: str
    caption: str
    png: bytes

    @property
    def file_name(self) -> str:
        return f"{self.key}.png"


Block = Heading | Paragraph | Bullets | Table | Plot


# --- Markdown --------------------------------------------------------------------


def _md_cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _md_table(table: Table) -> list[str]:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(_md_cell(c) for c in cells) + " |"

    lines = [table.caption, ""] if table.caption else []
    return [*lines, line(table.header), line(["---"] * len(table.header)),
            *map(line, table.rows), ""]


def to_markdown(title: str, blocks: Sequence[Block], plots_dir: str) -> str:
    """The report as Markdown; a plot is an image link to ``plots_dir/<key>.png``."""
    lines = [f"# {title}", ""]
    for block in blocks:
        if isinstance(block, Heading):
            lines += [f"{'#' * block.level} {block.text}", ""]
        elif isinstance(block, Paragraph):
            lines += [block.text, ""]
        elif isinstance(block, Bullets):
            lines += [*(f"- {item}" for item in block.items), ""]
        elif isinstance(block, Table):
            lines += _md_table(block)
        else:
            lines += [f"![{block.caption}]({plots_dir}/{block.file_name})", ""]
    return "\n".join(lines)


# --- HTML --------------------------------------------------------------------------

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1f2328;
       max-width: 1100px; margin: 2rem auto; padding: 0 1.5rem; line-height: 1.45; }
h1 { font-size: 1.7rem; border-bottom: 2px solid #d0d7de; padding-bottom: .3rem; }
h2 { font-size: 1.3rem; margin-top: 2.2rem; border-bottom: 1px solid #d0d7de; }
table { border-collapse: collapse; margin: .6rem 0 1.2rem; font-size: .92rem; }
p.caption { color: #57606a; font-size: .92rem; margin-bottom: .2rem; }
th, td { border: 1px solid #d0d7de; padding: .3rem .65rem; }
th { background: #f6f8fa; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.num, td.short { white-space: nowrap; }
tr:nth-child(even) td { background: #fbfcfd; }
figure { margin: .6rem 0 1.4rem; }
figure img { max-width: 100%; height: auto; border: 1px solid #eaeef2; }
figcaption { color: #57606a; font-size: .9rem; }
"""


NUMBER = re.compile(r"^(\N{EN DASH}|[+-]?\d[\d.,]*(e[+-]?\d+)?( ?(%|KiB|MiB|s))?)$")
"""A cell that reads as one number, possibly with a unit, or the dash of a missing one."""
SHORT_CELL = 24
"""Cells up to this many characters stay on one line."""


def _cell_class(text: str) -> str:
    """``num`` (right-aligned), ``short`` (kept on one line) or ``text`` (may wrap)."""
    if NUMBER.match(text):
        return "num"
    return "short" if len(text) <= SHORT_CELL else "text"


def _html_table(table: Table) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in table.header)
    body = "".join(
        "<tr>" + "".join(
            f'<td class="{_cell_class(c)}">{esc(c)}</td>' for c in row) + "</tr>"
        for row in table.rows)
    # A paragraph, not <caption>: a caption wraps at the table's width, however narrow.
    caption = f'<p class="caption">{esc(table.caption)}</p>' if table.caption else ""
    return (f'{caption}<table id="{esc(table.key)}"><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table>")


def _html_block(block: Block) -> str:
    esc = html.escape
    if isinstance(block, Heading):
        return f"<h{block.level}>{esc(block.text)}</h{block.level}>"
    if isinstance(block, Paragraph):
        return f"<p>{esc(block.text)}</p>"
    if isinstance(block, Bullets):
        return "<ul>" + "".join(f"<li>{esc(item)}</li>" for item in block.items) + "</ul>"
    if isinstance(block, Table):
        return _html_table(block)
    data = base64.b64encode(block.png).decode("ascii")
    return (f'<figure><img id="{esc(block.key)}" alt="{esc(block.caption)}" '
            f'src="data:image/png;base64,{data}"><figcaption>{esc(block.caption)}'
            f"</figcaption></figure>")


def to_html(title: str, blocks: Sequence[Block]) -> str:
    """The report as one HTML page: inline CSS, plots embedded, every text escaped."""
    body = "\n".join(_html_block(b) for b in blocks)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
            f"<h1>{html.escape(title)}</h1>\n{body}\n</body>\n</html>\n")


# --- files ------------------------------------------------------------------------


@dataclass(frozen=True)
class ReportFiles:
    """Where a report was written: the Markdown (its plots beside it) and the HTML page."""

    markdown: Path
    html: Path


def write_report_files(title: str, blocks: Sequence[Block], markdown: Path, page: Path,
                       plots_dir: Path) -> ReportFiles:
    """Write the plots under ``plots_dir``, then ``markdown`` and ``page``, each atomically.

    The Markdown links the plots relative to its own directory, so ``plots_dir``
    must lie below it.
    """
    relative = plots_dir.relative_to(markdown.parent).as_posix()
    for plot in (b for b in blocks if isinstance(b, Plot)):
        atomic_write_bytes(plots_dir / plot.file_name, plot.png)
    atomic_write_text(markdown, to_markdown(title, blocks, relative))
    atomic_write_text(page, to_html(title, blocks))
    return ReportFiles(markdown, page)
