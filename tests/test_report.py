"""The HTML report: escaped text, linked images (relative, quoted), embedded ones that decode back, atomic write."""

from __future__ import annotations

import base64
import io
import re
from urllib.parse import unquote

import pytest
import torch
from PIL import Image

from convscope.core.report import HtmlReport
from convscope.errors import ConvscopeError, ImageLoadError

DATA_URI = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def decode_images(html: str) -> list[Image.Image]:
    return [Image.open(io.BytesIO(base64.b64decode(b))) for b in DATA_URI.findall(html)]


def test_text_is_escaped():
    rep = HtmlReport("A & B <script>")
    rep.heading('Layer "conv1" <b>', level=3).text("x < y && y > z").table(
        [["<td>", 0.123456789, 3], ["a&b", "ok", None]], header=["name<", "score", "n"]
    )
    html = rep.html()
    assert "<script>" not in html and "<b>" not in html and "<td><td>" not in html
    assert "<title>A &amp; B &lt;script&gt;</title>" in html
    assert "<h3>Layer &quot;conv1&quot; &lt;b&gt;</h3>" in html
    assert "<p>x &lt; y &amp;&amp; y &gt; z</p>" in html
    assert "<th>name&lt;</th>" in html and "<td>&lt;td&gt;</td>" in html
    assert "<td>0.1235</td>" in html  # floats to 4 significant digits
    assert "http" not in html and "<script" not in html.lower()  # self-contained, no JS
    with pytest.raises(ConvscopeError):
        rep.heading("x", level=7)


def test_self_contained_embeds_png_data_uris(tmp_path):
    pil = Image.new("RGB", (31, 17), (200, 10, 10))
    tensor = torch.rand(3, 9, 13)
    path = tmp_path / "pic.jpg"
    Image.new("RGB", (20, 12), (0, 0, 250)).save(path)
    rep = HtmlReport("imgs", self_contained=True)
    rep.image(pil, caption="cap <1>", width=62)
    rep.figure_row([(tensor, "tensor"), (path, "file")])
    html = rep.html()
    decoded = decode_images(html)
    assert [im.size for im in decoded] == [(31, 17), (13, 9), (20, 12)]
    assert all(im.format == "PNG" for im in decoded)
    assert decoded[0].convert("RGB").getpixel((5, 5)) == (200, 10, 10)
    assert "<figcaption>cap &lt;1&gt;</figcaption>" in html
    assert 'width="62"' in html and 'class="row"' in html
    with pytest.raises(ImageLoadError, match="missing.png"):
        rep.image(tmp_path / "missing.png")
    png = tmp_path / "p.png"
    Image.new("RGBA", (5, 4), (1, 2, 3, 128)).save(png)
    assert f'src="data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()}"' in (
        HtmlReport("raw", self_contained=True).image(png).html())  # a PNG file is embedded as its own bytes


def test_default_links_files_by_relative_path(tmp_path):
    out = tmp_path / "out"
    pics = [out / "a.png", out / "sub dir" / "b#1.png", tmp_path / "elsewhere" / "c.png"]
    for i, p in enumerate(pics):
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40 + i, 30), (i, 0, 0)).save(p)
    rep = HtmlReport("links").image(pics[0], caption="a", width=80)
    rep.figure_row([(pics[1], "b"), (pics[2], "c")]).image(Image.new("RGB", (3, 2)), caption="in memory")
    page = rep.write(out / "report.html")
    html = page.read_text()
    srcs = re.findall(r'<img src="([^"]+)"', html)
    assert srcs[:3] == ["a.png", "sub%20dir/b%231.png", "../elsewhere/c.png"]
    assert srcs[3].startswith("data:image/png;base64,")  # nothing to link: embedded
    for src, pic in zip(srcs, pics):  # every link resolves, from the page's folder, to the file given
        assert (page.parent / unquote(src)).resolve() == pic.resolve()
    assert 'class="px"' in html  # 80 px shown for a 40 px image: pixelated
    assert [f.resolve() for f in rep.files()] == [p.resolve() for p in pics]
    assert rep.html(tmp_path / "elsewhere" / "r.html").count('src="c.png"') == 1  # relative to where it is written
    assert len(html) < 2000  # no pixels inside
    with pytest.raises(ImageLoadError, match="missing.png"):
        rep.image(out / "missing.png")
    (out / "notes.png").write_text("not an image")
    with pytest.raises(ImageLoadError, match="notes.png"):
        rep.image(out / "notes.png")


def test_write_is_atomic_and_complete(tmp_path):
    rep = HtmlReport("written").text("hello")
    out = rep.write(tmp_path / "reports" / "r.html")
    assert out.read_text(encoding="utf-8") == rep.html()
    assert out.read_text().startswith("<!DOCTYPE html>") and out.read_text().rstrip().endswith("</html>")
    assert sorted(p.name for p in out.parent.iterdir()) == ["r.html"]
