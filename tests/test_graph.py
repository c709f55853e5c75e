"""model_graph: leaf-module calls in execution order, joins (residual add, cat, mul), shared modules, the report."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest
import torch
from torch import nn

from convscope.applications.graph_report import graph_png, graph_report, layered_layout
from convscope.errors import ConvscopeError
from convscope.methods.graph import model_graph

pytestmark = pytest.mark.usefixtures("one_thread")


def hook_trace(model: nn.Module, x: torch.Tensor) -> list[str]:
    """The leaf modules in the order they run, by plain forward hooks (the independent reference)."""
    calls: list[str] = []
    handles = [m.register_forward_hook(lambda mod, i, o, n=n: calls.append(n))
               for n, m in model.named_modules() if n and next(m.children(), None) is None]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    return calls


@pytest.mark.parametrize("name,size", [("demo_net", 112), ("efficientnet_lite0", 224)])  # cs.load_model(name)
def test_zoo_graph_lists_every_leaf_call_in_order(name: str, size: int, request: pytest.FixtureRequest) -> None:
    model = request.getfixturevalue("lite0" if name == "efficientnet_lite0" else "demo")
    g = model_graph(model)
    assert [n.module for n in g.module_calls] == hook_trace(model, torch.zeros(1, 3, size, size))
    assert g.nodes[0].name == "input" and g.nodes[-1].name == "output"
    assert g.input_shape == (3, size, size)
    # every edge goes forward in execution order and every node but the input is fed
    pos = {n.name: i for i, n in enumerate(g.nodes)}
    assert all(pos[a] < pos[b] for a, b in g.edges)
    assert all(n.inputs for n in g.nodes[1:])
    assert g.params == sum(p.numel() for p in model.parameters())
    first = g.module_calls[0]
    conv = dict(model.named_modules())[first.module]
    assert first.params == sum(p.numel() for p in conv.parameters()) and first.units == conv.out_channels


def test_lite0_residual_adds_are_joins_of_two_inputs(lite0: nn.Module) -> None:
    model = lite0
    g = model_graph(model)
    residual = [i for i, b in enumerate(model.blocks) if b.residual]
    assert [n.name for n in g.joins] == [f"blocks.{i}.add" for i in residual]
    for i in residual:
        j = g.node(f"blocks.{i}.add")
        assert j.type == "add" and j.kind == "join" and j.group == f"blocks.{i}"
        prev = f"blocks.{i - 1}.add" if (i - 1) in residual else f"blocks.{i - 1}.bn2"
        assert j.inputs == (f"blocks.{i}.bn2", prev)
        assert j.output_shape == g.node(f"blocks.{i}.bn2").output_shape
        nxt = f"blocks.{i + 1}.expand_conv" if i + 1 < len(model.blocks) else "head.conv"
        assert g.node(nxt).inputs == (j.name,)  # the block's output is the join's


class SharedReLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2, self.relu = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 5, 3), nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv2(self.relu(self.conv1(x))))


def test_module_called_twice_gets_one_node_per_call() -> None:
    model = SharedReLU()
    g = model_graph(model, input_size=16)
    assert [n.name for n in g.module_calls] == ["conv1", "relu:0", "conv2", "relu:1"]
    assert [n.call for n in g.module_calls] == [0, 0, 0, 1]
    assert g.node("relu:0").inputs == ("conv1",) and g.node("conv2").inputs == ("relu:0",)
    assert g.node("relu:1").output_shape == (5, 12, 12) and g.node("output").inputs == ("relu:1",)


class Branchy(nn.Module):
    """Two branches concatenated, a squeeze-excite gate (mul), an in-place residual (+=), a functional flatten."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 2, 3, padding=1)
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(6, 6, 1), nn.Sigmoid())
        self.c = nn.Conv2d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 8 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([self.a(x), self.b(x)], dim=1)
        h = h * self.se(h)
        y = self.c(h)
        y += h
        return self.fc(torch.flatten(torch.relu(y), 1))


def test_cat_mul_and_inplace_add_are_joins() -> None:
    g = model_graph(Branchy(), input_size=8)
    assert [(n.name, n.type, n.inputs) for n in g.joins] == [
        ("cat", "cat", ("a", "b")), ("mul", "mul", ("cat", "se.2")), ("add", "add", ("c", "mul"))]
    assert g.node("a").inputs == ("input",) and g.node("b").inputs == ("input",)
    assert g.node("se.0").inputs == ("cat",) and g.node("c").inputs == ("mul",)
    assert g.node("cat").output_shape == (6, 8, 8)
    assert g.node("fc").inputs == ("add",)  # through relu and flatten (functional ops pass the producer on)
    assert g.node("se.1").group == "se" and g.groups["se"].type == "Sequential"


def test_model_left_as_it_came_also_when_it_fails() -> None:
    model = SharedReLU().train()
    model.conv1.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model_graph(model, input_size=12)
    assert model.training and model.relu.inplace and not model.conv1.weight.requires_grad
    assert model.conv2.weight.requires_grad and all(not m._forward_hooks and not m._forward_pre_hooks
                                                     for m in model.modules())
    with pytest.raises(ConvscopeError) as e:
        model_graph(model, input_size=3)  # too small for two 3x3 convolutions
    assert "\n" not in str(e.value) and "input size" in str(e.value)
    assert model.training and model.relu.inplace
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ConvscopeError):
        model_graph("demo_net")  # type: ignore[arg-type]


def test_layout_is_layered_and_nodes_do_not_overlap() -> None:
    names = ["in", "a", "b", "c", "j", "out"]
    edges = [("in", "a"), ("a", "b"), ("b", "c"), ("a", "j"), ("c", "j"), ("j", "out")]
    sizes = {n: (80.0, 30.0) for n in names}
    lay = layered_layout(names, edges, sizes)
    ys = {n: lay.centres[n][1] for n in names}
    assert all(ys[u] < ys[v] for u, v in edges)
    assert len(lay.paths[("a", "j")]) == 4  # two bends: the skip passes the ranks of b and c
    bends = lay.paths[("a", "j")][1:-1]
    for (bx, by) in bends:  # the skip edge runs beside b and c, not through them
        for n in ("b", "c"):
            if abs(lay.centres[n][1] - by) < 1:
                assert abs(lay.centres[n][0] - bx) >= 40
    assert all(lay.centres[n][0] - 40 >= 0 and lay.centres[n][0] + 40 <= lay.width for n in names)


def test_graph_report_writes_svg_html_json(tmp_path) -> None:
    run = graph_report(Branchy(), tmp_path / "g", input_size=8)
    svg = ET.parse(run.svg).getroot()
    ns = "{http://www.w3.org/2000/svg}"
    titles = [t.text for t in svg.iter(f"{ns}title")]
    assert sum(1 for t in titles if t and t.split("\n")[0] in {n.name for n in run.graph.nodes}) == len(run.graph.nodes)
    assert len(list(svg.iter(f"{ns}circle"))) == len(run.graph.joins)
    page = run.html.read_text()
    assert page.count("<details") == len(run.graph.groups) and "<svg" in page
    data = json.loads(run.json.read_text())
    assert [n["name"] for n in data["nodes"]] == [n.name for n in run.graph.nodes]
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == ["graph.html", "graph.json", "graph.svg"]
    img = graph_png(run.graph)
    assert img.size[0] > 100 and img.size[1] > 300
    assert graph_report(Branchy(), tmp_path / "p", input_size=8, png=True).png.stat().st_size > 1000
