import pickle

import numpy as np
import pydicom
import pytest

from helpers.dicom_factory import BACKGROUND, LESION, TISSUE, Phantom, half_disc_phantom, write_phantom
from mame_lightning.data.dicom import (DicomError, normalise_vendor, read_dicom, tag_metadata, to_display_uint8,
                                      to_float_image, to_uint8)
from mame_lightning.data.dicom_writer import make_mammogram_dataset, save_dataset

PHANTOM = half_disc_phantom()


def decode(path):
    img = to_float_image(read_dicom(path))
    assert img.dtype == np.float32 and img.shape == PHANTOM.pixels.shape
    assert img.min() >= 0.0 and img.max() <= 1.0
    return img


def region_means(img):
    return (float(img[PHANTOM.background].mean()), float(img[PHANTOM.tissue].mean()), float(img[PHANTOM.lesion].mean()))


def assert_display_sense(img, margin=0.3):
    background, tissue, lesion = region_means(img)
    assert tissue > background + margin, (background, tissue)
    assert lesion >= tissue


# --- pixel paths ------------------------------------------------------------------------------

PLAIN_TISSUE = (TISSUE - BACKGROUND) / (LESION - BACKGROUND)  # tissue level after min-max alone


@pytest.mark.parametrize(
    "syntax, kwargs",
    [
        ("explicit", {}),
        ("implicit", {}),
        ("explicit", {"photometric": "MONOCHROME1"}),
        ("rle", {"photometric": "MONOCHROME1"}),
        ("explicit", {"bits_stored": 12}),
        ("rle", {}),
        ("jpeg2000", {}),
        ("jpeg2000", {"bits_stored": 12, "photometric": "MONOCHROME1"}),
        ("explicit", {"rescale": (0.5, -1000.0)}),
    ],
)
def test_pixel_paths_give_dark_background_and_bright_tissue(tmp_path, syntax, kwargs):
    img = decode(write_phantom(tmp_path / "x.dcm", PHANTOM, syntax, **kwargs))
    assert_display_sense(img)
    # lossless paths with a linear display chain keep the relative tissue level
    assert region_means(img)[1] == pytest.approx(PLAIN_TISSUE, abs=0.01)


def test_twelve_bit_values_are_stored_in_twelve_bits(tmp_path):
    ds = read_dicom(write_phantom(tmp_path / "x.dcm", PHANTOM, bits_stored=12))
    assert ds.BitsStored == 12 and ds.HighBit == 11
    assert int(ds.pixel_array.max()) == 4095


def test_monochrome1_is_stored_inverted(tmp_path):
    ds = read_dicom(write_phantom(tmp_path / "x.dcm", PHANTOM, photometric="MONOCHROME1"))
    stored = ds.pixel_array
    assert stored[PHANTOM.background].mean() > stored[PHANTOM.tissue].mean()


def _window_expected(level, center, width, function):
    """The PS3.3 C.11.2.1.2 window functions, written out independently, then min-max."""
    values = {name: float(v) for name, v in level.items()}
    if function == "LINEAR":
        lo, hi = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
        out = {k: float(np.clip((v - (center - 0.5)) / (width - 1) + 0.5, 0, 1)) if lo < v <= hi else float(v > hi) for k, v in values.items()}
    elif function == "LINEAR_EXACT":
        out = {k: float(np.clip((v - center) / width + 0.5, 0, 1)) for k, v in values.items()}
    else:  # SIGMOID
        out = {k: 1.0 / (1.0 + np.exp(-4.0 * (v - center) / width)) for k, v in values.items()}
    low, high = min(out.values()), max(out.values())
    return {k: (v - low) / (high - low) for k, v in out.items()}


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
def test_voi_window_functions(tmp_path, function):
    center, width = 30000.0, 40000.0  # window [10000, 50000]: background clips to black
    path = write_phantom(tmp_path / "x.dcm", PHANTOM, window=(center, width), voi_function=function)
    img = decode(path)
    assert_display_sense(img)
    expected = _window_expected({"bg": BACKGROUND, "tissue": TISSUE, "lesion": LESION}, center, width, function)
    background, tissue, lesion = region_means(img)
    assert background == pytest.approx(expected["bg"], abs=0.01)
    assert tissue == pytest.approx(expected["tissue"], abs=0.01)
    assert lesion == pytest.approx(expected["lesion"], abs=0.01)
    if function != "SIGMOID":
        assert abs(tissue - PLAIN_TISSUE) > 0.03  # the window really changed the image


def test_first_window_is_used_when_several(tmp_path):
    # the second window would saturate everything (all pixels below it): image would be flat
    extra = {"WindowCenter": [30000.0, 200000.0], "WindowWidth": [40000.0, 10.0]}
    img = decode(write_phantom(tmp_path / "x.dcm", PHANTOM, window=(0, 1), extra=extra))
    assert_display_sense(img)


