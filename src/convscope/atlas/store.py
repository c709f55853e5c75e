"""The atlas store: one SQLite database (metadata, scores) with PNG files beside it.

Layout of an atlas directory::

    DIR/atlas.sqlite            meta, layers, units (one row per unit, filled in stage by stage)
    DIR/files/<layer>/<unit>_<kind>.png

Crash safety (``kill -9`` included): every picture is written atomically (temp file + rename) *before* the row
that names it is committed, and a row is committed in one transaction, so a unit is either recorded with all its
files present or not recorded at all. SQLite runs in WAL mode; only one process (the builder's main process)
writes. Readers (the web explorer) open the database read-only and can run while a build goes on.

Paths stored in the database are relative to ``DIR/files``; :meth:`Atlas.file` resolves one and refuses anything
that would leave that folder (``..``, absolute paths, symlinks pointing out).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from ..core.io import atomic_path
from ..errors import ConvscopeError

DB_NAME = "atlas.sqlite"
FILES = "files"
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS layers (
    name TEXT PRIMARY KEY,
    position INTEGER NOT NULL,
    units INTEGER NOT NULL,
    shape TEXT NOT NULL DEFAULT '[]'
);
CREATE TABLE IF NOT EXISTS units (
    layer TEXT NOT NULL REFERENCES layers(name),
    unit INTEGER NOT NULL,
    am_image TEXT,            -- activation-maximization picture (relative path)
    am_activation REAL,       -- the unit's activation reached by that picture
    top_image TEXT,           -- Zeiler Fig. 2 grid: k patches + k deconvnet projections (relative path)
    top_json TEXT,            -- [{"image": id, "source": name, "score": a, "y": i, "x": j, "box": [y0,x0,y1,x1]}]
    max_activation REAL,      -- strongest activation over the dataset
    concept TEXT,             -- dissection: best concept, its category and IoU
    category TEXT,
    iou REAL,
    detector INTEGER,         -- 1 when iou > iou_threshold
    PRIMARY KEY (layer, unit)
);
CREATE INDEX IF NOT EXISTS units_concept ON units(concept);
CREATE TABLE IF NOT EXISTS blobs (key TEXT PRIMARY KEY, value BLOB NOT NULL);  -- a builder's resumable state
"""

# Columns a builder stage may fill. Keys of ``put_units`` rows must be among these.
UNIT_FIELDS = ("am_image", "am_activation", "top_image", "top_json", "max_activation", "concept", "category", "iou",
               "detector")


class AtlasError(ConvscopeError):
    """A missing, corrupt or mismatched atlas, or a path that would leave the atlas folder."""


@dataclass(frozen=True)
class LayerRecord:
    """One layer of the atlas: its name, order in the model, unit count and output shape (without batch)."""

    name: str
    position: int
    units: int
    shape: tuple[int, ...] = ()


@dataclass(frozen=True)
class UnitRecord:
    """Everything the atlas knows about one unit; ``None`` where a stage has not run (or does not apply)."""

    layer: str
    unit: int
    am_image: str | None = None
    am_activation: float | None = None
    top_image: str | None = None
    top: list[dict[str, Any]] = field(default_factory=list)
    max_activation: float | None = None
    concept: str | None = None
    category: str | None = None
    iou: float | None = None
    detector: bool | None = None


def _record(row: sqlite3.Row) -> UnitRecord:
    d = dict(row)
    top = json.loads(d.pop("top_json") or "[]")
    det = d.pop("detector")
    return UnitRecord(top=top, detector=None if det is None else bool(det), **d)


