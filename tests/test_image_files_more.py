"""Image folders as users have them: macOS's hidden ``._NAME`` files beside segmentation images, masks carrying their
own EXIF orientation, and mostly grey folders holding a few colour images."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from vitlab.data.build import build_dataset
from vitlab.data.dataset import ImageFileDataset
from vitlab.data.dense import MaskFolder
from vitlab.data.errors import DatasetError
from vitlab.data.folder import guess_channels
from vitlab.data.image import load_image

APPLEDOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        "  # the header of a macOS ._NAME resource file
ROTATE_CW = 6  # EXIF orientation: the stored pixels are shown turned 90 degrees clockwise


def exif(orientation: int) -> Image.Exif:
    e = Image.Exif()
    e[0x0112] = orientation
    return e


def seg_folder(root, stored_hw=(32, 32), image_orientation=None, mask_orientation=None, mask_mode="L"):
    """images/a.png (a bright bar on black) and masks/a.png (class 1 on the bar's stored pixels, 0 elsewhere),
    each with the EXIF orientation given (None: no EXIF)."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    h, w = stored_hw
    img = np.zeros((h, w, 3), np.uint8)
    img[0:8, 0:16] = 255
    mask = np.zeros((h, w), np.uint8)
    mask[0:8, 0:16] = 1
    kw = {} if image_orientation is None else {"exif": exif(image_orientation)}
    Image.fromarray(img).save(root / "images" / "a.png", **kw)
    m = Image.fromarray(mask)
    if mask_mode == "P":
        m = m.convert("P")
        m.putpalette([0, 0, 0, 128, 0, 0] + [0] * 762)  # VOC's colours: index 1 dark red
    elif mask_mode == "1":
        m = Image.fromarray(mask.astype(bool))
    elif mask_mode == "I;16":
        m = Image.fromarray(mask.astype(np.uint16))
    kw = {} if mask_orientation is None else {"exif": exif(mask_orientation)}
    m.save(root / "masks" / "a.png", **kw)
    return mask


# ---------------------------------------------------------------------------- hidden files


def test_segmentation_images_folder_skips_macos_hidden_files(tmp_path):
    """A ._NAME.png AppleDouble file (and .DS_Store) beside the images is not an image without a mask."""
    seg_folder(tmp_path)
    (tmp_path / "images" / "._a.png").write_bytes(APPLEDOUBLE)
    (tmp_path / "images" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    ds = MaskFolder(tmp_path / "images", tmp_path / "masks", num_classes=2)
    assert [p.name for p, _ in ds.pairs] == ["a.png"]
    ds.check_files(classes=True)
    assert ds[0][1].shape == (32, 32)


def test_segmentation_and_classification_list_the_same_files(tmp_path):
    """The segmentation image list follows the image-folder rule: hidden files out, image extensions in."""
    from vitlab.data.image import walk_image_files

    seg_folder(tmp_path)
    for name in ("._a.png", ".b.png", "notes.txt"):
        (tmp_path / "images" / name).write_bytes(APPLEDOUBLE)
    ds = MaskFolder(tmp_path / "images", tmp_path / "masks", num_classes=2)
    assert [str(p) for p, _ in ds.pairs] == sorted(walk_image_files(tmp_path / "images"))


# ---------------------------------------------------------------------------- masks' EXIF orientation


@pytest.mark.parametrize("mode", ["L", "P", "1", "I;16"])
def test_a_mask_with_its_images_exif_orientation_is_aligned_as_displayed(tmp_path, mode):
    """Image and mask store the same pixels and carry the same EXIF orientation: as displayed (the image turned by
    load_image), class 1 covers exactly the bar; the mask is transposed, its class ids exact."""
    stored = seg_folder(tmp_path, image_orientation=ROTATE_CW, mask_orientation=ROTATE_CW, mask_mode=mode)
    ds = MaskFolder(tmp_path / "images", tmp_path / "masks", num_classes=2)
    s = ds.raw(0)
    bar = s["image"][0] > 128
    assert torch.equal(s["mask"] == 1, bar)
    assert torch.equal(s["mask"], torch.from_numpy(np.rot90(stored, -1).astype(np.int64)))


def test_a_non_square_mask_with_exif_orientation_passes_the_size_checks(tmp_path):
    """32x16 stored, both turned to 16x32 by EXIF: not refused as 'mask is 32x16, its image is 16x32'."""
    seg_folder(tmp_path, stored_hw=(16, 32), image_orientation=ROTATE_CW, mask_orientation=ROTATE_CW)
    ds = MaskFolder(tmp_path / "images", tmp_path / "masks", num_classes=2)
    values = ds.check_files(classes=True)
    assert set(values.pixels) == {0, 1}
    s = ds.raw(0)
    assert s["image"].shape[-2:] == s["mask"].shape == (32, 16)
    assert torch.equal(s["mask"] == 1, s["image"][0] > 128)


def test_a_mask_without_exif_is_read_as_stored(tmp_path):
    stored = seg_folder(tmp_path)
    ds = MaskFolder(tmp_path / "images", tmp_path / "masks", num_classes=2)
    assert torch.equal(ds.raw(0)["mask"], torch.from_numpy(stored.astype(np.int64)))


def test_the_size_error_names_the_exif_orientation(tmp_path):
    """An image turned by EXIF, its mask drawn on the stored pixels without the tag: the error says why the sizes
    differ, both from the headers (check_files) and when decoding."""
    seg_folder(tmp_path, stored_hw=(16, 32), image_orientation=ROTATE_CW)
    ds = MaskFolder(tmp_path / "images", tmp_path / "masks", num_classes=2)
    for check in (ds.check_files, lambda: ds.raw(0)):
        with pytest.raises(DatasetError, match=r"mask is 32x16, its image a.png is 16x32.*EXIF orientation \(6"):
            check()


def test_the_size_error_names_the_masks_own_exif_orientation(tmp_path):
    seg_folder(tmp_path, stored_hw=(16, 32), mask_orientation=ROTATE_CW)
    ds = MaskFolder(tmp_path / "images", tmp_path / "masks", num_classes=2)
    with pytest.raises(DatasetError, match=r"the mask stores 32x16, turned by its EXIF orientation"):
        ds.check_files()


# ---------------------------------------------------------------------------- channels of mostly grey folders


def grey_folder_with_colour(root, n_grey: int):
    """Classes a and b: ``n_grey`` random grey PNGs each, plus one red (a) and one green (b) PNG."""
    rng = np.random.default_rng(0)
    for cls, colour in (("a", 0), ("b", 1)):
        (root / cls).mkdir(parents=True)
        for i in range(n_grey):
            Image.fromarray(rng.integers(0, 256, (4, 4), dtype=np.uint8)).save(root / cls / f"{i:03d}.png",
                                                                                compress_level=0)
        pixels = np.zeros((4, 4, 3), np.uint8)
        pixels[..., colour] = 255
        Image.fromarray(pixels).save(root / cls / f"colour{colour}.png")


def test_a_few_colour_images_among_many_grey_ones_make_a_colour_data_set(tmp_path):
    """300 grey + 1 colour image per class: every header is read, so the colour images are not converted to grey
    (a sample of 64 headers missed them)."""
    grey_folder_with_colour(tmp_path / "data", 300)
    ds = build_dataset(tmp_path / "data", split="train", val_fraction=0.0)
    assert ds.in_chans == 3
    red = ds.paths.index(str(tmp_path / "data" / "a" / "colour0.png"))
    assert ds.decode(red).float().mean((1, 2)).tolist() == [255.0, 0.0, 0.0]
    grey = [p for p in ds.paths if "colour" not in p.rsplit("/", 1)[-1]]
    assert guess_channels(grey, [0] * len(grey)) == 1


def test_past_the_file_cap_a_grey_sample_is_said_to_be_a_sample(tmp_path, caplog):
    grey_folder_with_colour(tmp_path, 10)
    paths = sorted(str(p) for p in tmp_path.glob("*/[0-9]*.png"))
    with caplog.at_level(logging.WARNING, logger="vitlab.data.folder"):
        assert guess_channels(paths, [0] * len(paths), max_files=5) == 1
    assert "the headers of a seeded sample of 5" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vitlab.data.folder"):
        assert guess_channels(paths, [0] * len(paths)) == 1
    assert "sample" not in caplog.text


def test_a_colour_image_decoded_into_a_grey_data_set_is_named_once(tmp_path, caplog):
    """A 1-channel data set (its headers sampled, or in_chans=1 given) drops the colour of a colour image: the first
    such file is named in a warning; an RGB file of a grey picture loses nothing and is not."""
    grey_rgb = tmp_path / "grey_rgb.png"
    Image.fromarray(np.full((4, 4, 3), 90, np.uint8)).save(grey_rgb)
    grey_folder_with_colour(tmp_path / "data", 1)
    red, green = tmp_path / "data" / "a" / "colour0.png", tmp_path / "data" / "b" / "colour1.png"
    ds = ImageFileDataset([grey_rgb, red, green], [0, 0, 1], classes=["a", "b"], in_chans=1, source="test")
    with caplog.at_level(logging.WARNING, logger="vitlab.data.dataset"):
        assert ds.decode(0).shape == (1, 4, 4)
        assert "colour image" not in caplog.text
        assert ds.decode(1).shape == (1, 4, 4)
        assert ds[2][0].shape == (1, 4, 4)
    warned = [r.getMessage() for r in caplog.records if "colour image" in r.getMessage()]
    assert len(warned) == 1 and str(red) in warned[0] and "in_chans=3" in warned[0]
    assert load_image(red).shape[0] == 3  # the file itself is colour


def test_a_grey_file_saved_again_in_colour_changes_the_guess(tmp_path):
    """The answer kept for a list of files is not served once one of them changed."""
    grey_folder_with_colour(tmp_path, 3)
    paths = sorted(str(p) for p in tmp_path.glob("*/[0-9]*.png"))
    assert guess_channels(paths, [0] * len(paths)) == 1
    Image.fromarray(np.zeros((4, 4, 3), np.uint8) + np.array([0, 0, 255], np.uint8)).save(paths[-1])
    assert guess_channels(paths, [0] * len(paths)) == 3
