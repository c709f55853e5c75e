"""Screen inversion settings against the defaults table (issue 22, third round; docs/inversion.md, "Defaults by
measurement").

Two modes, both untimed (run pinned to one core from the repository root):

* ``--settings KEY,...``: run settings (keys as in ``docs/make_inversion_table.py``, e.g.
  ``j0_tv0.03-3e-05_a0.001_lr0.2_cos0.7``) at the given layers with the table's photos and seeds, cached in the
  table's cache (so ``make_inversion_table.py`` reuses them), and print each one's error / PSNR ratio against the
  best of every cell cached at that layer (every setting measured there, these included); ``--steps N`` other than
  the table's 200 caches in ``<cache>_steps<N>`` and compares with the cells there only;
* ``--seeds N``: the same settings with N noise seeds per photo (seed ``100 k + photo index``, k = 0 .. N-1; k = 0
  is the table's own seed), not cached: the seed-to-seed spread of the error and PSNR, which bounds how finely
  the 10 % criterion can tell settings apart on two photos.

    taskset -c 1 env OMP_NUM_THREADS=1 .venv/bin/python docs/inversion_screen.py --model demo_net \\
        --layers features.relu1,features.relu2 --settings j0_tv0.03-3e-05_a0.001_lr0.2_cos0.7
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

import convscope as cs
from convscope.applications.invert_report import psnr
from convscope.core.model import input_denormalizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_inversion_table import MODELS, PHOTOS, STEPS, Setting, run_cells  # noqa: E402

NUM = r"(\d[0-9.]*(?:e-\d+)?)"
KEY = re.compile(rf"j(\d+)_tv{NUM}(?:-{NUM})?_a{NUM}_lr{NUM}((?:\+{NUM})*)(?:_cos([0-9.]+))?$")


def parse(key: str) -> Setting:
    """A setting from its table key."""
    m = KEY.match(key)
    if m is None:
        raise SystemExit(f"not a setting key: {key!r} (e.g. j0_tv0.03-0.0001_a0.001_lr0.2_cos0.7)")
    j, tv, end, a, lr, more, _, dec = m.groups()
    s = Setting(int(j), float(tv), float(a), float(lr), float(end) if end else None, float(dec) if dec else 0.0,
                tuple(float(v) for v in more.split("+")[1:]))
    if s.key != key:
        raise SystemExit(f"{key!r} reads as {s.key!r}; give the key as the table writes it")
    return s


def cached(folder: Path, photos: list[str]) -> dict[str, tuple[float, float]]:
    """Every setting cached in ``folder`` for all ``photos``: key -> (mean error, mean PSNR)."""
    found: dict[str, dict[str, tuple[float, float]]] = {}
    for f in folder.glob("*__*.pt"):
        key, photo = f.stem.rsplit("__", 1)
        c = torch.load(f)
        found.setdefault(key, {})[photo] = (c["error"], c["psnr"])
    return {k: (sum(v[p][0] for p in photos) / len(photos), sum(v[p][1] for p in photos) / len(photos))
            for k, v in found.items() if all(p in v for p in photos)}


def seed_spread(model: torch.nn.Module, x: torch.Tensor, photos: list[str], layer: str, s: Setting,
                n: int, steps: int = STEPS) -> list[tuple[float, float]]:
    """(mean error, mean PSNR) over the photos for each of ``n`` seeds (one batch of ``n * len(photos)`` rows)."""
    truth = input_denormalizer(model)(x).clamp(0, 1)
    seeds = [100 * k + PHOTOS.index(p) for k in range(n) for p in photos]
    res = cs.invert(model, x.repeat(n, 1, 1, 1), [layer], steps=steps, lambda_alpha=s.alpha,
                    lambda_tv=s.lambda_tv, jitter=s.jitter, lr=s.lrs, lr_decay=s.decay, seed=seeds, progress=False)
    p = len(photos)
    out = []
    for k in range(n):
        rows = range(k * p, (k + 1) * p)
        out.append((sum(float(res.error[r]) for r in rows) / p,
                    sum(psnr(res.images[r].clamp(0, 1), truth[r % p]) for r in rows) / p))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="demo_net", choices=list(MODELS))
    ap.add_argument("--layers", required=True, help="comma-separated layers of the table")
    ap.add_argument("--settings", required=True, help="comma-separated setting keys")
    ap.add_argument("--seeds", type=int, default=0, help="N > 0: the seed spread instead (not cached)")
    ap.add_argument("--steps", type=int, default=STEPS, help=f"Adam steps (the table: {STEPS})")
    ap.add_argument("--cache", default="out/inversion_grid")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cs.tune_cpu_allocator()
    size, photos, _ = MODELS[args.model]
    model = cs.load_model(args.model, device="cpu")
    x = cs.load_images([cs.sample_images()[p] for p in photos], model)
    cache = Path(args.cache if args.steps == STEPS else f"{args.cache}_steps{args.steps}")
    settings = [parse(k) for k in args.settings.split(",") if k]
    for layer in args.layers.split(","):
        if args.seeds:
            for s in settings:
                vals = seed_spread(model, x, photos, layer, s, args.seeds, args.steps)
                es, ps = torch.tensor([v[0] for v in vals]), torch.tensor([v[1] for v in vals])
                print(f"{args.model} {layer} {s.key} seeds {args.seeds}: error "
                      + " ".join(f"{e:.3e}" for e in es) + f" (mean {es.mean():.3e}, max/min {es.max() / es.min():.2f})"
                      + "; PSNR " + " ".join(f"{p:.2f}" for p in ps) + f" (mean {ps.mean():.2f})", flush=True)
            continue
        cells = run_cells(model, args.model, x, photos, layer, settings, cache, args.steps)
        pool = cached(cache / args.model / layer, photos)
        best_e = min(c[0] for c in pool.values())
        best_p = max(c[1] for c in pool.values())
        for k, c in cells.items():
            e, p = c["error"] / best_e, c["psnr"] / best_p
            print(f"{args.model} {layer} {k} ({args.steps} steps): {c['error']:.3e} / {c['psnr']:.2f} dB; ratio "
                  f"{e:.2f} / {p:.3f} {'ok' if e <= 1.1 and p >= 0.9 else 'NO'} (best of {len(pool)} cells "
                  f"{best_e:.3e} / {best_p:.2f})", flush=True)


if __name__ == "__main__":
    main()
