"""Pass 1: exact per-unit quantile thresholds ``T_f`` with ``P(a_f > T_f) = quantile`` (Bau et al. 2017, Eq. 18)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from ...errors import ConvscopeError

# --------------------------------------------------------------------------- pass 1: quantile thresholds


class TopBuffer:
    """Per unit, the ``k`` largest of ``n`` values, enough for the exact upper ``quantile`` (see module doc).

    The buffer is unordered (``topk(sorted=False)`` is a selection, four times cheaper than the sorted one); its row
    minimum is each unit's k-th largest so far, the bound below which later values are dropped.
    """

    def __init__(self, n: int, quantile: float, units: int, max_mb: float, layer: str) -> None:
        self.n, self.q = n, float(quantile)
        self.lo = math.floor((n - 1) * (1.0 - self.q))  # numpy's virtual index, integer part
        self.k = n - self.lo
        mb = units * self.k * 4 / 2**20
        if mb > max_mb:
            raise ConvscopeError(
                f"layer {layer!r}: the exact quantile needs {mb:.0f} MiB ({units} units x {self.k} values); raise "
                f"DissectConfig(max_buffer_mb=...) above that, or dissect fewer images or a smaller seg/image size")
        self._values: torch.Tensor | None = None  # units x (up to k), unordered
        self._bound: torch.Tensor | None = None  # its row minimum, once full
        self._units: list[torch.Tensor] = []  # candidates above the bound at the last merge: unit ids
        self._pending: list[torch.Tensor] = []  # ... and their values
        self._waiting = torch.zeros(units, dtype=torch.int64)  # candidates waiting, per unit

    @property
    def empty(self) -> bool:
        """No value seen yet."""
        return self._values is None

    def state(self) -> dict[str, torch.Tensor]:
        """Everything held, for a checkpoint (:meth:`from_state` restores it)."""
        self._merge()
        assert self._values is not None, "a checkpoint is written after the first batch"
        return {"n": torch.tensor(self.n), "values": self._values}

    @classmethod
    def from_state(cls, s: Mapping[str, torch.Tensor], quantile: float, max_mb: float, layer: str) -> TopBuffer:
        buf = cls(int(s["n"]), quantile, len(s["values"]), max_mb, layer)
        buf._set(s["values"])
        return buf

    def absorb(self, s: Mapping[str, torch.Tensor]) -> None:
        """Add the :meth:`state` of a buffer over other values of the same layer and dataset (a shard of it): the
        ``k`` largest of the union are kept. Exact whatever the order of the parts: each of the union's ``k``
        largest is among its own part's ``k`` largest, so the union of the parts' buffers holds them all."""
        if int(s["n"]) != self.n or len(s["values"]) != len(self._waiting):
            raise ConvscopeError(f"cannot merge a quantile buffer of {int(s['n'])} values x {len(s['values'])} units "
                                 f"into one of {self.n} x {len(self._waiting)}; the parts come from different runs")
        self._merge()
        v = s["values"].to(self._values.device) if self._values is not None else s["values"]
        if self._values is not None:
            v = torch.cat([self._values, v], 1)
        self._set(v.topk(min(self.k, v.shape[1]), dim=1, sorted=False).values)

    @property
    def values(self) -> torch.Tensor | None:
        """``units x k``: each unit's largest values so far, descending (waiting candidates merged first)."""
        self._merge()
        return None if self._values is None else self._values.sort(dim=1, descending=True).values

    def _set(self, v: torch.Tensor) -> None:
        self._values = v
        self._bound = v.amin(1) if v.shape[1] == self.k else None

    def _merge(self) -> None:
        if not self._pending or self._values is None:
            return
        units, vals = torch.cat(self._units).long(), torch.cat(self._pending)
        order = torch.argsort(units)
        units, vals = units[order], vals[order]
        counts = torch.bincount(units, minlength=self._values.shape[0])
        rank = torch.arange(len(units), device=units.device) - (counts.cumsum(0) - counts)[units]
        pad = torch.full((self._values.shape[0], int(counts.max())), -math.inf, device=vals.device)
        pad[units, rank] = vals  # units x most-waiting, each unit's candidates left-aligned
        self._set(torch.cat([self._values, pad], 1).topk(self.k, dim=1, sorted=False).values)
        self._units, self._pending = [], []
        self._waiting.zero_()

    def update(self, act: torch.Tensor) -> None:
        """Add a batch ``N x units (x H x W)``."""
        x = act.detach().float()
        if x.dim() == 2:
            x = x[:, :, None, None]
        if self._bound is not None:
            # a value not above the k-th largest (as of the last merge: a lower bound of the current one) can never
            # enter the final k: only the few above it wait, as (unit, value) pairs (read in memory order); the
            # buffer is re-selected once some unit has k / 2 waiting, so it is not re-selected every batch
            u = len(self._bound)
            if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
                x = x.permute(0, 2, 3, 1).reshape(-1, u)  # memory order: units last
                over = x > self._bound
            else:
                x = x.reshape(x.shape[0], u, -1)  # units first (a copy only if the layout is unusual)
                over = x > self._bound[:, None]
            at = over.reshape(-1).nonzero().squeeze(1)  # a flat scan: far cheaper than a masked select
            if len(at):
                units = at % u if over.dim() == 2 else (at // over.shape[2]) % u
                self._units.append(units.to(torch.int32))  # half the memory of the waiting pairs
                self._pending.append(x.reshape(-1)[at])
                self._waiting += torch.bincount(units, minlength=u).cpu()
                if int(self._waiting.max()) >= max(1, self.k // 2):
                    self._merge()
            return
        v = x.transpose(0, 1).reshape(x.shape[1], -1)
        if self._values is not None:
            v = torch.cat([self._values, v], 1)
        self._set(v.topk(min(self.k, v.shape[1]), dim=1, sorted=False).values)

    def thresholds(self) -> torch.Tensor:
        """``numpy.quantile(a_f, 1 - quantile)`` (linear interpolation) per unit, float64."""
        self._merge()
        assert self._values is not None
        low = self._values.topk(min(2, self._values.shape[1]), dim=1, largest=False).values.double()
        pos = (self.n - 1) * (1.0 - self.q)
        frac = pos - self.lo
        x_lo = low[:, 0]  # ascending index lo = the k-th largest = the buffer's minimum
        if self.lo + 1 > self.n - 1:
            return x_lo
        x_hi = low[:, 1]  # ascending index lo + 1 = the (k-1)-th largest
        return x_lo + frac * (x_hi - x_lo)


def float32_below(t: torch.Tensor) -> torch.Tensor:
    """The largest float32 values ``<= t`` (float64): for float32 ``a``, ``a > t`` iff ``a > float32_below(t)``."""
    t32 = t.float()
    over = t32.double() > t
    return torch.where(over, torch.nextafter(t32, torch.tensor(-math.inf)), t32)
