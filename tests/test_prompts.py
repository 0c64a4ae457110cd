import math

import pytest

from mame_lightning.data.prompts import DENSITY_WORDS, density_letter, density_word, render_prompt, template_fields

OMI = "a mammogram in {view} view with {area} area"
VINDR = "a mammogram in {view} view with {density} density"
FUSION = "a {vendor} mammogram in {view} view with {density} density and {area} area"
INPAINT = "a mammogram with a lesion"


@pytest.mark.parametrize(
    "text, letter",
    [("A", "A"), ("a", "A"), ("DENSITY A", "A"), ("density-a", "A"), ("Density_B", "B"), (" DENSITY C ", "C"),
     ("d", "D"), ("BI-RADS D", "D"), (None, None), ("", None), (math.nan, None)],
)
def test_density_letter_spellings(text, letter):
    assert density_letter(text) == letter


@pytest.mark.parametrize("text", ["E", "DENSITY", "dense", "AB"])
def test_density_letter_rejects_other_text(text):
    with pytest.raises(ValueError, match="density"):
        density_letter(text)


def test_density_words():
    assert [density_word(f"DENSITY {k}") for k in "ABCD"] == ["very low", "low", "high", "very high"]
    assert density_word("c") == DENSITY_WORDS["C"]
    assert density_word(None) is None
    assert density_word("very high") == "very high"  # already a word
    custom = {"A": "fatty", "B": "scattered", "C": "heterogeneous", "D": "extreme"}
    assert density_word("density-b", custom) == "scattered"


def test_dataset_templates():
    assert render_prompt(OMI, {"view": "MLO", "area": "small"}) == "a mammogram in MLO view with small area"
    assert render_prompt(VINDR, {"view": "CC", "density": "very high"}) == "a mammogram in CC view with very high density"
    assert render_prompt(VINDR, {"view": "CC", "density": None}) == "a mammogram in CC view"
    assert render_prompt(INPAINT, {}) == INPAINT


@pytest.mark.parametrize(
    "attrs, prompt",
    [
        ({"vendor": "hologic", "view": "CC", "density": "high", "area": "big"}, "a hologic mammogram in CC view with high density and big area"),
        ({"vendor": "hologic", "view": "CC", "density": None, "area": "big"}, "a hologic mammogram in CC view with big area"),
        ({"vendor": "hologic", "view": "CC", "density": "low", "area": ""}, "a hologic mammogram in CC view with low density"),
        ({"vendor": "hologic", "view": "CC", "density": None, "area": None}, "a hologic mammogram in CC view"),
        ({"vendor": None, "view": "MLO", "density": "low", "area": "medium"}, "a mammogram in MLO view with low density and medium area"),
        ({"vendor": "siemens", "view": None, "density": None, "area": "small"}, "a siemens mammogram with small area"),
        ({}, "a mammogram"),
    ],
)
def test_fusion_template(attrs, prompt):
    assert render_prompt(FUSION, attrs) == prompt


def test_head_phrase_and_commas():
    assert render_prompt("a {density} density mammogram in {view} view", {"view": "CC"}) == "a mammogram in CC view"
    assert render_prompt("a mammogram, {view} view, {area} area", {"view": "CC"}) == "a mammogram, CC view"
    rendered = render_prompt("  a   {vendor}  mammogram  ", {"vendor": None})
    assert rendered == "a mammogram"


def test_unknown_placeholder_is_an_error_but_extra_attrs_are_fine():
    with pytest.raises(ValueError, match="vieww"):
        render_prompt("a mammogram in {vieww} view", {"view": "CC"})
    assert render_prompt("a {side} mammogram", {"side": "left"}) == "a left mammogram"


def test_template_fields():
    assert template_fields(FUSION) == ["vendor", "view", "density", "area"]
    assert template_fields(INPAINT) == []
    assert template_fields("{view} {view}") == ["view"]
