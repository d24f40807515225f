"""Corpus of bad JSONL records for datasets_scripts/validate.py, every file generated in tmp_path.

Each bad case appends one bad line to a small valid dataset and checks that the validator reports it
under the expected reason, names the record, and that the summary counts add up.
"""

import io
import json
import logging
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from datasets_scripts.validate import (
    ValidationOptions,
    infer_labels,
    main as validate_main,
    validate_files,
)
from processing_rmt import load_grayscale_image

LABELS = ("mild", "severe")
GOOD_RECORDS = [
    {"id": "good-1", "label": "mild", "image": "images/good.png", "text": "mild cough"},
    {"id": "good-2", "label": "severe", "image": "images/good.png", "text": None},
    {"id": "good-3", "label": "severe", "image": None, "text": "呼吸困难"},
]
OTHER_RECORD = {"id": "7", "label": "mild", "image": None, "text": "sore throat"}
BAD_LINE_NUMBER = len(GOOD_RECORDS) + 1


def image_bytes(mode: str = "L", size: tuple[int, int] = (16, 16), image_format: str = "PNG") -> bytes:
    """Return an encoded image with a gradient, so JPEG files have entropy-coded data to truncate."""
    width, height = size
    gradient = (np.add.outer(np.arange(height), np.arange(width)) * 7 % 256).astype(np.uint8)
    if mode == "I;16":
        image = PIL.Image.fromarray(gradient.astype(np.uint16) * 200)
    else:
        image = PIL.Image.fromarray(gradient).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return buffer.getvalue()


