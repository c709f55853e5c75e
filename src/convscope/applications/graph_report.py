"""``convscope graph``: the model's computation graph as an SVG and an HTML page.

:func:`graph_report` traces the model (:func:`~convscope.methods.graph.model_graph`) and writes, atomically,

* ``graph.svg``: a top-to-bottom layered drawing of the DAG laid out here, in pure Python (no graphviz): layers
  by longest path from the input, edges longer than one layer routed through dummy points, the order in each
  layer by barycenter sweeps (Sugiyama et al. 1981), x positions by weighted least squares towards the
  neighbours' positions with a minimum gap (pool-adjacent-violators), real nodes pulled harder than edge bends.
  Leaf-module calls are boxes (name; type, output shape, parameters), joins (residual ``add``, ``cat``, ``mul``)
  circles, container modules nested, labelled frames; hovering a node shows its details;
* ``graph.html``: the SVG inline and the module tree as collapsible blocks (``<details>``), each listing its
  nodes with type, output shape, units, parameters and inputs;
* ``graph.json``: :meth:`ModelGraph.to_dict`.
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw
from torch import nn

from ..core.io import atomic_write_text, check_output_dir
from ..core.render import load_font, save_png
from ..methods.graph import GraphNode, ModelGraph, model_graph

__all__ = ["GraphLayout", "GraphRun", "graph_png", "graph_report", "graph_svg", "layered_layout", "module_tree"]

CHAR_W = 6.6  # width of one character of the 11 px monospace font
NODE_H, JOIN_R, RANK_GAP, NODE_GAP, BEND_GAP = 34.0, 13.0, 30.0, 24.0, 14.0
MARGIN = 30.0
REAL_WEIGHT, BEND_WEIGHT = 8.0, 1.0

Point = tuple[float, float]


@dataclass(frozen=True)
class GraphLayout:
    """Node centres and sizes, each edge's polyline (source bottom -> bends -> target top), the drawing size."""

    centres: dict[str, Point]
    sizes: dict[str, Point]
    paths: dict[tuple[str, str], list[Point]]
    width: float
    height: float


