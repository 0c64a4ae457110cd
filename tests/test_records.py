import json

import pytest

from mame_lightning.data.records import Box, ImageRecord


def test_record_round_trips_through_json():
    record = ImageRecord("vindr/images/s/i.dicom", "i", view="MLO", laterality="R", density="C",
                         boxes=[Box(1, 2, 30, 40, "mass")], implant=False, split="train", extra={"study": "s"})
    back = ImageRecord.from_dict(json.loads(json.dumps(record.to_dict())))
    assert back == record and isinstance(back.boxes[0], Box)


def test_defaults_are_not_shared():
    a, b = ImageRecord("a", "a"), ImageRecord("b", "b")
    a.boxes.append(Box(0, 0, 1, 1))
    a.extra["k"] = 1
    assert b.boxes == [] and b.extra == {}


def test_box_list_form():
    box = Box.from_list([1, 2, 5, 7])
    assert box.category == "lesion" and (box.width, box.height, box.area) == (4, 5, 20)
    assert Box.from_list(box.to_list()) == box
    assert ImageRecord.from_dict({"source": "s", "image_id": "i", "boxes": [[0, 0, 2, 2, "calc"]]}).boxes[0].category == "calc"
    with pytest.raises(ValueError):
        Box.from_list([1, 2, 3])
