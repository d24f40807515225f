"""DICOM input: modality and VOI transforms, MONOCHROME1 inversion, and detection of DICOM files."""

from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid  # noqa: E402

from processing_rmt import RMTImageProcessor, load_grayscale_image  # noqa: E402

# 12-bit values stored in 16-bit words (BitsAllocated 16, BitsStored 12).
STORED_VALUES = np.array(
    [
        [0, 500, 1000, 1500],
        [2000, 2500, 3000, 4095],
        [1000, 2000, 3000, 3500],
    ],
    dtype=np.uint16,
)


def make_dataset(
    pixels: np.ndarray,
    photometric: str = "MONOCHROME2",
    **elements,
) -> Dataset:
    """Build a single-frame, uncompressed 12-bit grayscale DICOM dataset holding `pixels` (H, W) uint16."""
    file_meta = FileMetaDataset()
    file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    file_meta.MediaStorageSOPInstanceUID = generate_uid()
    file_meta.TransferSyntaxUID = ExplicitVRLittleEndian

    dataset = Dataset()
    dataset.file_meta = file_meta
    dataset.SOPClassUID = file_meta.MediaStorageSOPClassUID
    dataset.SOPInstanceUID = file_meta.MediaStorageSOPInstanceUID
    dataset.Modality = "DX"
    dataset.Rows, dataset.Columns = pixels.shape
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = photometric
    dataset.BitsAllocated = 16
    dataset.BitsStored = 12
    dataset.HighBit = 11
    dataset.PixelRepresentation = 0
    dataset.PixelData = pixels.astype("<u2").tobytes()
    for keyword, value in elements.items():
        setattr(dataset, keyword, value)
    return dataset


def write_dicom(path: Path, dataset: Dataset) -> Path:
    dataset.save_as(path, enforce_file_format=True)
    return path


def gray(image) -> np.ndarray:
    return np.asarray(load_grayscale_image(image), dtype=np.int64)


def test_monochrome2_without_window_spans_full_range(tmp_path):
    path = write_dicom(tmp_path / "plain.dcm", make_dataset(STORED_VALUES))
    values = gray(path)
    assert values.shape == STORED_VALUES.shape
    assert values[0, 0] == 0
    assert values[1, 3] == 255
    expected = np.rint(STORED_VALUES / 4095 * 255)
    np.testing.assert_array_equal(values, expected)


@pytest.mark.parametrize(
    "elements",
    [{}, {"WindowCenter": 2000, "WindowWidth": 2000}],
    ids=["no-window", "window"],
)
def test_monochrome1_is_inverted_monochrome2(tmp_path, elements):
    monochrome2 = write_dicom(tmp_path / "m2.dcm", make_dataset(STORED_VALUES, "MONOCHROME2", **elements))
    monochrome1 = write_dicom(tmp_path / "m1.dcm", make_dataset(STORED_VALUES, "MONOCHROME1", **elements))
    np.testing.assert_array_equal(gray(monochrome1), 255 - gray(monochrome2))


def test_monochrome1_low_values_are_white(tmp_path):
    # In MONOCHROME1 the lowest stored value is displayed white.
    path = write_dicom(tmp_path / "m1.dcm", make_dataset(STORED_VALUES, "MONOCHROME1"))
    values = gray(path)
    assert values[0, 0] == 255
    assert values[1, 3] == 0


def test_window_clips_and_maps_linearly(tmp_path):
    # LINEAR window (PS3.3 C.11.2.1.2.1): center 2000, width 1001 covers about [1500, 2500].
    path = write_dicom(
        tmp_path / "window.dcm", make_dataset(STORED_VALUES, WindowCenter=2000, WindowWidth=1001)
    )
    values = gray(path)
    assert values[0, 0] == 0, "below the window"
    assert values[0, 2] == 0, "below the window"
    assert values[1, 1] == 255, "above the window"
    assert values[1, 3] == 255, "above the window"
    assert values[1, 0] == pytest.approx(127.5, abs=1), "window center"