def _pav(y: list[float], w: list[float]) -> list[float]:
    """Weighted least squares ``min sum w_i (z_i - y_i)^2`` subject to ``z`` non-decreasing (pool adjacent
    violators)."""
    blocks: list[list[float]] = []  # [value, weight, count]
    for yi, wi in zip(y, w):
        blocks.append([yi, wi, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            v2, w2, c2 = blocks.pop()
            v1, w1, c1 = blocks.pop()
            blocks.append([(v1 * w1 + v2 * w2) / (w1 + w2), w1 + w2, c1 + c2])
    out: list[float] = []
    for v, _, c in blocks:
        out += [v] * int(c)
    return out


def layered_layout(names: list[str], edges: list[tuple[str, str]], sizes: dict[str, Point],
                   sweeps: int = 8) -> GraphLayout:
    """Top-to-bottom layered layout of a DAG whose ``names`` are in a topological order (``sizes``: width,
    height of each node)."""
    index = {n: i for i, n in enumerate(names)}
    preds: dict[str, list[str]] = {n: [] for n in names}
    for u, v in edges:
        preds[v].append(u)
    rank: dict[str, int] = {}
    for name in names:
        rank[name] = 1 + max((rank[u] for u in preds[name]), default=-1)
    # dummy points on long edges: ("~", edge number, rank)
    up: dict[object, list[object]] = {n: [] for n in names}
    down: dict[object, list[object]] = {n: [] for n in names}
    chains: dict[tuple[str, str], list[object]] = {}
    order_key: dict[object, float] = {n: float(index[n]) for n in names}
    rank_of: dict[object, int] = {n: r for n, r in rank.items()}
    for k, (u, v) in enumerate(edges):
        chain: list[object] = [u]
        for r in range(rank[u] + 1, rank[v]):
            d = ("~", k, r)
            rank_of[d], order_key[d] = r, index[u] + 0.5
            up[d], down[d] = [], []
            chain.append(d)
        chain.append(v)
        for a, b in zip(chain, chain[1:]):
            down[a].append(b)
            up[b].append(a)
        chains[(u, v)] = chain[1:-1]
    layers: list[list[object]] = [[] for _ in range(max(rank_of.values(), default=0) + 1)]
    for n in sorted(rank_of, key=lambda n: order_key[n]):
        layers[rank_of[n]].append(n)

    pos = {n: float(i) for layer in layers for i, n in enumerate(layer)}
    for s in range(sweeps):  # barycenter ordering, down then up
        seq = range(1, len(layers)) if s % 2 == 0 else range(len(layers) - 2, -1, -1)
        for r in seq:
            nb = up if s % 2 == 0 else down
            bary = {n: (sum(pos[m] for m in nb[n]) / len(nb[n]) if nb[n] else pos[n]) for n in layers[r]}
            layers[r].sort(key=lambda n: (bary[n], pos[n]))
            for i, n in enumerate(layers[r]):
                pos[n] = float(i)

    def width(n: object) -> float:
        return sizes[n][0] if n in sizes else 0.0

    def gap(a: object, b: object) -> float:
        g = NODE_GAP if (a in sizes and b in sizes) else BEND_GAP
        return width(a) / 2 + g + width(b) / 2

    x: dict[object, float] = {}
    for layer in layers:
        acc = 0.0
        for i, n in enumerate(layer):
            acc += gap(layer[i - 1], n) if i else 0.0
            x[n] = acc
        shift = acc / 2
        for n in layer:
            x[n] -= shift
    for s in range(2 * sweeps):  # x by weighted least squares towards the neighbours, minimum gaps kept
        seq = range(1, len(layers)) if s % 2 == 0 else range(len(layers) - 2, -1, -1)
        for r in seq:
            layer = layers[r]
            nb = up if s % 2 == 0 else down
            want = [sum(x[m] for m in nb[n]) / len(nb[n]) if nb[n] else x[n] for n in layer]
            offs = [0.0]
            for a, b in zip(layer, layer[1:]):
                offs.append(offs[-1] + gap(a, b))
            z = _pav([w - o for w, o in zip(want, offs)], [REAL_WEIGHT if n in sizes else BEND_WEIGHT for n in layer])
            for n, zi, o in zip(layer, z, offs):
                x[n] = zi + o

    heights = [max((sizes[n][1] for n in layer if n in sizes), default=0.0) for layer in layers]
    ys, acc = [], MARGIN
    for h in heights:
        ys.append(acc + h / 2)
        acc += h + RANK_GAP
    left = min(x[n] - width(n) / 2 for n in x)
    right = max(x[n] + width(n) / 2 for n in x)
    dx = MARGIN - left
    centres = {n: (x[n] + dx, ys[rank[n]]) for n in names}
    paths = {}
    for (u, v), bends in chains.items():
        (xu, yu), (xv, yv) = centres[u], centres[v]
        pts = [(xu, yu + sizes[u][1] / 2)] + [(x[d] + dx, ys[rank_of[d]]) for d in bends] + [(xv, yv - sizes[v][1] / 2)]
        paths[(u, v)] = pts
    return GraphLayout(centres, dict(sizes), paths, right - left + 2 * MARGIN, acc - RANK_GAP + MARGIN)


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1_000_000 else f"{n / 1e3:.1f}k" if n >= 1000 else str(n)


def _shape(s: tuple[int, ...] | None) -> str:
    return "×".join(str(v) for v in s) if s else "-"


def _detail(n: GraphNode) -> str:
    params = f" · {_count(n.params)}" if n.params else ""
    return f"{n.type} {_shape(n.output_shape)}{params}"


def _fill(n: GraphNode) -> str:
    t = n.type.lower()
    if n.kind in ("input", "output"):
        return "#37474f"
    if n.kind == "join":
        return "#ffffff"
    for key, colour in (("conv", "#d6e6f5"), ("norm", "#e6def3"), ("pool", "#d8f0df"), ("linear", "#f7d9d6"),
                        ("relu", "#fde6c4"), ("sigmoid", "#fde6c4"), ("silu", "#fde6c4"), ("gelu", "#fde6c4"),
                        ("tanh", "#fde6c4"), ("softmax", "#fde6c4"), ("hardswish", "#fde6c4")):
        if key in t:
            return colour
    return "#eeeeee"


def _node_size(n: GraphNode) -> Point:
    if n.kind == "join":
        return (2 * JOIN_R, 2 * JOIN_R)
    text = max(len(n.name), len(_detail(n)) if n.kind == "module" else len(_shape(n.output_shape)) + 8)
    return (max(90.0, text * CHAR_W + 18), NODE_H)


def _tooltip(n: GraphNode) -> str:
    lines = [n.name, f"{n.kind}: {n.type}", f"output {_shape(n.output_shape)}"]
    if n.units is not None:
        lines.append(f"units {n.units}")
    if n.params:
        lines.append(f"parameters {n.params:,}")
    if n.inputs:
        lines.append("inputs: " + ", ".join(n.inputs))
    return "\n".join(lines)


JOIN_SYMBOLS = {"add": "+", "sub": "−", "mul": "×", "div": "÷", "cat": "cat", "stack": "stk"}
PNG_SYMBOLS = {"−": "-", "×": "x", "÷": "/"}  # PIL's default font has no glyphs for these


def _ancestors(group: str) -> list[str]:
    out = []
    while group:
        out.append(group)
        group = group.rpartition(".")[0]
    return out


@dataclass(frozen=True)
class _Frame:
    name: str
    box: tuple[float, float, float, float]
    tip: str


@dataclass(frozen=True)
class _Shape:
    node: GraphNode
    centre: Point
    size: Point
    lines: tuple[str, ...]
    fill: str
    tip: str


@dataclass(frozen=True)
class _Scene:
    """What is drawn: container frames (outer first), edge curves, nodes; the drawing size."""

    frames: list[_Frame]
    curves: list[list[Point]]
    shapes: list[_Shape]
    width: float
    height: float


def _scene(graph: ModelGraph) -> _Scene:
    nodes = {n.name: n for n in graph.nodes}
    sizes = {n.name: _node_size(n) for n in graph.nodes}
    lay = layered_layout(list(nodes), graph.edges, sizes)
    # container frames: bounding boxes of their nodes (and of the edge bends next to a node inside them)
    members: dict[str, list[tuple[float, float, float, float]]] = {}
    for n in graph.nodes:
        (cx, cy), (w, h) = lay.centres[n.name], sizes[n.name]
        for g in _ancestors(n.group):
            members.setdefault(g, []).append((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2))
    top = {g: min(b[1] for b in boxes) for g, boxes in members.items()}
    for (_, v), pts in lay.paths.items():  # an edge into a group is inside its frame below the group's top
        for g in _ancestors(nodes[v].group):
            members[g].extend((px, py, px, py) for px, py in pts[1:-1] if py > top[g])
    levels: dict[str, int] = {}
    for g in sorted(members, key=lambda g: -g.count(".")):
        kids = [levels[c] for c in levels if c.rpartition(".")[0] == g]
        levels[g] = 1 + max(kids) if kids else 0
    frames = []
    for g in sorted(members, key=lambda g: (g.count("."), g)):
        pad = 8.0 + 12.0 * levels[g]
        box = (min(b[0] for b in members[g]) - pad, min(b[1] for b in members[g]) - pad - 4,
               max(b[2] for b in members[g]) + pad, max(b[3] for b in members[g]) + pad - 4)
        info = graph.groups.get(g)
        tip = f"{g} ({info.type}, {info.params:,} parameters)" if info else g
        frames.append(_Frame(g, box, tip))
    shapes = []
    for n in graph.nodes:
        if n.kind == "join":
            lines: tuple[str, ...] = (JOIN_SYMBOLS.get(n.type, n.type[:3]),)
        else:
            lines = (n.name, _detail(n) if n.kind == "module" else _shape(n.output_shape))
        shapes.append(_Shape(n, lay.centres[n.name], sizes[n.name], lines, _fill(n), _tooltip(n)))
    return _Scene(frames, list(lay.paths.values()), shapes, lay.width, lay.height)


def _linked(part: str, href: str | None, name: str) -> str:
    """``part`` wrapped in an SVG link to ``href`` (as is without one)."""
    if href is None:
        return part
    return f'<a href="{html.escape(href)}" class="link" data-name="{html.escape(name)}">{part}</a>'


def graph_svg(graph: ModelGraph, links: Mapping[str, str] | None = None) -> str:
    """The graph as a standalone SVG document (layout by :func:`layered_layout`); hovering a node or a frame
    shows its details. ``links``: node or container (frame) name -> URL; those nodes and frames are links
    (``<a class="link" data-name=NAME>``), e.g. the live explorer's layer views."""
    sc = _scene(graph)
    esc = html.escape
    links = links or {}
    parts: list[str] = []
    for f in sc.frames:
        x0, y0, x1, y1 = f.box
        parts.append(_linked(f'<g class="group"><title>{esc(f.tip)}</title><rect x="{x0:.1f}" y="{y0:.1f}" '
                     f'width="{x1 - x0:.1f}" height="{y1 - y0:.1f}" rx="8" fill="#78909c" fill-opacity="0.06" '
                     f'stroke="#90a4ae" stroke-dasharray="4 3"/><text x="{x0 + 6:.1f}" y="{y0 + 10:.1f}" '
                     f'class="g">{esc(f.name)}</text></g>', links.get(f.name), f.name))
    for pts in sc.curves:
        d = f"M{pts[0][0]:.1f},{pts[0][1]:.1f}"
        for (px, py), (qx, qy) in zip(pts, pts[1:]):
            my = (qy - py) / 2
            d += f" C{px:.1f},{py + my:.1f} {qx:.1f},{qy - my:.1f} {qx:.1f},{qy:.1f}"
        parts.append(f'<path d="{d}" class="e" marker-end="url(#arrow)"/>')
    for s in sc.shapes:
        (cx, cy), (w, h) = s.centre, s.size
        tip = f"<title>{esc(s.tip)}</title>"
        if s.node.kind == "join":
            fs = 15 if len(s.lines[0]) == 1 else 9
            parts.append(_linked(f'<g class="n join">{tip}<circle cx="{cx:.1f}" cy="{cy:.1f}" r="{JOIN_R}" '
                                 f'fill="#fff" stroke="#37474f" stroke-width="1.4"/><text x="{cx:.1f}" '
                                 f'y="{cy + fs / 3:.1f}" text-anchor="middle" font-size="{fs}">{esc(s.lines[0])}'
                                 '</text></g>', links.get(s.node.name), s.node.name))
            continue
        colour = ' fill="#fff"' if s.node.kind in ("input", "output") else ""
        parts.append(_linked(f'<g class="n">{tip}<rect x="{cx - w / 2:.1f}" y="{cy - h / 2:.1f}" width="{w:.1f}" '
                             f'height="{h:.1f}" rx="5" fill="{s.fill}" stroke="#546e7a"/>'
                             f'<text x="{cx:.1f}" y="{cy - 3:.1f}" text-anchor="middle" font-weight="bold"{colour}>'
                             f'{esc(s.lines[0])}</text><text x="{cx:.1f}" y="{cy + 11:.1f}" text-anchor="middle" '
                             f'class="d"{colour}>{esc(s.lines[1])}</text></g>', links.get(s.node.name), s.node.name))
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{sc.width:.0f}" height="{sc.height:.0f}" '
            f'viewBox="0 0 {sc.width:.1f} {sc.height:.1f}" font-family="ui-monospace, Menlo, Consolas, monospace" '
            'font-size="11">\n<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" '
            'markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#546e7a"/></marker>'
            '<style>.e{fill:none;stroke:#546e7a;stroke-width:1.2} .d{font-size:10px;fill:#37474f} '
            '.g{font-size:10px;fill:#607d8b} .n:hover rect,.n:hover circle{stroke:#d84315;stroke-width:2} '
            '.link{cursor:pointer} .link:hover .group>rect{stroke:#d84315;stroke-dasharray:none}</style>'
            '</defs>\n<rect width="100%" height="100%" fill="#fff"/>\n' + "\n".join(parts) + "\n</svg>\n")


def _bezier(pts: list[Point], k: int = 12) -> list[Point]:
    out = [pts[0]]
    for (px, py), (qx, qy) in zip(pts, pts[1:]):
        my = (qy - py) / 2
        c = ((px, py), (px, py + my), (qx, qy - my), (qx, qy))
        for i in range(1, k + 1):
            t = i / k
            a, b, cc, d = (1 - t) ** 3, 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t * t, t ** 3
            out.append((a * c[0][0] + b * c[1][0] + cc * c[2][0] + d * c[3][0],
                        a * c[0][1] + b * c[1][1] + cc * c[2][1] + d * c[3][1]))
    return out


def graph_png(graph: ModelGraph, scale: float = 1.0) -> Image.Image:
    """The same drawing as :func:`graph_svg`, rasterized with PIL (for documents and image viewers)."""
    sc = _scene(graph)
    img = Image.new("RGB", (int(sc.width * scale) + 1, int(sc.height * scale) + 1), "white")
    draw = ImageDraw.Draw(img)
    font, small = load_font(round(11 * scale)), load_font(round(10 * scale))

    def p(x: float, y: float) -> tuple[float, float]:
        return (x * scale, y * scale)

    for f in sc.frames:
        x0, y0, x1, y1 = f.box
        draw.rounded_rectangle([p(x0, y0), p(x1, y1)], radius=8 * scale, fill=(246, 248, 249), outline=(144, 164, 174))
        draw.text(p(x0 + 6, y0 + 1), f.name, fill=(96, 125, 139), font=small)
    for pts in sc.curves:
        line = [p(x, y) for x, y in _bezier(pts)]
        draw.line(line, fill=(84, 110, 122), width=max(1, round(1.2 * scale)))
        (ex, ey) = line[-1]
        a = 5 * scale
        draw.polygon([(ex, ey), (ex - a * 0.7, ey - a * 1.4), (ex + a * 0.7, ey - a * 1.4)], fill=(84, 110, 122))
    for s in sc.shapes:
        (cx, cy), (w, h) = s.centre, s.size
        if s.node.kind == "join":
            draw.ellipse([p(cx - JOIN_R, cy - JOIN_R), p(cx + JOIN_R, cy + JOIN_R)], fill="white",
                         outline=(55, 71, 79), width=max(1, round(1.4 * scale)))
            draw.text(p(cx, cy), PNG_SYMBOLS.get(s.lines[0], s.lines[0]), fill=(0, 0, 0), font=font, anchor="mm")
            continue
        dark = s.node.kind in ("input", "output")
        draw.rounded_rectangle([p(cx - w / 2, cy - h / 2), p(cx + w / 2, cy + h / 2)], radius=5 * scale,
                               fill=s.fill, outline=(84, 110, 122))
        ink = (255, 255, 255) if dark else (20, 20, 20)
        draw.text(p(cx, cy - 7), s.lines[0], fill=ink, font=font, anchor="mm")
        draw.text(p(cx, cy + 8), s.lines[1].replace("×", "x"), fill=ink if dark else (55, 71, 79), font=small,
                  anchor="mm")
    return img


@dataclass(frozen=True)
class GraphRun:
    """Files written by :func:`graph_report` (``png`` None unless asked for) and the traced graph."""

    svg: Path
    html: Path
    json: Path
    graph: ModelGraph
    png: Path | None = None


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em; color: #222; }
details { margin: 0.2em 0 0.2em 1.2em; } summary { cursor: pointer; }
summary .t { color: #607d8b; font-size: 0.9em; }
table { border-collapse: collapse; margin: 0.3em 0 0.6em 1.2em; font-size: 0.88em; }
th, td { border: 1px solid #ddd; padding: 0.15em 0.5em; text-align: left; }
th { background: #f3f3f3; } code { font-size: 0.95em; }
.svg { overflow: auto; border: 1px solid #ddd; max-height: 90vh; }
""".strip()


def module_tree(graph: ModelGraph, links: Mapping[str, str] | None = None, open_depth: int = 1) -> str:
    """The module tree as nested collapsible blocks (``<details>``, the first ``open_depth`` levels open), each
    listing its nodes (type, output shape, units, parameters, inputs). ``links``: node or container name -> URL;
    those names are links."""
    return _tree(graph, "", open_depth, links or {})


def _tree(graph: ModelGraph, group: str, open_depth: int, links: Mapping[str, str]) -> str:
    esc = html.escape

    def name(text: str, shown: str) -> str:
        code = f"<code>{esc(shown)}</code>"
        return f'<a href="{esc(links[text])}">{code}</a>' if text in links else code

    g = graph.groups[group]
    kids = [c for c in graph.groups.values() if c.parent == group]
    rows = graph.members(group)
    body = ""
    if rows:
        body += ("<table><tr><th>node</th><th>type</th><th>output</th><th>units</th><th>parameters</th>"
                 "<th>inputs</th></tr>" + "".join(
                     f"<tr><td>{name(n.name, n.name)}</td><td>{esc(n.type)}</td><td>{_shape(n.output_shape)}</td>"
                     f"<td>{'' if n.units is None else n.units}</td><td>{n.params:,}</td>"
                     f"<td>{esc(', '.join(n.inputs))}</td></tr>" for n in rows) + "</table>")
    body += "".join(_tree(graph, c.name, open_depth - 1, links) for c in kids)
    label = name(group, group) if group else f"<code>{esc(graph.model)}</code>"
    calls = sum(1 for n in graph.module_calls if n.module and (n.module + ".").startswith(group + "." if group else ""))
    summary = (f"<summary>{label} <span class=\"t\">{esc(g.type)} · {g.params:,} parameters · "
               f"{calls} module calls</span></summary>")
    return f"<details{' open' if open_depth > 0 else ''}>{summary}{body}</details>"


def graph_report(model: nn.Module, out: str | Path, input_size: int | tuple[int, int] | None = None,
                 graph: ModelGraph | None = None, png: bool = False) -> GraphRun:
    """Trace ``model`` (or take ``graph``) and write ``graph.svg``, ``graph.html`` and ``graph.json`` into
    the folder ``out`` (and ``graph.png``, the same drawing rasterized, with ``png=True``)."""
    out = check_output_dir(out)
    graph = graph if graph is not None else model_graph(model, input_size)
    svg = graph_svg(graph)
    svg_path = atomic_write_text(out / "graph.svg", svg)
    json_path = atomic_write_text(out / "graph.json", json.dumps(graph.to_dict(), indent=1))
    esc = html.escape
    joins: dict[str, int] = {}
    for n in graph.joins:
        joins[n.type] = joins.get(n.type, 0) + 1
    shared = sorted({n.module for n in graph.module_calls if n.call > 0 and n.module})
    summary = [("model", graph.model), ("input", _shape(graph.input_shape)), ("parameters", f"{graph.params:,}"),
               ("leaf-module calls", str(len(graph.module_calls))),
               ("joins", ", ".join(f"{k} {v}" for k, v in joins.items()) or "none"),
               ("modules called more than once", ", ".join(shared) or "none")]
    page = ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>convscope graph: {esc(graph.model)}</title>\n<style>\n{_CSS}\n</style>\n</head>\n<body>\n"
            f"<h1>Graph of {esc(graph.model)}</h1>\n<p>One forward pass of a {esc(_shape(graph.input_shape))} input, "
            "traced: every call of a leaf module is a box (name; type, output shape, parameters), operations that "
            "join branches are circles (+ residual addition, × gating, cat concatenation), container modules are "
            "dashed frames. Hover a node for its details. Also as <a href=\"graph.svg\">graph.svg</a> and "
            "<a href=\"graph.json\">graph.json</a>.</p>\n<table>"
            + "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in summary)
            + "</table>\n<h2>Modules</h2>\n" + module_tree(graph)
            + "\n<h2>Drawing</h2>\n<div class=\"svg\">\n" + svg + "</div>\n</body>\n</html>\n")
    html_path = atomic_write_text(out / "graph.html", page)
    png_path = save_png(graph_png(graph), out / "graph.png") if png else None
    return GraphRun(svg_path, html_path, json_path, graph, png_path)
