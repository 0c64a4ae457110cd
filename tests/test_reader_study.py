"""Blinded reader study: a balanced, leak-free, reproducible set, and scoring with validation."""

import csv
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from mame_lightning.eval.reader_study import ReaderStudyError, make_reader_study, score_reader_study


def _png_chunk_types(path: Path) -> list[str]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    types, offset = [], 8
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset:offset + 4])
        types.append(data[offset + 4:offset + 8].decode("ascii"))
        offset += 12 + length
    return types


def _sources(root: Path, size: int = 48) -> tuple[list[Path], list[Path]]:
    """Real images: 8-bit grey with a text chunk; synthetic: RGB with generation parameters."""
    rng = np.random.default_rng(0)
    real, fake = [], []
    for index in range(12):
        info = PngImagePlugin.PngInfo()
        info.add_text("origin", "real VinDr image")
        path = root / "real" / f"real_{index:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(path, pnginfo=info, dpi=(300, 300))
        real.append(path)
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", "synthetic, guidance 7, seed 3")
        path = root / "fake" / f"generated_{index:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path, pnginfo=info)
        fake.append(path)
    return real, fake


def _key(key_path: Path) -> dict:
    return json.loads(key_path.read_text())


def _write_ratings(path: Path, rows: list[tuple[str, str]]) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["case", "score"])
        writer.writerows(rows)
    return path


