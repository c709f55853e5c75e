"""A self-contained HTML report: headings, text, tables and images embedded as PNG data URIs."""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from convscope.core.images import load_image
from convscope.core.io import atomic_write_text
from convscope.core.render import to_pil
from convscope.errors import ConvscopeError

__all__ = ["HtmlReport"]

ImageLike = Image.Image | torch.Tensor | str | os.PathLike[str]

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1100px;
       margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.45; }
h1, h2, h3 { font-weight: 600; }
figure { margin: 0.8em 0; display: inline-block; }
figcaption { font-size: 0.9em; color: #555; margin-top: 0.3em; max-width: 100%; }
img { max-width: 100%; height: auto; }
img.px { image-rendering: pixelated; }
.row { display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; }
.row figure { margin: 0; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.95em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; }
th { background: #f3f3f3; }
tr:nth-child(even) td { background: #fafafa; }
""".strip()


def _esc(text: Any) -> str:
    """HTML-escape ``str(text)`` (quotes included)."""
    return html.escape(str(text), quote=True)


def _cell(value: Any) -> str:
    """Table cell text: floats to 4 significant digits, everything else ``str``."""
    return _esc(f"{value:.4g}" if isinstance(value, float) else value)


def _to_pil(img: ImageLike) -> Image.Image:
    """A PIL image from a PIL image, a tensor in [0, 1] or an image file path."""
    if isinstance(img, Image.Image):
        return img
    if isinstance(img, torch.Tensor):
        return to_pil(img)
    if isinstance(img, str | os.PathLike):
        return load_image(img)
    raise ConvscopeError(
        f"HtmlReport.image got a {type(img).__name__}; pass a PIL image, a tensor or a path."
    )


def _data_uri(img: Image.Image) -> str:
    """``data:image/png;base64,...`` for a PIL image."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class HtmlReport:
    """Build a single-file HTML report; all text is escaped, images are embedded (no external files)."""

    def __init__(self, title: str) -> None:
        """Start a report with ``title`` as page title and top heading."""
        self.title = str(title)
        self._blocks: list[str] = [f"<h1>{_esc(self.title)}</h1>"]

    def heading(self, text: str, level: int = 2) -> HtmlReport:
        """Add a heading ``<h{level}>`` (level 1-6)."""
        if level not in range(1, 7):
            raise ConvscopeError(f"HtmlReport.heading(level={level}): use a level from 1 to 6.")
        self._blocks.append(f"<h{level}>{_esc(text)}</h{level}>")
        return self

    def text(self, paragraph: str) -> HtmlReport:
        """Add a paragraph of plain text."""
        self._blocks.append(f"<p>{_esc(paragraph)}</p>")
        return self

    def image(self, img: ImageLike, caption: str = "", width: int | None = None) -> HtmlReport:
        """Add an image (embedded PNG) with an optional caption and display width in pixels."""
        self._blocks.append(self._figure(img, caption, width))
        return self

    def figure_row(self, items: Sequence[tuple[ImageLike, str]], width: int | None = None) -> HtmlReport:
        """Add a horizontal (wrapping) row of captioned images."""
        figures = "".join(self._figure(img, caption, width) for img, caption in items)
        self._blocks.append(f'<div class="row">{figures}</div>')
        return self

    def table(self, rows: Sequence[Sequence[Any]], header: Sequence[str] | None = None) -> HtmlReport:
        """Add a table; floats are shown to 4 significant digits."""
        parts = ["<table>"]
        if header is not None:
            parts.append("<tr>" + "".join(f"<th>{_esc(h)}</th>" for h in header) + "</tr>")
        for row in rows:
            parts.append("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>")
        parts.append("</table>")
        self._blocks.append("".join(parts))
        return self

    def html(self) -> str:
        """The whole document as a string."""
        body = "\n".join(self._blocks)
        return (
            '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>{_esc(self.title)}</title>\n<style>\n{_CSS}\n</style>\n</head>\n"
            f"<body>\n{body}\n</body>\n</html>\n"
        )

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Write the report atomically (creating folders) and return its path."""
        return atomic_write_text(path, self.html())

    @staticmethod
    def _figure(img: ImageLike, caption: str, width: int | None) -> str:
        """One ``<figure>`` with an embedded image."""
        pil = _to_pil(img)
        if width is not None and (not isinstance(width, int) or width < 1):
            raise ConvscopeError(f"HtmlReport.image(width={width!r}): use a positive int or None.")
        attrs = f' width="{width}"' if width else ""
        cls = ' class="px"' if width and width > pil.width else ""
        alt = _esc(caption or "image")
        cap = f"<figcaption>{_esc(caption)}</figcaption>" if caption else ""
        return f'<figure><img src="{_data_uri(pil)}" alt="{alt}"{attrs}{cls}>{cap}</figure>'
