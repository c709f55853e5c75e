"""The model atlas (OpenAI-Microscope-like): every unit's pictures and scores in a SQLite store."""

from .store import Atlas, AtlasError, LayerRecord, UnitRecord, open_atlas

__all__ = ["Atlas", "AtlasError", "LayerRecord", "UnitRecord", "open_atlas"]