def test_study_is_balanced_blinded_and_leak_free(tmp_path):
    real, fake = _sources(tmp_path / "src")
    out = tmp_path / "study"
    key_path = make_reader_study(real, fake, out, n=10, seed=1)
    images = sorted((out / "images").iterdir())
    assert [p.name for p in images] == [f"case_{i:03d}.png" for i in range(1, 11)]
    key = _key(key_path)
    truths = [case["truth"] for case in key["cases"].values()]
    assert truths.count("real") == 5 and truths.count("synthetic") == 5
    assert set(key["cases"]) == {p.stem for p in images}
    sources = {Path(case["source"]).name for case in key["cases"].values()}
    assert len(sources) == 10 and sources <= {p.name for p in real + fake}
    # the key lives outside the reader's images, in a hidden folder
    assert key_path.parent.name == ".key" and (out / "images") not in key_path.parents
    for path in images:
        assert _png_chunk_types(path) == ["IHDR", "IDAT", "IEND"]  # no text, dpi, colour profile
        with Image.open(path) as image:
            assert image.mode == "L" and image.size == (48, 48) and not image.info
        raw = path.read_bytes().lower()
        assert b"real" not in raw and b"synthetic" not in raw and b"generated" not in raw
    # the ratings sheet carries nothing but case names, in case order, with empty scores
    with open(out / "ratings.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["case"] for r in rows] == [p.stem for p in images] and all(r["score"] == "" for r in rows)
    assert set(rows[0]) == {"case", "score"}
    instructions = (out / "README.txt").read_text()
    # the paper's scale (section 3.8.1), in its order
    wording = ["0 = definitely real", "1 = probably real", "2 = not sure", "3 = probably synthetic",
               "4 = definitely synthetic"]
    positions = [instructions.find(line) for line in wording]
    assert -1 not in positions and positions == sorted(positions)
    assert key["scale"] == {"0": "definitely real", "1": "probably real", "2": "not sure",
                            "3": "probably synthetic", "4": "definitely synthetic"}


def test_same_seed_same_study_other_seed_other_order(tmp_path):
    real, fake = _sources(tmp_path / "src")
    first = _key(make_reader_study(real, fake, tmp_path / "a", n=8, seed=4))
    again = _key(make_reader_study(list(reversed(real)), fake, tmp_path / "b", n=8, seed=4))
    other = _key(make_reader_study(real, fake, tmp_path / "c", n=8, seed=5))
    assert first["cases"] == again["cases"]
    assert (tmp_path / "a/images/case_003.png").read_bytes() == (tmp_path / "b/images/case_003.png").read_bytes()
    assert first["cases"] != other["cases"]


def test_odd_count_fraction_custom_key_and_resizing(tmp_path):
    real, fake = _sources(tmp_path / "src")
    key_path = make_reader_study(real, fake, tmp_path / "study", n=11, real_fraction=0.5, seed=0,
                                 key_path=tmp_path / "private" / "key.json", size=32)
    key = _key(key_path)
    assert key["n_real"] == 6 and key["n_synthetic"] == 5 and len(key["cases"]) == 11
    assert key_path == tmp_path / "private" / "key.json" and not (tmp_path / "study" / ".key").exists()
    with Image.open(tmp_path / "study/images/case_001.png") as image:
        assert image.size == (32, 32)
    quarter = _key(make_reader_study(real, fake, tmp_path / "q", n=8, real_fraction=0.25))
    assert [c["truth"] for c in quarter["cases"].values()].count("real") == 2


def test_study_refuses_what_would_leak_or_cannot_be_drawn(tmp_path):
    real, fake = _sources(tmp_path / "src")
    big = tmp_path / "src" / "big.png"
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(big)
    with pytest.raises(ValueError, match="differ in size"):
        make_reader_study(real[:1] + [big], fake, tmp_path / "s1", n=2, seed=0, real_fraction=1.0)
    with pytest.raises(ValueError, match="needs 20 real images, only 12"):
        make_reader_study(real, fake, tmp_path / "s2", n=40)
    make_reader_study(real, fake, tmp_path / "s3", n=4)
    with pytest.raises(FileExistsError):
        make_reader_study(real, fake, tmp_path / "s3", n=4)
    make_reader_study(real, fake, tmp_path / "s3", n=3, overwrite=True)
    assert len(list((tmp_path / "s3" / "images").iterdir())) == 3


@pytest.fixture
def study(tmp_path):
    real, fake = _sources(tmp_path / "src")
    key_path = make_reader_study(real, fake, tmp_path / "study", n=10, seed=2)
    return key_path, _key(key_path)["cases"]


def _score(tmp_path, key_path, scores: dict) -> dict:
    ratings = _write_ratings(tmp_path / "filled.csv", [(case, str(s)) for case, s in scores.items()])
    return score_reader_study(ratings, key_path, tmp_path / "results")


def test_perfect_inverted_and_constant_readers(tmp_path, study):
    key_path, cases = study
    # the paper's scale: 0 = definitely real ... 4 = definitely synthetic; synthetic is the positive class
    perfect = {c: 0 if v["truth"] == "real" else 4 for c, v in cases.items()}
    summary = _score(tmp_path, key_path, perfect)
    assert summary["auroc"] == pytest.approx(1.0) and summary["positive_class"] == "synthetic"
    assert summary["real_called_real"] == 5 and summary["synthetic_called_synthetic"] == 5
    inverted = {c: 4 if v["truth"] == "real" else 0 for c, v in cases.items()}
    summary = _score(tmp_path, key_path, inverted)
    assert summary["auroc"] == pytest.approx(0.0) and summary["real_called_real"] == 0
    constant = {c: 2 for c in cases}
    summary = _score(tmp_path, key_path, constant)
    assert summary["auroc"] == pytest.approx(0.5) and summary["cannot_tell"] == 10


def test_paper_style_ratings_give_the_paper_style_auroc(tmp_path):
    """Two real and two synthetic cases rated on the paper's scale: real 0 (definitely real) and
    3 (probably synthetic), synthetic 1 and 4. Three of the four real/synthetic pairs have the
    synthetic case rated more synthetic, so the paper's AUROC is 0.75 (a real-positive reading
    of the same sheet would give 0.25)."""
    real, fake = _sources(tmp_path / "src")
    key_path = make_reader_study(real, fake, tmp_path / "study", n=4, seed=3)
    cases = _key(key_path)["cases"]
    ratings = iter([0, 3]), iter([1, 4])
    scores = {c: next(ratings[v["truth"] == "synthetic"]) for c, v in sorted(cases.items())}
    summary = _score(tmp_path, key_path, scores)
    assert summary["auroc"] == pytest.approx(0.75)
    assert summary["mean_score_real"] == pytest.approx(1.5) and summary["mean_score_synthetic"] == pytest.approx(2.5)
    assert summary["histogram"]["synthetic"] == {"0": 0, "1": 1, "2": 0, "3": 0, "4": 1}
    assert summary["scale"]["0"] == "definitely real" and summary["scale"]["4"] == "definitely synthetic"


def test_auroc_equals_the_share_of_correctly_ordered_pairs(tmp_path, study):
    key_path, cases = study
    rng = np.random.default_rng(0)
    scores = {c: int(rng.integers(0, 5)) for c in cases}
    real = [scores[c] for c, v in cases.items() if v["truth"] == "real"]
    fake = [scores[c] for c, v in cases.items() if v["truth"] == "synthetic"]
    # a pair is ordered correctly when the synthetic case is rated more synthetic than the real one
    pairs = [1.0 if f > r else 0.5 if r == f else 0.0 for r in real for f in fake]
    summary = _score(tmp_path, key_path, scores)
    assert summary["auroc"] == pytest.approx(np.mean(pairs))
    assert summary["n"] == 10 and summary["n_real"] == 5 and summary["mean_score_real"] == pytest.approx(np.mean(real))
    assert sum(summary["histogram"]["real"].values()) == 5
    written = json.loads((tmp_path / "results" / "reader_study.json").read_text())
    assert written["auroc"] == pytest.approx(summary["auroc"])
    assert written["roc"]["fpr"][0] == 0.0 and written["roc"]["tpr"][-1] == 1.0
    with Image.open(tmp_path / "results" / "roc.png") as image:
        assert image.format == "PNG" and np.asarray(image.convert("L")).std() > 0


def test_bad_ratings_name_the_row(tmp_path, study):
    key_path, cases = study
    names = list(cases)
    rows = [(c, "3") for c in names]
    rows[2] = (names[2], "5")
    rows[4] = (names[4], "")
    rows[5] = (names[5], "2.5")
    rows.append(("case_099", "1"))
    rows.append((names[0], "1"))
    del rows[7]
    ratings = _write_ratings(tmp_path / "bad.csv", rows)
    with pytest.raises(ReaderStudyError) as error:
        score_reader_study(ratings, key_path, tmp_path / "results")
    message = str(error.value)
    assert f"line 4: score '5' for case {names[2]}" in message
    assert f"line 6: case {names[4]} has no score" in message
    assert f"score '2.5' for case {names[5]}" in message
    assert "'case_099' is not in the key" in message
    assert f"case {names[0]} is rated twice" in message
    assert f"missing from the sheet: {names[7]}" in message
    assert not (tmp_path / "results" / "reader_study.json").exists()


def test_ratings_without_the_columns_are_refused(tmp_path, study):
    key_path, _ = study
    path = tmp_path / "wrong.csv"
    path.write_text("image,rating\ncase_001,3\n")
    with pytest.raises(ReaderStudyError, match="columns 'case' and 'score'"):
        score_reader_study(path, key_path, tmp_path / "results")
