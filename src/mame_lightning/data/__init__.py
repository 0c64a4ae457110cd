"""Data layer: records, DICOM reading and writing, geometry, tissue masks, prompts, sources.

Submodules are imported where used, so importing this package stays cheap.
"""

from mame_lightning.data.records import Box, ImageRecord

__all__ = ["Box", "ImageRecord"]