def test_rescale_applies_before_window(tmp_path):
    # Stored 1000/2000/3000 become 0/1000/2000 after the rescale. The window is given in rescaled units.
    dataset = make_dataset(
        STORED_VALUES, RescaleSlope=1, RescaleIntercept=-1000, WindowCenter=1000, WindowWidth=1001
    )
    values = gray(write_dicom(tmp_path / "rescaled.dcm", dataset))
    assert values[2, 0] == 0, "stored 1000 is rescaled 0, below the window"
    assert values[2, 1] == pytest.approx(127.5, abs=1), "stored 2000 is rescaled 1000, the window center"
    assert values[2, 2] == 255, "stored 3000 is rescaled 2000, above the window"


def test_rescale_slope_without_window_keeps_order(tmp_path):
    # A negative slope reverses the stored order, so the brightest stored value becomes the darkest.
    dataset = make_dataset(STORED_VALUES, RescaleSlope=-1, RescaleIntercept=4095)
    values = gray(write_dicom(tmp_path / "negative.dcm", dataset))
    assert values[0, 0] == 255
    assert values[1, 3] == 0


def test_voi_lut_sequence_is_applied(tmp_path):
    # An inverting 256-entry LUT with 8-bit output. Both elements have an ambiguous VR, so the test sets it.
    lut_item = Dataset()
    lut_item.add_new("LUTDescriptor", "US", [256, 0, 8])
    lut_item.add_new("LUTData", "US", list(range(255, -1, -1)))
    pixels = np.array([[0, 64], [128, 255]], dtype=np.uint16)
    dataset = make_dataset(pixels, VOILUTSequence=[lut_item])
    values = gray(write_dicom(tmp_path / "lut.dcm", dataset))
    np.testing.assert_array_equal(values, 255 - pixels)


def test_dataset_object_is_accepted(tmp_path):
    dataset = make_dataset(STORED_VALUES, WindowCenter=2000, WindowWidth=2000)
    from_file = gray(write_dicom(tmp_path / "a.dcm", dataset))
    from_object = gray(pydicom.dcmread(tmp_path / "a.dcm"))
    np.testing.assert_array_equal(from_object, from_file)


def test_file_without_extension_is_detected(tmp_path):
    dataset = make_dataset(STORED_VALUES)
    with_extension = write_dicom(tmp_path / "image.dcm", dataset)
    without_extension = tmp_path / "IM000001"
    without_extension.write_bytes(with_extension.read_bytes())
    np.testing.assert_array_equal(gray(without_extension), gray(with_extension))


def test_missing_dicom_file_names_path(tmp_path):
    missing = tmp_path / "missing.dcm"
    with pytest.raises(ValueError, match="missing.dcm.*not found"):
        load_grayscale_image(missing)


def test_corrupt_dicom_file_names_path(tmp_path):
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"not a dicom file at all")
    with pytest.raises(ValueError, match="broken.dcm"):
        load_grayscale_image(broken)


def test_multiframe_dicom_is_rejected(tmp_path):
    frames = np.stack([STORED_VALUES, STORED_VALUES])
    dataset = make_dataset(STORED_VALUES, NumberOfFrames=2)
    dataset.PixelData = frames.astype("<u2").tobytes()
    path = write_dicom(tmp_path / "frames.dcm", dataset)
    with pytest.raises(ValueError, match="2 frames"):
        load_grayscale_image(path)


def test_image_processor_reads_dicom_path(tmp_path):
    path = write_dicom(tmp_path / "x.dcm", make_dataset(STORED_VALUES))
    pixel_values = RMTImageProcessor(size=16).preprocess([str(path)])["pixel_values"]
    assert tuple(pixel_values.shape) == (1, 3, 16, 16)
    assert pixel_values.isfinite().all()
