"""Watch features form during training (Zeiler & Fergus 2014 Fig. 4; survey Sec. 4.3.3), from inside a training loop.

    monitor = cs.EvolutionMonitor(model, "features.relu2", units=[0, 5, 9], images=probe_batch, out="runs/evo")
    for epoch in range(epochs):
        train_one_epoch(model)
        monitor(epoch)            # epoch_XXX_<layer>.png and the running grid evolution_<layer>.png

Each call finds every unit's strongest activation over the fixed probe images (``top_k_activations``) and its
DeconvNet projection, cropped to the receptive field. The model is left as it was (mode, parameters, gradients,
hooks): every method runs through the probe, which restores it. With ``log_dir=`` (or a ``SummaryWriter`` as
``writer=``) the picture also goes to TensorBoard (``torch.utils.tensorboard``, which needs the ``tensorboard``
package; imported only when asked for).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..core.layers import resolve_layer
from ..core.render import save_png
from ..errors import ConvscopeError
from ..methods.topk import top_k_activations
from .deconv import check_units, evolution_grid, layer_units, projection_column, strongest_units, tensor_images


def _summary_writer(log_dir: str | Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:  # torch's module imports the tensorboard package
        raise ConvscopeError("EvolutionMonitor(log_dir=...) logs to TensorBoard, which needs the tensorboard "
                             "package: pip install convscope[tensorboard] (or leave log_dir unset)") from exc
    return SummaryWriter(log_dir=str(log_dir))


class EvolutionMonitor:
    """Per-epoch DeconvNet projections of chosen units over a fixed probe batch, plus a running units x epochs grid.

    Args:
        model: the network being trained (read, never changed).
        layer: the layer whose units are watched.
        units: unit indices; default the ``n_units`` strongest at the first call (then kept fixed).
        images: the probe batch ``N x C x H x W`` in the model's input space (kept on the model's device).
        out: folder for ``epoch_XXX_<layer>.png`` and ``evolution_<layer>.png``.
        every: only every ``every``-th epoch / step is recorded (``epoch % every == 0``).
        k: projections per unit (its k strongest activations, one per image).
        writer: an object with ``add_image(tag, CHW tensor, global_step)`` (a ``SummaryWriter``), or
        log_dir: a TensorBoard log folder (a ``SummaryWriter`` is made; needs the ``tensorboard`` package).
    """

    def __init__(self, model: nn.Module, layer: str, units: Sequence[int] | None = None,
                 images: torch.Tensor | None = None, out: str | Path = "runs/evolution", every: int = 1, k: int = 1,
                 n_units: int = 8, writer: Any = None, log_dir: str | Path | None = None, tag: str = "",
                 batch_size: int = 32) -> None:
        if images is None:
            raise ConvscopeError("EvolutionMonitor(images=...): give a fixed probe batch N x C x H x W")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ConvscopeError(f"EvolutionMonitor(every={every!r}): use a positive int")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConvscopeError(f"EvolutionMonitor(k={k!r}): use a positive int")
        if writer is not None and log_dir is not None:
            raise ConvscopeError("EvolutionMonitor: give writer= or log_dir=, not both")
        self.model = model
        self.layer = resolve_layer(model, layer)[0]
        self.images = tensor_images(images.detach(), model)
        self.n_all = layer_units(model, self.layer, self.images.load([0]))
        self.units = check_units(units, self.n_all, self.layer) if units is not None else None
        self.out = Path(out)
        self.every, self.k, self.n_units, self.batch_size = every, k, n_units, batch_size
        self._own_writer = log_dir is not None
        self.writer = _summary_writer(log_dir) if log_dir is not None else writer
        if self.writer is not None and not callable(getattr(self.writer, "add_image", None)):
            raise ConvscopeError("EvolutionMonitor(writer=...): give a torch.utils.tensorboard.SummaryWriter (an "
                                 "object with add_image)")
        self.tag = tag or f"deconvnet/{self.layer}"
        self.labels: list[str] = []
        self.columns: list[list[Image.Image]] = []
        self.stem = self.layer.replace("/", "_")

    @property
    def grid_path(self) -> Path:
        return self.out / f"evolution_{self.stem}.png"

    def __call__(self, epoch: int) -> Path | None:
        """Record ``epoch`` (skipped unless ``epoch % every == 0``): returns the epoch's PNG, or None if skipped."""
        if epoch % self.every:
            return None
        found = top_k_activations(self.model, self.images.batches(self.batch_size), self.layer, k=self.k,
                                  progress=False)[self.layer]
        if self.units is None:
            self.units = strongest_units(found, self.n_units)
        column = projection_column(self.model, self.images, found, self.units, self.batch_size)
        label = f"epoch {epoch}"
        png = save_png(evolution_grid([column], self.units, [label]), self.out / f"epoch_{epoch:03d}_{self.stem}.png")
        self.labels.append(label)
        self.columns.append(column)
        running = evolution_grid(self.columns, self.units, self.labels)
        save_png(running, self.grid_path)
        if self.writer is not None:
            pic = torch.from_numpy(np.array(running.convert("RGB"))).permute(2, 0, 1)
            self.writer.add_image(self.tag, pic.float().div(255), global_step=epoch)  # CHW in [0, 1]
        return png

    step = __call__

    def close(self) -> None:
        """Flush and close the writer this monitor made (a writer passed in is left to its owner)."""
        if self._own_writer and self.writer is not None:
            self.writer.close()


__all__ = ["EvolutionMonitor"]
