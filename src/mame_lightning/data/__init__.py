"""Data layer, by job: `prepare/` (raw DICOM sources to a prepared set), `synthetic/` (the embedded
phantom set), `loading/` (a prepared set feeding training). What both training and inference use sits
here at the top: records, DICOM reading and writing, geometry, tissue masks, prompts.

Submodules are imported where used, so importing this package stays cheap.
"""

from mame_lightning.data.records import Box, ImageRecord

__all__ = ["Box", "ImageRecord"]
