"""Comparing dissections across conditions (models, checkpoints, layers): detectors per category."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ...errors import ConvscopeError
from .results import LayerDissection

# --------------------------------------------------------------------------- comparing conditions


@dataclass(frozen=True)
class Comparison:
    """Detectors per category side by side (survey Sec. 6.3.2): ``rows`` one dict per (condition, layer) with
    ``condition``, ``layer``, per category the unique detectors, ``total`` unique detectors, ``detector_units`` and
    ``units``."""

    conditions: list[str]
    layers: list[str]
    categories: list[str]
    rows: list[dict[str, Any]]

    def text(self) -> str:
        """A plain-text table."""
        head = ["condition", "layer", *self.categories, "total", "detector_units", "units"]
        lines = [head] + [[str(r[h]) for h in head] for r in self.rows]
        widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
        return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths)) for line in lines)


def compare(results_by_name: Mapping[str, Mapping[str, LayerDissection]]) -> Comparison:
    """Unique detectors per category for several conditions (e.g. checkpoints, training regimes) side by side.

    ``results_by_name`` maps a condition name to a :func:`dissect` result; rows follow the given order.
    """
    if not results_by_name:
        raise ConvscopeError("compare() got no results; pass {name: dissect(...)} for at least one condition")
    cats: list[str] = []
    layers: list[str] = []
    rows = []
    for name, res in results_by_name.items():
        for layer, d in res.items():
            if not isinstance(d, LayerDissection):
                raise ConvscopeError(f"compare(): {name!r} / {layer!r} is a {type(d).__name__}, not a LayerDissection;"
                                     " pass the dicts dissect() returns")
            cats += [c for c in d.categories if c not in cats]
            layers += [layer] if layer not in layers else []
    for name, res in results_by_name.items():
        for layer, d in res.items():
            s = d.summary()
            row: dict[str, Any] = {"condition": name, "layer": layer}
            row.update({c: s.get(c, 0) for c in cats})
            row.update(total=sum(s.values()), detector_units=len(d.detectors()), units=len(d.rows))
            rows.append(row)
    return Comparison(list(results_by_name), layers, cats, rows)