def test_voi_lut_sequence_is_applied(tmp_path):
    lut = np.where(np.arange(65536) < 20000, 0, 4095).astype(np.uint16)  # a hard threshold
    img = decode(write_phantom(tmp_path / "x.dcm", PHANTOM, voi_lut=lut))
    background, tissue, lesion = region_means(img)
    assert background == pytest.approx(0.0) and tissue == pytest.approx(1.0) and lesion == pytest.approx(1.0)


def test_rescale_comes_before_the_window(tmp_path):
    # modality values: background 1000, tissue 79000, lesion 99000; window [39000, 79000]
    path = write_phantom(tmp_path / "x.dcm", PHANTOM, rescale=(2.0, -1000.0), window=(59000.0, 40000.0), voi_function="LINEAR_EXACT")
    background, tissue, lesion = region_means(decode(path))
    assert background == pytest.approx(0.0) and tissue == pytest.approx(1.0, abs=0.01)


def test_invalid_window_is_skipped_not_fatal(tmp_path):
    path = write_phantom(tmp_path / "x.dcm", PHANTOM, window=(30000.0, 40000.0), voi_function="NOT_A_FUNCTION")
    img = decode(path)
    assert region_means(img)[1] == pytest.approx(PLAIN_TISSUE, abs=0.01)


def test_bare_dataset_without_preamble_is_read(tmp_path):
    ds = make_mammogram_dataset(PHANTOM.pixels)
    path = tmp_path / "bare.dcm"
    del ds.file_meta
    ds.save_as(path, implicit_vr=True, little_endian=True)
    assert open(path, "rb").read(132)[128:132] != b"DICM"
    assert_display_sense(decode(path))


def test_to_uint8():
    img = np.array([[0.0, 0.5, 1.0, 1.7]], dtype=np.float32)
    assert to_uint8(img).tolist() == [[0, 128, 255, 255]]
    assert to_uint8(np.array([[10, 20, 30]], dtype=np.uint16)).tolist() == [[0, 128, 255]]
    u8 = np.array([[3, 4]], dtype=np.uint8)
    assert to_uint8(u8) is u8


# --- tags ---------------------------------------------------------------------------------------


def tags(tmp_path, **kwargs):
    return tag_metadata(read_dicom(write_phantom(tmp_path / "t.dcm", PHANTOM, **kwargs)))


def test_primary_tags(tmp_path):
    meta = tags(tmp_path, view="MLO", laterality="R", implant=True, pixel_spacing=(0.1, 0.085), presentation_intent="FOR PROCESSING")
    assert meta["view"] == "MLO" and meta["laterality"] == "R"
    assert meta["implant"] is True and meta["pixel_spacing"] == (0.1, 0.085)
    assert meta["modality"] == "MG" and meta["presentation_intent"] == "FOR PROCESSING"
    assert meta["manufacturer"] == "HOLOGIC, Inc." and meta["vendor"] == "hologic"
    assert tags(tmp_path)["implant"] is False


@pytest.mark.parametrize("view", ["CC", "MLO", "XCCL", "ML", "LM"])
def test_view_from_view_code_sequence(tmp_path, view):
    meta = tags(tmp_path, view=view, use_view_code_sequence=True)
    assert meta["view"] == view


def test_view_code_sequence_by_snomed_ct_code_or_meaning_only(tmp_path):
    ds = make_mammogram_dataset(PHANTOM.pixels, view="MLO", use_view_code_sequence=True)
    ds.ViewCodeSequence[0].CodeValue = "399368009"
    ds.ViewCodeSequence[0].CodingSchemeDesignator = "SCT"
    assert tag_metadata(ds)["view"] == "MLO"
    ds.ViewCodeSequence[0].CodeValue = "local-42"
    ds.ViewCodeSequence[0].CodeMeaning = "Cranio-Caudal"
    assert tag_metadata(ds)["view"] == "CC"
    del ds.ViewCodeSequence
    assert tag_metadata(ds)["view"] is None


def test_laterality_from_series_laterality(tmp_path):
    meta = tags(tmp_path, laterality="R", use_series_laterality=True)
    assert meta["laterality"] == "R"
    ds = read_dicom(tmp_path / "t.dcm")
    assert "ImageLaterality" not in ds


@pytest.mark.parametrize(
    "manufacturer, vendor",
    [
        ("HOLOGIC, Inc.", "hologic"),
        ("Hologic", "hologic"),
        ("SIEMENS", "siemens"),
        ("Siemens Healthineers", "siemens"),
        ("GE MEDICAL SYSTEMS", "other"),
        ("", "other"),
        (None, "other"),
    ],
)
def test_normalise_vendor(manufacturer, vendor):
    assert normalise_vendor(manufacturer) == vendor


# --- bad inputs ---------------------------------------------------------------------------------


def test_text_file_is_rejected(tmp_path):
    path = tmp_path / "notes.dcm"
    path.write_text("this is a text file, not an image\n" * 20)
    with pytest.raises(DicomError) as info:
        read_dicom(path)
    assert str(path) in str(info.value) and "not a DICOM file" in str(info.value)


def test_missing_file_is_rejected(tmp_path):
    with pytest.raises(DicomError, match="file not found"):
        read_dicom(tmp_path / "absent.dcm")


