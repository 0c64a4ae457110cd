"""PreparedImageDataset and PreparedDataModule: items, tokenisation, splits, loaders, errors."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch
from helpers.prepared_sets import CountingTokenizer, tiny_tokenizer, write_png, write_prepared
from PIL import Image

from mame_lightning.data.loading.datamodule import PreparedDataModule, split_ids
from mame_lightning.data.loading.prepared_set import PreparedImageDataset

SIZE = 32


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return write_prepared(tmp_path_factory.mktemp("prepared"), n=24, size=SIZE)


def png(path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.float32)


def module(prepared, tokenizer, **kwargs) -> PreparedDataModule:
    options = {"batch_size": 4, "val_fraction": 0.1, "val_max": 8} | kwargs
    datamodule = PreparedDataModule(str(prepared), tokenizer=tokenizer, **options)
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


def epoch_ids(loader) -> list[str]:
    return [i for batch in loader for i in batch["id"]]


def test_text2image_item_is_gray_repeated_in_unit_range(prepared, tokenizer):
    dataset = PreparedImageDataset(prepared, "text2image", tokenizer)
    item = dataset[3]
    pixels = item["pixel_values"]
    assert pixels.dtype == torch.float32 and pixels.shape == (3, SIZE, SIZE)
    assert pixels.min() >= -1 and pixels.max() <= 1
    assert torch.equal(pixels[0], pixels[1]) and torch.equal(pixels[0], pixels[2])
    expected = png(prepared / "text2image" / "images" / f"{item['id']}.png") / 127.5 - 1
    assert np.allclose(pixels[0].numpy(), expected, atol=1e-6)
    assert item["input_ids"].dtype == torch.long
    assert item["input_ids"].shape == (tokenizer.model_max_length,)
    assert item["index"] == 3 and item["id"] == dataset.records[3]["id"]
    assert item["prompt"] == dataset.records[3]["prompt"] and "mask" not in item


def test_inpaint_masked_pixels_follow_diffusers_convention(prepared, tokenizer):
    dataset = PreparedImageDataset(prepared, "inpaint", tokenizer)
    item = dataset[5]
    mask, pixels, masked = item["mask"], item["pixel_values"], item["masked_pixel_values"]
    assert mask.dtype == torch.float32 and mask.shape == (1, SIZE, SIZE)
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    on_disk = png(prepared / "inpaint" / "masks" / f"{item['id']}.png") > 127
    assert np.array_equal(mask[0].numpy().astype(bool), on_disk)
    inside = mask.expand_as(pixels).bool()
    assert pixels[inside].abs().sum() > 0  # so zeros inside are the mask's doing
    assert torch.all(masked[inside] == 0)
    assert torch.equal(masked[~inside], pixels[~inside])


def test_task_folder_and_resolution_are_accepted(prepared, tokenizer):
    dataset = PreparedImageDataset(prepared / "inpaint", "inpaint", tokenizer, resolution=16)
    item = dataset[0]
    assert item["pixel_values"].shape == (3, 16, 16) and item["mask"].shape == (1, 16, 16)
    assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}


def test_ids_select_and_order_items(prepared, tokenizer):
    dataset = PreparedImageDataset(prepared, "text2image", tokenizer, ids=["img0007", "img0002"])
    assert [dataset[i]["id"] for i in range(len(dataset))] == ["img0007", "img0002"]
    with pytest.raises(KeyError, match="nope"):
        PreparedImageDataset(prepared, "text2image", tokenizer, ids=["nope"])


def test_prompts_tokenised_once_for_the_whole_module(prepared, tokenizer):
    counting = CountingTokenizer(tokenizer)
    datamodule = module(prepared, counting, drop_last=False)
    items = list(datamodule.train_dataset) + list(datamodule.val_dataset)
    assert counting.calls == 1 and len(items) == 24
    for item in items[:3]:
        direct = tokenizer(item["prompt"], padding="max_length", truncation=True,
                           max_length=tokenizer.model_max_length)
        assert item["input_ids"].tolist() == direct["input_ids"]


def test_seeded_shuffle_is_reproducible_and_seed_dependent(prepared, tokenizer):
    first = epoch_ids(module(prepared, tokenizer, seed=0).train_dataloader())
    again = module(prepared, tokenizer, seed=0)
    assert epoch_ids(again.train_dataloader()) == first
    assert epoch_ids(again.train_dataloader()) == first  # a new loader restarts the same order
    other = module(prepared, tokenizer, seed=0)
    other.seed = 5  # same split, another shuffling seed
    assert epoch_ids(other.train_dataloader()) != first
    other.drop_last = again.drop_last = False
    assert sorted(epoch_ids(other.train_dataloader())) == sorted(epoch_ids(again.train_dataloader()))
    loader = again.train_dataloader()
    assert epoch_ids(loader) != epoch_ids(loader)  # each epoch reshuffles


def test_validation_split_is_deterministic_and_disjoint(prepared, tokenizer):
    a, b = module(prepared, tokenizer, seed=1), module(prepared, tokenizer, seed=1)
    val_ids = a.val_dataset.ids
    assert val_ids == b.val_dataset.ids and len(val_ids) == round(0.1 * 24)
    assert not set(val_ids) & set(a.train_dataset.ids)
    assert set(val_ids) | set(a.train_dataset.ids) == {f"img{i:04d}" for i in range(24)}
    assert module(prepared, tokenizer, seed=2).val_dataset.ids != val_ids
    assert epoch_ids(a.val_dataloader()) == val_ids  # not shuffled, nothing dropped


def test_split_sizes():
    ids = [f"x{i}" for i in range(100)]
    assert len(split_ids(ids, 0.05, 64, 0)[1]) == 5
    assert len(split_ids(ids, 0.5, 8, 0)[1]) == 8
    assert len(split_ids(ids, 0.001, 64, 0)[1]) == 1
    assert split_ids(["only"], 0.5, 64, 0) == (["only"], [])
    assert split_ids(ids, 0.0, 64, 0) == (ids, [])
    assert split_ids(list(reversed(ids)), 0.1, 64, 3)[1] == sorted(
        split_ids(ids, 0.1, 64, 3)[1], key=lambda i: -int(i[1:])
    )


def test_drop_last_honoured(prepared, tokenizer):
    dropping = module(prepared, tokenizer, batch_size=5, val_fraction=1 / 24)  # 23 train
    sizes = [len(batch["id"]) for batch in dropping.train_dataloader()]
    assert sizes == [5, 5, 5, 5]
    keeping = module(prepared, tokenizer, batch_size=5, val_fraction=1 / 24, drop_last=False)
    assert [len(batch["id"]) for batch in keeping.train_dataloader()] == [5, 5, 5, 5, 3]


def test_batch_larger_than_training_split_is_a_clear_error(prepared, tokenizer):
    with pytest.raises(ValueError, match="batch_size"):
        module(prepared, tokenizer, batch_size=64)


def test_worker_loader_yields_the_same_batches(prepared, tokenizer):
    plain = module(prepared, tokenizer, task="inpaint")
    workers = module(prepared, tokenizer, task="inpaint", num_workers=2, persistent_workers=True)
    loader = workers.train_dataloader()
    assert loader.persistent_workers and loader.num_workers == 2
    for a, b in zip(plain.train_dataloader(), loader):
        assert a["id"] == b["id"] and torch.equal(a["masked_pixel_values"], b["masked_pixel_values"])


def test_missing_set_names_folder_and_prepare_command(tmp_path, tokenizer):
    missing = tmp_path / "nowhere"
    datamodule = PreparedDataModule(str(missing), tokenizer=tokenizer, dataset_name="vindr")
    for hook in (datamodule.prepare_data, datamodule.setup):
        with pytest.raises(FileNotFoundError) as error:
            hook()
        assert "python -m mame_lightning.prepare dataset=vindr" in str(error.value)
        assert f"dataset.prepared_dir={missing}" in str(error.value)


def test_prepare_fn_runs_only_when_the_set_is_missing(tmp_path, tokenizer):
    calls = []

    def prepare():
        calls.append(1)
        write_prepared(tmp_path / "made", n=10, size=16)

    datamodule = PreparedDataModule(str(tmp_path / "made"), tokenizer=tokenizer, batch_size=2,
                                    prepare_fn=prepare)
    datamodule.prepare_data()
    datamodule.prepare_data()
    datamodule.setup()
    assert calls == [1] and datamodule.counts() == {"train": 9, "val": 1}
    broken = PreparedDataModule(str(tmp_path / "never"), prepare_fn=lambda: None)
    with pytest.raises(FileNotFoundError, match="mame_lightning.prepare"):
        broken.prepare_data()


def test_hydra_partial_prepare_fn(tmp_path, tokenizer):
    from hydra.utils import instantiate

    config = {
        "_target_": "mame_lightning.data.loading.datamodule.PreparedDataModule",
        "prepared_dir": str(tmp_path / "synthetic"),
        "batch_size": 2,
        "latent_cache": {"enabled": False, "dir": str(tmp_path / "cache")},
        "prepare_fn": {"_target_": "helpers.prepared_sets.write_prepared", "_partial_": True,
                       "root": tmp_path / "synthetic", "n": 6, "size": 16},
    }
    datamodule = instantiate(config)
    assert isinstance(datamodule.prepare_fn, functools.partial)
    datamodule.prepare_data()
    datamodule.set_tokenizer(tokenizer)
    datamodule.setup()
    assert sum(datamodule.counts().values()) == 6


def test_tokenizer_is_required_before_setup(prepared, tokenizer):
    datamodule = PreparedDataModule(str(prepared))
    with pytest.raises(RuntimeError, match="set_tokenizer"):
        datamodule.setup()
    datamodule.set_tokenizer(tokenizer)
    datamodule.setup()
    assert datamodule.counts()["train"] > 0


def test_attributes_and_counts_describe_the_training_split(prepared, tokenizer):
    datamodule = module(prepared, tokenizer)
    train_ids = set(datamodule.train_dataset.ids)
    lines = (prepared / "text2image" / "metadata.jsonl").read_text().splitlines()
    rows = [r for r in map(json.loads, lines) if r["id"] in train_ids]
    attributes = datamodule.attributes()
    for name, column in (("views", "view"), ("areas", "area"), ("densities", "density"),
                         ("vendors", "vendor")):
        assert set(attributes[name]) == {r[column] for r in rows} - {None}
    assert "very low" in attributes["densities"] and None not in attributes["densities"]
    assert datamodule.counts() == {"train": len(rows), "val": 24 - len(rows)}


def test_empty_and_malformed_metadata_are_reported(tmp_path, tokenizer):
    folder = tmp_path / "text2image"
    folder.mkdir()
    (folder / "metadata.jsonl").write_text("")
    with pytest.raises(ValueError, match="no images"):
        PreparedImageDataset(tmp_path, "text2image", tokenizer)
    (folder / "metadata.jsonl").write_text('{"id": "a", "file_name": "images/a.png"\n')
    with pytest.raises(ValueError, match=r"metadata.jsonl:1"):
        PreparedImageDataset(tmp_path, "text2image", tokenizer)
    (folder / "metadata.jsonl").write_text('{"id": "a", "file_name": "images/a.png"}\n')
    with pytest.raises(ValueError, match="prompt"):
        PreparedImageDataset(tmp_path, "text2image", tokenizer)


def test_missing_image_names_the_file(tmp_path, tokenizer):
    folder = tmp_path / "text2image"
    write_png(folder / "images" / "a.png", np.zeros((8, 8), np.uint8))
    rows = [{"id": i, "file_name": f"images/{i}.png", "prompt": "p"} for i in ("a", "b")]
    (folder / "metadata.jsonl").write_text("\n".join(map(json.dumps, rows)))
    with pytest.raises(FileNotFoundError, match=r"1 listed file\(s\) missing .*images/b\.png"):
        PreparedImageDataset(tmp_path, "text2image", tokenizer)  # one pass over the listing, up front
    write_png(folder / "images" / "b.png", np.zeros((8, 8), np.uint8))
    dataset = PreparedImageDataset(tmp_path, "text2image", tokenizer)
    assert dataset[0]["pixel_values"].shape == (3, 8, 8)
    (folder / "images" / "b.png").unlink()  # gone later, during training
    with pytest.raises(FileNotFoundError, match="b.png"):
        dataset[1]


def test_lightning_fit_without_validation(prepared, tokenizer):
    import lightning as L

    class PixelProbe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def training_step(self, batch, batch_index):
            return ((batch["pixel_values"] - self.weight) ** 2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    datamodule = PreparedDataModule(str(prepared), tokenizer=tokenizer, batch_size=8,
                                    val_fraction=0.0)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(PixelProbe(), datamodule=datamodule)
    assert trainer.global_step == 3 and datamodule.counts() == {"train": 24, "val": 0}


def test_healthy_images_join_inpainting_under_their_own_caption(prepared, tokenizer):
    from helpers.prepared_sets import tiny_vae

    module = PreparedDataModule(str(prepared), task="inpaint", tokenizer=tokenizer, batch_size=4, val_fraction=0.25,
                                healthy={"prompt": "", "share": 0.5}, latent_cache={"pixels": True})
    module.set_vae(tiny_vae())
    module.setup("fit")
    train = module.train_dataset
    lesion_count = len(train.lesions)
    assert len(train.healthy) == lesion_count  # share 0.5 of the mix
    assert not set(train.healthy.ids) & set(module.val_dataset.ids)  # validation images stay out
    empty = tokenizer("", padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids[0]
    lesion, healthy = train[0], train[lesion_count]
    assert lesion["mask"].sum() > 0 and healthy["mask"].sum() == 0
    assert healthy["prompt"] == "" and torch.equal(healthy["input_ids"], empty)
    assert lesion.keys() == healthy.keys() and "masked_latent_mean" not in healthy and "pixel_values" in healthy
    batch = next(iter(module.train_dataloader()))  # lesion and healthy items collate into one batch
    assert batch["mask"].shape == (4, 1, 32, 32)
    assert module.attributes()["areas"] == sorted({r["area"] for r in train.lesions.records})
    assert module.counts()["train"] == 2 * lesion_count


def test_healthy_images_are_for_inpainting_only(prepared, tokenizer):
    module = PreparedDataModule(str(prepared), task="text2image", tokenizer=tokenizer, healthy={"share": 0.5})
    assert module.healthy is None
    with pytest.raises(ValueError, match="unknown healthy key"):
        PreparedDataModule(str(prepared), task="inpaint", tokenizer=tokenizer, healthy={"fraction": 0.5})


def test_inpainting_can_keep_only_lesions_of_some_categories(prepared, tokenizer, tmp_path):
    import shutil

    copy = tmp_path / "prepared"
    shutil.copytree(prepared, copy, ignore=shutil.ignore_patterns("latent_cache"))
    path = copy / "inpaint" / "metadata.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for number, row in enumerate(rows):
        row["boxes"][0][4] = "Mass, Suspicious Calcification" if number % 3 == 0 else (
            "calcification" if number % 3 == 1 else "Mass")
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    module = PreparedDataModule(str(copy), task="inpaint", tokenizer=tokenizer, batch_size=2, val_fraction=0.1,
                                lesion_categories=["mass"])
    module.setup("fit")
    kept = set(module.train_dataset.ids) | set(module.val_dataset.ids)
    assert kept == {r["id"] for number, r in enumerate(rows) if number % 3 != 1}
    with pytest.raises(ValueError, match="no lesion box of categories"):
        PreparedDataModule(str(copy), task="inpaint", tokenizer=tokenizer, lesion_categories=["architectural distortion"]).setup("fit")