class Atlas:
    """Open (``mode="r"``) or create/append to (``mode="w"``) the atlas in ``root``.

    Read-only handles are safe to share across threads (one connection per thread); a writable one belongs to the
    process that builds.
    """

    def __init__(self, root: str | os.PathLike[str], mode: str = "r") -> None:
        if mode not in ("r", "w"):
            raise ValueError(f"mode must be 'r' or 'w', got {mode!r}")
        self.root = Path(root)
        self.mode = mode
        self.db_path = self.root / DB_NAME
        self.files_root = self.root / FILES
        if mode == "r" and not self.db_path.is_file():
            raise AtlasError(f"no atlas at {self.root}: {DB_NAME} is missing. Build one with "
                             f"`convscope atlas build MODEL --layers ... --out {self.root}`.")
        if mode == "w":
            self.files_root.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        if mode == "w":
            con = self._con()
            con.executescript(_SCHEMA)
            with con:
                con.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        version = self.meta().get("schema_version")
        if version != str(SCHEMA_VERSION):
            raise AtlasError(f"{self.db_path} has schema version {version!r}; this convscope reads version "
                             f"{SCHEMA_VERSION}. Rebuild the atlas into a new folder.")

    # ------------------------------------------------------------------ connection

    def _con(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None:
            try:
                if self.mode == "r":
                    con = sqlite3.connect(f"{self.db_path.resolve().as_uri()}?mode=ro", uri=True,
                                          check_same_thread=False)
                else:
                    con = sqlite3.connect(self.db_path, check_same_thread=False)
                    con.execute("PRAGMA journal_mode=WAL")
                    con.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL survives a process kill
                con.row_factory = sqlite3.Row
                con.execute("SELECT count(*) FROM sqlite_master").fetchone()
            except sqlite3.DatabaseError as e:
                raise AtlasError(f"{self.db_path} is not a readable atlas database ({e}). "
                                 f"Move it away and rebuild the atlas.") from e
            self._local.con = con
        return con

    def close(self) -> None:
        con = getattr(self._local, "con", None)
        if con is not None:
            con.close()
            self._local.con = None

    def __enter__(self) -> Atlas:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _writable(self) -> sqlite3.Connection:
        if self.mode != "w":
            raise AtlasError(f"the atlas at {self.root} was opened read-only")
        return self._con()

    # ------------------------------------------------------------------ meta and layers

    def meta(self) -> dict[str, str]:
        """All ``meta`` key/value pairs (model name, model hash, build settings as JSON, ...)."""
        try:
            rows = self._con().execute("SELECT key, value FROM meta").fetchall()
        except sqlite3.DatabaseError as e:
            raise AtlasError(f"{self.db_path} is not an atlas database ({e})") from e
        return {r["key"]: r["value"] for r in rows}

    def set_meta(self, values: Mapping[str, Any]) -> None:
        """Set meta keys; non-string values are stored as JSON."""
        con = self._writable()
        with con:
            con.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                            [(k, v if isinstance(v, str) else json.dumps(v)) for k, v in values.items()])

    def add_layers(self, layers: Iterable[LayerRecord]) -> None:
        """Record layers (idempotent: re-adding the same layer is a no-op; a different unit count is an error)."""
        con = self._writable()
        known = {layer.name: layer for layer in self.layers()}
        with con:
            for layer in layers:
                old = known.get(layer.name)
                if old is not None:
                    if old.units != layer.units:
                        raise AtlasError(f"layer {layer.name!r} has {old.units} units in the atlas at {self.root} "
                                         f"but {layer.units} in this model; build into a new folder.")
                    continue
                con.execute("INSERT INTO layers VALUES (?, ?, ?, ?)",
                            (layer.name, layer.position, layer.units, json.dumps(list(layer.shape))))
                con.executemany("INSERT OR IGNORE INTO units (layer, unit) VALUES (?, ?)",
                                [(layer.name, u) for u in range(layer.units)])

    def layers(self) -> list[LayerRecord]:
        """Layers in model order."""
        rows = self._con().execute("SELECT * FROM layers ORDER BY position, name").fetchall()
        return [LayerRecord(r["name"], r["position"], r["units"], tuple(json.loads(r["shape"]))) for r in rows]

    def layer(self, name: str) -> LayerRecord:
        for layer in self.layers():
            if layer.name == name:
                return layer
        valid = ", ".join(layer.name for layer in self.layers()) or "(none yet)"
        raise AtlasError(f"layer {name!r} is not in the atlas at {self.root}; its layers: {valid}")

    # ------------------------------------------------------------------ units

    def put_units(self, layer: str, rows: Mapping[int, Mapping[str, Any]]) -> None:
        """Set fields of several units of ``layer`` in one transaction. ``rows``: unit -> {field: value}; a
        ``top`` list is stored as ``top_json``. Write the files a row names *before* calling this."""
        con = self._writable()
        with con:
            for unit, values in rows.items():
                values = dict(values)
                if "top" in values:
                    values["top_json"] = json.dumps(values.pop("top"))
                bad = sorted(set(values) - set(UNIT_FIELDS))
                if bad:
                    raise ValueError(f"unknown unit fields {bad}; valid: {', '.join(UNIT_FIELDS)}")
                if not values:
                    continue
                cols = ", ".join(f"{k} = ?" for k in values)
                cur = con.execute(f"UPDATE units SET {cols} WHERE layer = ? AND unit = ?",
                                  (*values.values(), layer, int(unit)))
                if cur.rowcount != 1:
                    raise AtlasError(f"unit {unit} of layer {layer!r} is not in the atlas; add the layer first")

    def unit(self, layer: str, unit: int) -> UnitRecord:
        if not 0 <= int(unit) < 2**63:  # SQLite integers are 64-bit: a larger one would raise OverflowError
            n = self.layer(layer).units
            raise AtlasError(f"unit {unit} is out of range for layer {layer!r} (0..{n - 1})")
        row = self._con().execute("SELECT * FROM units WHERE layer = ? AND unit = ?", (layer, int(unit))).fetchone()
        if row is None:
            n = self.layer(layer).units  # raises with the valid layer names
            raise AtlasError(f"unit {unit} is out of range for layer {layer!r} (0..{n - 1})")
        return _record(row)

    def units(self, layer: str) -> list[UnitRecord]:
        self.layer(layer)
        rows = self._con().execute("SELECT * FROM units WHERE layer = ? ORDER BY unit", (layer,)).fetchall()
        return [_record(r) for r in rows]

    def done(self, layer: str, column: str) -> set[int]:
        """Units of ``layer`` whose ``column`` is filled (what a resumed build skips)."""
        if column not in UNIT_FIELDS:
            raise ValueError(f"unknown unit field {column!r}; valid: {', '.join(UNIT_FIELDS)}")
        rows = self._con().execute(f"SELECT unit FROM units WHERE layer = ? AND {column} IS NOT NULL",
                                   (layer,)).fetchall()
        return {r["unit"] for r in rows}

    def search(self, text: str, limit: int = 200) -> list[UnitRecord]:
        """Units whose concept label or category contains ``text`` (case-insensitive), best IoU first."""
        pattern = f"%{text.strip().lower()}%"
        rows = self._con().execute(
            "SELECT units.* FROM units JOIN layers ON units.layer = layers.name "
            "WHERE lower(concept) LIKE ? OR lower(category) LIKE ? ORDER BY iou DESC, position, unit LIMIT ?",
            (pattern, pattern, int(limit))).fetchall()
        return [_record(r) for r in rows]

    def counts(self, layer: str) -> dict[str, int]:
        """How many units of ``layer`` have each field filled (what ``convscope atlas info`` shows)."""
        self.layer(layer)
        cols = ", ".join(f"count({c})" for c in UNIT_FIELDS)
        row = self._con().execute(f"SELECT {cols} FROM units WHERE layer = ?", (layer,)).fetchone()
        return dict(zip(UNIT_FIELDS, (int(v) for v in row)))

    # ------------------------------------------------------------------ builder state

    def put_blob(self, key: str, value: bytes) -> None:
        """Store opaque bytes under ``key`` in one transaction (a builder's partial results, e.g. a top-k shard)."""
        con = self._writable()
        with con:
            con.execute("INSERT OR REPLACE INTO blobs VALUES (?, ?)", (key, sqlite3.Binary(value)))

    def blob(self, key: str) -> bytes | None:
        """The bytes stored under ``key``, or None."""
        row = self._con().execute("SELECT value FROM blobs WHERE key = ?", (key,)).fetchone()
        return None if row is None else bytes(row["value"])

    def blob_keys(self, prefix: str = "") -> list[str]:
        """The blob keys that start with ``prefix``, sorted."""
        rows = self._con().execute("SELECT key FROM blobs WHERE substr(key, 1, ?) = ? ORDER BY key",
                                   (len(prefix), prefix)).fetchall()
        return [r["key"] for r in rows]

    # ------------------------------------------------------------------ files

    @staticmethod
    def relpath(layer: str, unit: int, kind: str) -> str:
        """Where a unit's picture of ``kind`` ('am', 'top', ...) lives, relative to ``DIR/files``."""
        safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in layer)
        return f"{safe}/{int(unit)}_{kind}.png"

    def write_image(self, relpath: str, image: Image.Image) -> str:
        """Write a PNG atomically under ``DIR/files`` and return ``relpath``."""
        target = self.file(relpath, must_exist=False)
        with atomic_path(target) as tmp:
            image.save(tmp, format="PNG")
        return relpath

    def write_bytes(self, relpath: str, data: bytes) -> str:
        """Write an encoded file (e.g. PNG bytes a worker made) atomically under ``DIR/files``; return ``relpath``."""
        target = self.file(relpath, must_exist=False)
        with atomic_path(target) as tmp:
            tmp.write_bytes(data)
        return relpath

    def file(self, relpath: str, must_exist: bool = True) -> Path:
        """Resolve a stored relative path inside ``DIR/files``; refuse anything that leaves it."""
        if not relpath or "\x00" in relpath or Path(relpath).is_absolute() or "\\" in relpath:
            raise AtlasError(f"invalid atlas file path {relpath!r}")
        shown = relpath if len(relpath) <= 80 else relpath[:77] + "..."
        try:
            root = self.files_root.resolve()
            path = (root / relpath).resolve()
            if path != root and root not in path.parents:
                raise AtlasError(f"atlas file path {shown!r} leaves the atlas folder")
            if must_exist and not path.is_file():
                raise AtlasError(f"atlas file {shown!r} does not exist in the atlas")
        except OSError as exc:  # a name too long for the file system, a loop of links, ...
            raise AtlasError(f"atlas file path {shown!r} cannot be opened ({exc.strerror or exc}); check the path") \
                from None
        return path


def open_atlas(root: str | os.PathLike[str]) -> Atlas:
    """Open an existing atlas read-only."""
    return Atlas(root, mode="r")


def layer_records(names: Sequence[str], shapes: Mapping[str, Sequence[int]]) -> list[LayerRecord]:
    """Layer records in the given order from output shapes (without batch; units = channels = shape[0])."""
    return [LayerRecord(n, i, int(shapes[n][0]), tuple(int(s) for s in shapes[n])) for i, n in enumerate(names)]
