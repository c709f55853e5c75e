"""An HTML report: headings, text, tables and images.

By default image files are linked by their path relative to the page (the PNGs written beside it), so a report
stays small; ``self_contained=True`` embeds every image as a PNG data URI (one file to mail or archive). Images
given in memory (PIL images, tensors) have no file to link to and are always embedded: save them with
:func:`~convscope.core.render.save_png` first to link them.
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import torch
from PIL import Image

from convscope.core.images import load_image
from convscope.core.io import atomic_write_text
from convscope.core.render import to_pil
from convscope.errors import ConvscopeError, ImageLoadError

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


def _png_uri(data: bytes) -> str:
    """``data:image/png;base64,...`` for PNG bytes."""
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _encode(img: Image.Image) -> str:
    """``data:image/png;base64,...`` for a PIL image."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return _png_uri(buf.getvalue())


@dataclass(frozen=True)
class _Figure:
    """One image of the report: a file (``path``, absolute) or an embedded data URI (``uri``)."""

    path: Path | None
    uri: str
    size: tuple[int, int]
    caption: str
    width: int | None

    def html(self, base: Path, self_contained: bool) -> str:
        """``<figure>`` markup; a file is linked relative to ``base`` unless ``self_contained``."""
        if self.path is None:
            src = self.uri
        elif self_contained:
            src = _file_uri(self.path)
        else:
            src = _relative_url(self.path, base)
        attrs = f' width="{self.width}"' if self.width else ""
        cls = ' class="px"' if self.width and self.width > self.size[0] else ""
        alt = _esc(self.caption or "image")
        cap = f"<figcaption>{_esc(self.caption)}</figcaption>" if self.caption else ""
        return f'<figure><img src="{_esc(src)}" alt="{alt}"{attrs}{cls}>{cap}</figure>'


def _file_uri(path: Path) -> str:
    """A PNG data URI of an image file (a PNG's own bytes; other formats re-encoded as PNG)."""
    if path.suffix.lower() == ".png":
        try:
            data = path.read_bytes()
        except OSError as e:
            raise ImageLoadError(f"{path}: cannot read the image for the report ({e.strerror}); check that it "
                                 "still exists.") from None
        if data.startswith(b"\x89PNG\r\n\x1a\n"):
            return _png_uri(data)
    return _encode(load_image(path))


def _relative_url(path: Path, base: Path) -> str:
    """``path`` as a URL relative to the folder ``base`` (a ``file:`` URL where no relative path exists)."""
    try:
        rel = os.path.relpath(path, base)
    except ValueError:  # another drive on Windows
        return path.as_uri()
    return quote(Path(rel).as_posix())


def _image_size(path: Path) -> tuple[int, int]:
    """Width and height of an image file, read from its header; ImageLoadError naming the file when it is none."""
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return load_image(path).size  # raises ImageLoadError with the reason and the fix


class HtmlReport:
    """Build an HTML report; all text is escaped, there is no JavaScript.

    ``self_contained=False`` (default): images given as files are linked by relative path (keep them beside the
    page); ``True``: every image is embedded as a PNG data URI, so the page is one file.
    """

    def __init__(self, title: str, self_contained: bool = False) -> None:
        """Start a report with ``title`` as page title and top heading."""
        self.title = str(title)
        self.self_contained = bool(self_contained)
        self._blocks: list[str | tuple[bool, list[_Figure]]] = [f"<h1>{_esc(self.title)}</h1>"]

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
        """Add an image (a file, linked or embedded; a PIL image or tensor, embedded) with an optional caption and
        display width in pixels."""
        self._blocks.append((False, [self._figure(img, caption, width)]))
        return self

    def figure_row(self, items: Sequence[tuple[ImageLike, str]], width: int | None = None) -> HtmlReport:
        """Add a horizontal (wrapping) row of captioned images."""
        self._blocks.append((True, [self._figure(img, caption, width) for img, caption in items]))
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

    def files(self) -> list[Path]:
        """The image files the report shows (linked unless self-contained), in order."""
        return [f.path for b in self._blocks if isinstance(b, tuple) for f in b[1] if f.path is not None]

    def html(self, path: str | os.PathLike[str] | None = None) -> str:
        """The whole document as it would be written to ``path``: linked images are relative to its folder (the
        current folder when None)."""
        base = Path(os.path.abspath(Path(path).parent if path is not None else Path.cwd()))
        body = "\n".join(self._render(b, base) for b in self._blocks)
        return (
            '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>{_esc(self.title)}</title>\n<style>\n{_CSS}\n</style>\n</head>\n"
            f"<body>\n{body}\n</body>\n</html>\n"
        )

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Write the report atomically (creating folders) and return its path."""
        return atomic_write_text(path, self.html(path))

    def _render(self, block: str | tuple[bool, list[_Figure]], base: Path) -> str:
        """One block's markup: text as it is, figures (a row in a flex ``div``) with their sources resolved."""
        if isinstance(block, str):
            return block
        row, figures = block
        inner = "".join(f.html(base, self.self_contained) for f in figures)
        return f'<div class="row">{inner}</div>' if row else inner

    @staticmethod
    def _figure(img: ImageLike, caption: str, width: int | None) -> _Figure:
        """A figure for an image: files are checked now and read when the page is rendered."""
        if width is not None and (isinstance(width, bool) or not isinstance(width, int) or width < 1):
            raise ConvscopeError(f"HtmlReport.image(width={width!r}): use a positive int or None.")
        if isinstance(img, str | os.PathLike):
            path = Path(os.path.abspath(img))
            return _Figure(path, "", _image_size(path), str(caption), width)
        if isinstance(img, torch.Tensor):
            img = to_pil(img)
        if not isinstance(img, Image.Image):
            raise ConvscopeError(
                f"HtmlReport.image got a {type(img).__name__}; pass a PIL image, a tensor or a path."
            )
        return _Figure(None, _encode(img), img.size, str(caption), width)