def noise_png(size: int = 64) -> bytes:
    """Return a PNG of random pixels. Noise does not compress, so most of the file is pixel data."""
    buffer = io.BytesIO()
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """Return a PNG whose header declares width x height pixels but whose data is a few bytes."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    pixels = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", pixels) + png_chunk(b"IEND", b"")


def jpeg_declaring(width: int, height: int) -> bytes:
    """Return a small JPEG whose start-of-frame marker is patched to declare width x height pixels."""
    data = bytearray(image_bytes(image_format="JPEG"))
    frame = data.index(b"\xff\xc0")
    # SOF0 layout after the marker: length (2 bytes), precision (1), height (2), width (2).
    data[frame + 5 : frame + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def write_image(data_dir: Path, name: str, content: bytes) -> str:
    path = data_dir / "images" / name
    path.write_bytes(content)
    return f"images/{name}"


def record_line(record: dict) -> bytes:
    return json.dumps(record, ensure_ascii=False).encode("utf-8")


def make_record(record_id: str = "bad-1", **fields) -> dict:
    return {"id": record_id, "label": "mild", "image": None, "text": "cough", **fields}


def with_image(data_dir: Path, name: str, content: bytes) -> bytes:
    return record_line(make_record(image=write_image(data_dir, name, content), text=None))


def write_outside_file(data_dir: Path) -> Path:
    outside = data_dir.parent / "outside"
    outside.mkdir(exist_ok=True)
    path = outside / "outside.png"
    path.write_bytes(image_bytes())
    return path


def symlinked_file(data_dir: Path) -> bytes:
    os.symlink(write_outside_file(data_dir), data_dir / "images" / "link.png")
    return record_line(make_record(image="images/link.png"))


def symlinked_folder(data_dir: Path) -> bytes:
    os.symlink(write_outside_file(data_dir).parent, data_dir / "linked_folder")
    return record_line(make_record(image="linked_folder/outside.png"))


def corrupt_png_data(data_dir: Path) -> bytes:
    content = bytearray(image_bytes(size=(32, 32)))
    data_start = content.index(b"IDAT") + 4
    content[data_start + 10] ^= 0xFF
    return with_image(data_dir, "bad_crc.png", bytes(content))


def dicom_bytes(rows: int = 12, columns: int = 16, pixel_bytes: int | None = None) -> bytes:
    """Return a 12-bit MONOCHROME2 DICOM file declaring rows x columns, with `pixel_bytes` bytes of pixel data."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    file_meta = FileMetaDataset()
    file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    file_meta.MediaStorageSOPInstanceUID = generate_uid()
    file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = Dataset()
    dataset.file_meta = file_meta
    dataset.SOPClassUID = file_meta.MediaStorageSOPClassUID
    dataset.SOPInstanceUID = file_meta.MediaStorageSOPInstanceUID
    dataset.Modality = "DX"
    dataset.Rows, dataset.Columns = rows, columns
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = "MONOCHROME2"
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 16, 12, 11
    dataset.PixelRepresentation = 0
    pixel_bytes = rows * columns * 2 if pixel_bytes is None else pixel_bytes
    dataset.PixelData = (np.arange(pixel_bytes // 2, dtype=np.uint16) % 4096).astype("<u2").tobytes()
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, dataset, enforce_file_format=True)
    return buffer.getvalue()


@dataclass(frozen=True)
class BadCase:
    """A bad line builder (given the dataset folder), the expected first error and the id the report names."""

    build: Callable[[Path], bytes]
    reason: str
    record_id: object = "bad-1"
    options: dict = field(default_factory=dict)


def bad(build: Callable[[Path], bytes], reason: str, record_id: object = "bad-1", **options) -> BadCase:
    return BadCase(build, reason, record_id, options)


def line(content: bytes | dict) -> Callable[[Path], bytes]:
    return lambda data_dir: content if isinstance(content, bytes) else record_line(content)


PNG = image_bytes()
JPEG = image_bytes(image_format="JPEG", size=(64, 64))
NOISE_PNG = noise_png()


BAD_CASES = {
    # Lines that do not parse.
    "json_unclosed_object": bad(line(b'{"id": "bad-1", "label": "mild", "image": null'), "invalid_json"),
    "json_trailing_comma": bad(line(b'{"id": "bad-1", "label": "mild", "image": null, "text": "a",}'), "invalid_json"),
    "json_single_quotes": bad(line(b"{'id': 'bad-1', 'label': 'mild'}"), "invalid_json", None),
    "json_two_objects": bad(line(b'{"id": "bad-1"} {"id": "bad-2"}'), "invalid_json"),
    "json_unquoted_key": bad(line(b'{id: "bad-1"}'), "invalid_json", None),
    "json_list": bad(line(b'["bad-1", "mild", null, "cough"]'), "not_an_object", None),
    "json_string": bad(line(b'"bad-1"'), "not_an_object", None),
    "json_null": bad(line(b"null"), "not_an_object", None),
    "latin1_text": bad(line('{"id": "bad-1", "label": "mild", "image": null, "text": "café"}'.encode("latin-1")),
                       "invalid_utf8"),  # fmt: skip
    "gbk_text": bad(line('{"id": "bad-1", "label": "mild", "image": null, "text": "咳嗽"}'.encode("gbk")),
                    "invalid_utf8"),  # fmt: skip
    "repeated_label_key": bad(line(b'{"id": "bad-1", "label": "mild", "label": "severe", "image": null, "text": "a"}'),
                              "duplicate_key"),  # fmt: skip
    # Keys and ids.
    "missing_text_key": bad(line({"id": "bad-1", "label": "mild", "image": None}), "missing_key"),
    "missing_image_key": bad(line({"id": "bad-1", "label": "mild", "text": "cough"}), "missing_key"),
    "missing_label_key": bad(line({"id": "bad-1", "image": None, "text": "cough"}), "missing_key"),
    "missing_id_key": bad(line({"label": "mild", "image": None, "text": "cough"}), "missing_key", None),
    "empty_object": bad(line({}), "missing_key", None),
    "id_null": bad(line(make_record(None)), "invalid_id", None),
    "id_empty": bad(line(make_record("")), "invalid_id", ""),
    "id_whitespace": bad(line(make_record("  ")), "invalid_id", "  "),
    "id_float": bad(line(make_record(1.5)), "invalid_id", 1.5),
    "id_boolean": bad(line(make_record(True)), "invalid_id", True),
    "id_list": bad(line(make_record(["a"])), "invalid_id", ["a"]),
    "id_repeated_in_file": bad(line(make_record("good-2")), "duplicate_id", "good-2"),
    "id_repeated_in_other_file": bad(line(make_record("7")), "duplicate_id", "7"),
    "id_integer_matches_string": bad(line(make_record(7)), "duplicate_id", 7),
    # Labels.
    "label_unknown": bad(line(make_record(label="moderate")), "unknown_label"),
    "label_null": bad(line(make_record(label=None)), "unknown_label"),
    "label_integer": bad(line(make_record(label=1)), "unknown_label"),
    "label_empty": bad(line(make_record(label="")), "unknown_label"),
    "label_capitalized": bad(line(make_record(label="Severe")), "label_case_mismatch"),
    "label_upper_case": bad(line(make_record(label="MILD")), "label_case_mismatch"),
    "label_padded": bad(line(make_record(label=" mild ")), "label_case_mismatch"),
    "label_trailing_tab": bad(line(make_record(label="severe\t")), "label_case_mismatch"),
    # Text and modalities.
    "no_modality_null_text": bad(line(make_record(text=None)), "no_modality"),
    "no_modality_empty_text": bad(line(make_record(text="")), "no_modality"),
    "no_modality_whitespace_text": bad(line(make_record(text=" \n\t ")), "no_modality"),
    "text_integer": bad(line(make_record(text=5)), "invalid_text"),
    "text_list": bad(line(make_record(text=["cough"])), "invalid_text"),
    "text_object": bad(line(make_record(text={"en": "cough"})), "invalid_text"),
    "text_boolean": bad(line(make_record(text=False)), "invalid_text"),
    # Image paths.
    "image_integer": bad(line(make_record(image=3)), "invalid_image_path"),
    "image_empty_string": bad(line(make_record(image="")), "invalid_image_path"),
    "image_list": bad(line(make_record(image=["images/good.png"])), "invalid_image_path"),
    "image_parent_folder": bad(
        lambda data_dir: write_outside_file(data_dir) and record_line(make_record(image="../outside/outside.png")),
        "image_outside_dataset",
    ),
    "image_absolute_outside": bad(
        lambda data_dir: record_line(make_record(image=str(write_outside_file(data_dir)))), "image_outside_dataset"
    ),
    "image_absolute_system_file": bad(line(make_record(image="/etc/hostname")), "image_outside_dataset"),
    "image_symlink_to_outside": bad(symlinked_file, "image_outside_dataset"),
    "image_symlinked_folder": bad(symlinked_folder, "image_outside_dataset"),
    "image_not_found": bad(line(make_record(image="images/nowhere.png")), "image_not_found"),
    "image_is_folder": bad(line(make_record(image="images")), "image_not_found"),
    # Image files.
    "image_zero_bytes": bad(lambda data_dir: with_image(data_dir, "empty.png", b""), "empty_image_file"),
    "png_truncated_half": bad(lambda data_dir: with_image(data_dir, "half.png", NOISE_PNG[: len(NOISE_PNG) // 2]),
                              "truncated_image"),  # fmt: skip
    "png_without_end_chunk": bad(lambda data_dir: with_image(data_dir, "no_end.png", NOISE_PNG[:-12]),
                                 "truncated_image"),  # fmt: skip
    "png_signature_only": bad(lambda data_dir: with_image(data_dir, "signature.png", PNG[:8]), "unreadable_image"),
    "png_bad_checksum": bad(corrupt_png_data, "corrupt_image"),
    "jpeg_truncated": bad(lambda data_dir: with_image(data_dir, "cut.jpg", JPEG[: len(JPEG) // 2]), "truncated_image"),
    "random_bytes": bad(
        lambda data_dir: with_image(data_dir, "noise.png", np.random.default_rng(0).bytes(512)), "unreadable_image"
    ),
    "text_file_as_image": bad(lambda data_dir: with_image(data_dir, "note.png", b"not an image\n"),
                              "unreadable_image"),  # fmt: skip
    "png_bomb_header": bad(lambda data_dir: with_image(data_dir, "bomb.png", png_header_only(30000, 30000)),
                           "image_too_large"),  # fmt: skip
    "png_bomb_within_pillow_limit": bad(
        lambda data_dir: with_image(data_dir, "bomb_small.png", png_header_only(12000, 12000)), "image_too_large"
    ),
    "jpeg_bomb_header": bad(lambda data_dir: with_image(data_dir, "bomb.jpg", jpeg_declaring(30000, 30000)),
                            "image_too_large"),  # fmt: skip
    "image_over_custom_limit": bad(lambda data_dir: with_image(data_dir, "big.png", image_bytes(size=(64, 64))),
                                   "image_too_large", max_image_pixels=1000),  # fmt: skip
    "dicom_bomb_header": bad(
        lambda data_dir: with_image(data_dir, "bomb.dcm", dicom_bytes(30000, 30000, pixel_bytes=64)), "image_too_large"
    ),
    "dicom_short_pixel_data": bad(lambda data_dir: with_image(data_dir, "short.dcm", dicom_bytes(pixel_bytes=64)),
                                  "corrupt_image"),  # fmt: skip
    "dicom_header_cut": bad(lambda data_dir: with_image(data_dir, "cut.dcm", dicom_bytes()[:200]),
                            "unreadable_image"),  # fmt: skip
    # Several problems: counted once, under the first.
    "unknown_label_and_missing_image": bad(
        line(make_record(label="moderate", image="images/nowhere.png")), "unknown_label"
    ),
}


def make_dataset(data_dir: Path) -> None:
    (data_dir / "images").mkdir(parents=True)
    (data_dir / "images" / "good.png").write_bytes(PNG)
    (data_dir / "train.jsonl").write_bytes(b"".join(record_line(record) + b"\n" for record in GOOD_RECORDS))
    (data_dir / "other.jsonl").write_bytes(record_line(OTHER_RECORD) + b"\n")


def validate_dataset(data_dir: Path, **options):
    options.setdefault("labels", LABELS)
    return validate_files([data_dir / "other.jsonl", data_dir / "train.jsonl"], ValidationOptions(**options))


def append_line(path: Path, content: bytes) -> None:
    with open(path, "ab") as handle:
        handle.write(content + b"\n")


@pytest.fixture
def data_dir(tmp_path) -> Path:
    folder = tmp_path / "data"
    make_dataset(folder)
    return folder


def test_corpus_has_forty_bad_cases():
    assert len(BAD_CASES) >= 40


@pytest.mark.parametrize("case", BAD_CASES.values(), ids=BAD_CASES.keys())
def test_bad_case_reported_once(data_dir, case):
    append_line(data_dir / "train.jsonl", case.build(data_dir))
    report = validate_dataset(data_dir, **case.options)

    assert len(report.bad) == 1, [str(finding) for finding in report.findings]
    result = report.bad[0]
    assert result.path == str(data_dir / "train.jsonl")
    assert result.line == BAD_LINE_NUMBER
    assert result.errors[0].reason == case.reason, str(result.errors[0])
    assert f"{data_dir / 'train.jsonl'}, line {BAD_LINE_NUMBER} (id={case.record_id!r}):" in str(result.errors[0])


@pytest.mark.parametrize("case", BAD_CASES.values(), ids=BAD_CASES.keys())
def test_bad_case_summary_adds_up(data_dir, case):
    append_line(data_dir / "train.jsonl", case.build(data_dir))
    summary = validate_dataset(data_dir, **case.options).summary()

    assert summary["records_read"] == len(GOOD_RECORDS) + 2
    assert summary["valid"] == len(GOOD_RECORDS) + 1
    assert summary["bad"] == 1
    assert summary["bad_by_reason"] == {case.reason: 1}
    assert sum(summary["valid_by_modality_pattern"].values()) == summary["valid"]


def test_several_errors_all_listed(data_dir):
    append_line(data_dir / "train.jsonl", BAD_CASES["unknown_label_and_missing_image"].build(data_dir))
    result = validate_dataset(data_dir).bad[0]

    assert [finding.reason for finding in result.errors] == ["unknown_label", "image_not_found"]


def test_label_case_mismatch_names_known_label(data_dir):
    append_line(data_dir / "train.jsonl", record_line(make_record(label="Severe ")))
    finding = validate_dataset(data_dir).bad[0].errors[0]

    assert "'Severe '" in finding.message
    assert "write 'severe'" in finding.message


def test_invalid_json_message_shows_line(data_dir):
    append_line(data_dir / "train.jsonl", b'{"id": "bad-1", "label": "mild"')
    finding = validate_dataset(data_dir).bad[0].errors[0]

    assert "invalid JSON" in finding.message
    assert '"label": "mild"' in finding.message


def test_outside_path_message_names_option(data_dir):
    append_line(data_dir / "train.jsonl", symlinked_file(data_dir))
    finding = validate_dataset(data_dir).bad[0].errors[0]

    assert "through a symbolic link" in finding.message
    assert "--allow_outside_paths" in finding.message


def test_bomb_rejected_before_decoding(data_dir, monkeypatch):
    decoded = []

    def record_decode(path):
        decoded.append(Path(path).name)
        return load_grayscale_image(path)

    monkeypatch.setattr("datasets_scripts.validate.load_grayscale_image", record_decode)
    append_line(data_dir / "train.jsonl", with_image(data_dir, "bomb.png", png_header_only(30000, 30000)))
    finding = validate_dataset(data_dir).bad[0].errors[0]

    assert finding.reason == "image_too_large"
    assert "refused before decoding" in finding.message
    assert "900000000 pixels" in finding.message
    assert "bomb.png" not in decoded
    assert "good.png" in decoded


def test_dicom_passes_and_loads(data_dir):
    append_line(data_dir / "train.jsonl", with_image(data_dir, "scan.dcm", dicom_bytes(rows=12, columns=16)))
    report = validate_dataset(data_dir)

    assert report.bad == [], [str(finding) for finding in report.findings]
    grayscale = load_grayscale_image(data_dir / "images" / "scan.dcm")
    assert grayscale.mode == "L"
    assert grayscale.size == (16, 12)


def test_large_header_message_names_size(data_dir):
    append_line(data_dir / "train.jsonl", with_image(data_dir, "large.png", png_header_only(12000, 12000)))
    finding = validate_dataset(data_dir).bad[0].errors[0]

    assert "declares 12000x12000 = 144000000 pixels" in finding.message
    assert f"max_image_pixels={100_000_000}" in finding.message


ACCEPTED_IMAGES = {
    "png_16_bit": ("I;16", "PNG"),
    "png_rgba": ("RGBA", "PNG"),
    "png_palette": ("P", "PNG"),
    "png_gray_alpha": ("LA", "PNG"),
    "png_one_bit": ("1", "PNG"),
    "jpeg_cmyk": ("CMYK", "JPEG"),
    "jpeg_rgb": ("RGB", "JPEG"),
    "tiff_16_bit": ("I;16", "TIFF"),
    "bmp_rgb": ("RGB", "BMP"),
}


@pytest.mark.parametrize("mode,image_format", ACCEPTED_IMAGES.values(), ids=ACCEPTED_IMAGES.keys())
def test_accepted_image_format_passes_and_loads(data_dir, mode, image_format):
    content = image_bytes(mode=mode, size=(24, 16), image_format=image_format)
    name = f"accepted.{image_format.lower()}"
    append_line(data_dir / "train.jsonl", with_image(data_dir, name, content))
    report = validate_dataset(data_dir)

    assert PIL.Image.open(data_dir / "images" / name).mode == mode
    assert report.bad == []
    grayscale = load_grayscale_image(data_dir / "images" / name)
    assert grayscale.mode == "L"
    assert grayscale.size == (24, 16)


ACCEPTED_LINES = {
    "image_path_through_parent_inside": lambda data_dir: record_line(make_record(image="images/../images/good.png")),
    "image_absolute_inside": lambda data_dir: record_line(make_record(image=str(data_dir / "images" / "good.png"))),
    "integer_id": lambda data_dir: record_line(make_record(12)),
    "chinese_id_and_text": lambda data_dir: record_line(make_record("病例-1", text="发热三天")),
    "extra_keys": lambda data_dir: record_line(make_record(patient_id="p-1", age=3)),
    "text_whitespace_with_image": lambda data_dir: record_line(make_record(image="images/good.png", text="  ")),
    "crlf_line_end": lambda data_dir: record_line(make_record()) + b"\r",
    "unicode_line_separator_in_text": lambda data_dir: record_line(make_record(text="cough\u2028fever")),
}


@pytest.mark.parametrize("build", ACCEPTED_LINES.values(), ids=ACCEPTED_LINES.keys())
def test_accepted_line_passes(data_dir, build):
    append_line(data_dir / "train.jsonl", build(data_dir))
    report = validate_dataset(data_dir)

    assert report.bad == [], [str(finding) for finding in report.findings]
    assert len(report.valid) == len(GOOD_RECORDS) + 2


def test_byte_order_mark_accepted_and_counted(data_dir):
    path = data_dir / "train.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    report = validate_dataset(data_dir)

    assert report.bad == []
    assert report.valid_records(path)[0]["id"] == "good-1"
    assert report.summary()["bom_lines"] == 1


def test_blank_lines_skipped_and_counted(data_dir):
    append_line(data_dir / "train.jsonl", b"   ")
    append_line(data_dir / "train.jsonl", record_line(make_record()))
    report = validate_dataset(data_dir)

    assert report.bad == []
    assert report.summary()["blank_lines"] == 1
    assert report.valid[-1].line == BAD_LINE_NUMBER + 1


def test_long_text_is_warning_not_error(data_dir):
    append_line(data_dir / "train.jsonl", record_line(make_record(text="cough " * 50)))
    report = validate_dataset(data_dir, max_text_chars=100)

    assert report.bad == []
    assert report.summary()["warnings_by_reason"] == {"long_text": 1}
    assert "300 characters" in report.findings[0].message


def test_outside_path_allowed_by_option(data_dir):
    append_line(data_dir / "train.jsonl", symlinked_file(data_dir))
    report = validate_dataset(data_dir, allow_outside_paths=True)

    assert report.bad == []


def test_outside_path_still_checks_file(data_dir):
    append_line(data_dir / "train.jsonl", record_line(make_record(image="/dev/null")))
    report = validate_dataset(data_dir, allow_outside_paths=True)

    assert report.bad[0].errors[0].reason == "image_not_found"


def test_infer_labels_prefers_majority_spelling():
    assert infer_labels(["severe", "severe", "Severe", "mild", None, 3, ""]) == ["mild", "severe"]


def test_inferred_labels_flag_minority_spelling(data_dir):
    append_line(data_dir / "train.jsonl", record_line(make_record(label="MILD")))
    report = validate_dataset(data_dir, labels=None)

    assert report.labels == ("mild", "severe")
    assert report.bad[0].errors[0].reason == "label_case_mismatch"


def test_cli_exit_code_and_report(data_dir, capsys):
    append_line(data_dir / "train.jsonl", record_line(make_record(label="moderate")))
    append_line(data_dir / "train.jsonl", b"{broken")
    exit_code = validate_main([str(data_dir / "train.jsonl"), "--labels", "mild", "severe"])
    output = capsys.readouterr().out

    assert exit_code == 1
    assert f"line {BAD_LINE_NUMBER} (id='bad-1'): unknown label 'moderate'" in output
    assert f"line {BAD_LINE_NUMBER + 1} (id=None): invalid JSON" in output
    assert "records read: 5 (valid 3, bad 2)" in output
    assert "bad records by first error: invalid_json 1, unknown_label 1" in output


def test_cli_clean_dataset_exits_zero(data_dir, capsys):
    exit_code = validate_main([str(data_dir / "train.jsonl"), str(data_dir / "other.jsonl")])
    output = capsys.readouterr().out

    assert exit_code == 0
    assert "valid records by modality pattern: image only 1, image+text 1, text only 2" in output


# train_rmt.py reads the splits through the validator: `--on_bad_record error` lists every bad record,
# `skip` drops them and logs each one.


def train_data_args(data_dir: Path, on_bad_record: str):
    from train_rmt import DataArguments

    return DataArguments(train_file=str(data_dir / "train.jsonl"), on_bad_record=on_bad_record)


def add_two_bad_records(data_dir: Path) -> None:
    append_line(data_dir / "train.jsonl", record_line(make_record("bad-1", label="moderate")))
    append_line(data_dir / "train.jsonl", record_line(make_record("bad-2", text=None)))


def test_train_error_mode_lists_every_record(data_dir):
    from train_rmt import DatasetError, load_splits

    add_two_bad_records(data_dir)
    files = {"train": str(data_dir / "train.jsonl")}
    with pytest.raises(DatasetError) as raised:
        load_splits(files, {"mild": 0, "severe": 1}, train_data_args(data_dir, "error"))

    message = str(raised.value)
    assert "2 invalid record(s) of 5 (no_modality: 1, unknown_label: 1)" in message
    assert f"line {BAD_LINE_NUMBER} (id='bad-1')" in message
    assert f"line {BAD_LINE_NUMBER + 1} (id='bad-2')" in message


def test_train_skip_mode_drops_and_logs(data_dir, caplog):
    from train_rmt import load_splits

    add_two_bad_records(data_dir)
    files = {"train": str(data_dir / "train.jsonl")}
    with caplog.at_level(logging.WARNING, logger="train_rmt"):
        splits = load_splits(files, {"mild": 0, "severe": 1}, train_data_args(data_dir, "skip"))

    assert splits["train"]["id"] == ["good-1", "good-2", "good-3"]
    assert splits["train"]["image"][0] == os.path.join(str(data_dir), "images/good.png")
    assert splits["train"]["text"][1] is None
    assert "Skipping 2 invalid record(s) of 5 (no_modality: 1, unknown_label: 1" in caplog.text
    assert "(id='bad-1')" in caplog.text
    assert "(id='bad-2')" in caplog.text


@pytest.mark.shared_data
def test_converted_collection_is_valid(covid_data_dir, tmp_path):
    from datasets_scripts.covid_chestxray import convert

    summary = convert(covid_data_dir, tmp_path, seed=42)
    files = [tmp_path / f"{split}.jsonl" for split in ("train", "validation", "test")]
    # The converter points at the collection's images in place, outside the output folder.
    report = validate_files(files, ValidationOptions(labels=LABELS, allow_outside_paths=True))

    records = [json.loads(text) for path in files for text in path.read_text().splitlines()]
    null_images = sum(record["image"] is None for record in records)
    assert report.bad == [], [str(finding) for finding in report.findings[:10]]
    assert len(report.valid) == summary["kept_rows"]
    assert null_images == summary["images_missing"]
    assert report.modality_patterns()["text only"] == null_images


@pytest.mark.shared_data
def test_converted_collection_paths_leave_folder(covid_data_dir, tmp_path):
    from datasets_scripts.covid_chestxray import convert

    convert(covid_data_dir, tmp_path, seed=42)
    report = validate_files([tmp_path / "test.jsonl"], ValidationOptions(labels=LABELS))

    with_image = [result for result in report.results if result.record["image"] is not None]
    assert with_image
    assert {result.errors[0].reason for result in with_image} == {"image_outside_dataset"}