@pytest.mark.parametrize("syntax", ["explicit", "rle", "jpeg2000"])
def test_truncated_file_is_rejected(tmp_path, syntax):
    path = write_phantom(tmp_path / "cut.dcm", PHANTOM, syntax)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DicomError) as info:
        read_dicom(path)
    assert str(path) in str(info.value) and "truncated" in info.value.reason


def test_file_without_pixel_data_is_rejected(tmp_path):
    path = write_phantom(tmp_path / "nopix.dcm", PHANTOM, extra={"PixelData": None})
    with pytest.raises(DicomError) as info:
        read_dicom(path)
    assert str(path) in str(info.value) and "no Pixel Data" in info.value.reason


def test_decode_error_names_file_and_syntax_but_no_patient(tmp_path):
    path = write_phantom(tmp_path / "bad.dcm", PHANTOM, "jpeg2000", patient_name="SECRET^NAME", patient_id="PID-SECRET")
    ds = read_dicom(path)
    frames = pydicom.encaps.generate_frames(ds.PixelData)
    first = next(frames)
    ds.PixelData = pydicom.encaps.encapsulate([b"\x00" * len(first)])
    with pytest.raises(DicomError) as info:
        to_float_image(ds)
    message = str(info.value)
    assert str(path) in message and "JPEG 2000" in message
    assert "SECRET" not in message


def test_dicom_error_pickles():
    err = pickle.loads(pickle.dumps(DicomError("a/b.dcm", "broken")))
    assert err.path == "a/b.dcm" and err.reason == "broken" and str(err) == "a/b.dcm: broken"


@pytest.mark.parametrize("syntax", ["explicit", "implicit", "rle", "jpeg2000"])
def test_save_keeps_instance_uid_and_pixels_and_leaves_input_untouched(tmp_path, syntax):
    ds = make_mammogram_dataset(PHANTOM.pixels, sop_uid="1.2.3.4", study_uid="1.2.3", series_uid="1.2.3.5")
    save_dataset(ds, tmp_path / "x.dcm", syntax)
    back = read_dicom(tmp_path / "x.dcm")
    assert back.SOPInstanceUID == "1.2.3.4" == back.file_meta.MediaStorageSOPInstanceUID
    assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.1.2"
    assert np.array_equal(back.pixel_array, PHANTOM.pixels)
    assert not ds.file_meta.TransferSyntaxUID.is_compressed
    assert [p.name for p in tmp_path.iterdir()] == ["x.dcm"]  # no temporary file left behind


# --- the display chain through a table of distinct values ---------------------------------------

NOISY = half_disc_phantom(height=120, width=96)
NOISY.pixels = np.clip(NOISY.pixels.astype(np.int64)
                       + np.random.default_rng(0).integers(-900, 900, NOISY.pixels.shape), 0, 65535).astype(np.uint16)
LUT = (np.sqrt(np.arange(65536)) * 16).astype(np.uint16)  # a non-linear VOI LUT


@pytest.mark.parametrize(
    "syntax, kwargs",
    [
        ("explicit", {}),
        ("implicit", {"photometric": "MONOCHROME1"}),
        ("rle", {"bits_stored": 12}),
        ("jpeg2000", {"photometric": "MONOCHROME1", "window": (30000.0, 40000.0)}),
        ("explicit", {"rescale": (0.5, -1000.0), "window": (9000.0, 30000.0), "voi_function": "SIGMOID"}),
        ("explicit", {"rescale": (2.0, -1000.0), "window": (59000.0, 40000.0), "voi_function": "LINEAR_EXACT"}),
        ("explicit", {"voi_lut": LUT}),
        ("explicit", {"window": (30000.0, 40000.0), "voi_function": "NOT_A_FUNCTION"}),
    ],
)
def test_display_uint8_gives_the_bytes_of_the_float_chain(tmp_path, syntax, kwargs):
    path = write_phantom(tmp_path / "x.dcm", NOISY, syntax, **kwargs)
    expected = to_uint8(to_float_image(read_dicom(path)))
    got = to_display_uint8(read_dicom(path))
    assert got.dtype == np.uint8 and got.shape == NOISY.pixels.shape
    assert np.array_equal(got, expected)
    assert len(np.unique(got)) > 10  # many grey levels: the table really was exercised


def test_display_uint8_of_signed_and_constant_images(tmp_path):
    ds = read_dicom(write_phantom(tmp_path / "x.dcm", NOISY))
    signed = (ds.pixel_array.astype(np.int32) - 30000).astype(np.int16)
    ds.PixelRepresentation, ds.PixelData = 1, signed.tobytes()
    assert ds.pixel_array.min() < 0
    assert np.array_equal(to_display_uint8(ds), to_uint8(to_float_image(ds)))
    flat = read_dicom(write_phantom(tmp_path / "flat.dcm", Phantom(np.full((8, 6), 7, np.uint16), *[None] * 3)))
    assert not to_display_uint8(flat).any()
