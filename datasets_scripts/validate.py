"""Validate RMT JSONL datasets and report every bad record.

Each line of a dataset is one sample, `{"id": ..., "label": ..., "image": ..., "text": ...}`, where
`image` is a path relative to the JSONL file's folder or null and `text` is null, empty or
whitespace-only when the clinical text is absent. Other keys (for example `patient_id`) are ignored.

Every record is checked and every problem is reported with the file, the line number, the record id
and a reason code (see REASONS). Errors make a record unusable. Warnings (only `long_text` today) leave
it usable. The checks, in order:

- the line is UTF-8 (a UTF-8 BOM at the start of a line is accepted and stripped) and one JSON object
  with no repeated key;
- the four keys are present, and the id is a non-empty string or an integer, unique across all files;
- the label is known. A label that differs from a known one only in case or whitespace gets its own
  reason, which names the known spelling, and is not fixed silently;
- the text is a string or null, and at least one modality is present;
- the image path resolves inside the JSONL file's folder after `..` and symbolic links are followed
  (unless outside paths are allowed) and names a non-empty regular file;
- the image header declares at most `max_image_pixels` pixels, checked before any pixel is decoded;
- the file passes PIL's integrity check (DICOM files skip it) and `processing_rmt.load_grayscale_image`
  decodes it. So 16-bit, RGBA, palette, CMYK and DICOM images pass, because the processor converts them
  to 8-bit grayscale.

`train_rmt.py` runs the same checks before training.

Usage:
    python datasets_scripts/validate.py data/train.jsonl [more.jsonl ...] [--labels mild severe]
        [--allow_outside_paths] [--max_image_pixels N] [--max_text_chars N]

The report lists each finding, then a summary. The exit status is 1 when any record has an error,
else 0. Warnings alone do not change it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import PIL.Image

if __package__ in (None, ""):
    # Run as a script: make the repository's top-level modules (processing_rmt) importable.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from processing_rmt import _is_dicom_path, load_grayscale_image  # noqa: E402

REQUIRED_KEYS = ("id", "label", "image", "text")
ERROR = "error"
WARNING = "warning"
UTF8_BOM = b"\xef\xbb\xbf"

# The default maximum number of pixels (width x height) an image header may declare: 100 megapixels,
# e.g. 10000 x 10000. Digital chest radiographs are typically about 3000 x 3000 (9 megapixels). It is below
# the 179-megapixel size at which Pillow 13 raises DecompressionBombError, so every image that passes
# here also opens in the image processor.
MAX_IMAGE_PIXELS = 100_000_000

# The default text length, in characters, above which a record gets a `long_text` warning. The text
# stays usable because the tokenizer keeps only the first `max_seq_length` tokens, but a text this long
# is more likely a whole report or a concatenation error in the export than a clinical note. No note in
# the COVID-19 image data collection is longer than about 4,700 characters.
MAX_TEXT_CHARS = 10_000

# Reason code -> (severity, description). Each finding carries one of these codes.
REASONS: dict[str, tuple[str, str]] = {
    "invalid_utf8": (ERROR, "the line is not valid UTF-8"),
    "invalid_json": (ERROR, "the line is not valid JSON"),
    "not_an_object": (ERROR, "the line is JSON but not an object"),
    "duplicate_key": (ERROR, "the object repeats a key, so one of the values would be ignored"),
    "missing_key": (ERROR, "a required key is missing"),
    "invalid_id": (ERROR, "the id is null, empty, or neither a string nor an integer"),
    "duplicate_id": (ERROR, "another record has the same id"),
    "unknown_label": (ERROR, "the label is not one of the known labels"),
    "label_case_mismatch": (ERROR, "the label differs from a known label only in case or whitespace"),
    "invalid_text": (ERROR, "the text is neither a string nor null"),
    "long_text": (WARNING, "the text is longer than max_text_chars characters"),
    "no_modality": (ERROR, "the image is null and the text is absent"),
    "invalid_image_path": (ERROR, "the image is neither a non-empty string nor null"),
    "image_outside_dataset": (ERROR, "the image path resolves outside the JSONL file's folder"),
    "image_not_found": (ERROR, "the image file does not exist or is not a regular file"),
    "empty_image_file": (ERROR, "the image file has zero bytes"),
    "image_too_large": (ERROR, "the image header declares more than max_image_pixels pixels"),
    "unreadable_image": (ERROR, "PIL cannot identify the image format"),
    "truncated_image": (ERROR, "the image file ends before its data does"),
    "corrupt_image": (ERROR, "the image pixels fail to decode"),
}

MODALITY_PATTERNS = {(True, True): "image+text", (True, False): "image only", (False, True): "text only"}

# Finds the id in a line that is not valid JSON, so that the report can still name the record.
ID_IN_RAW_LINE = re.compile(r'"id"\s*:\s*("(?:[^"\\]|\\.)*"|-?\d+)')


@dataclass(frozen=True)
class ValidationOptions:
    """Settings of the validator.

    labels: the known labels. None infers them from the records (see `infer_labels`).
    allow_outside_paths: accept image paths that resolve outside the JSONL file's folder.
    max_image_pixels: maximum width x height an image header may declare.
    max_text_chars: text length in characters above which a record gets a `long_text` warning.
    """

    labels: tuple[str, ...] | None = None
    allow_outside_paths: bool = False
    max_image_pixels: int = MAX_IMAGE_PIXELS
    max_text_chars: int = MAX_TEXT_CHARS


@dataclass(frozen=True)
class Finding:
    """One problem of one record: its location, the reason code from REASONS and a readable message."""

    path: str
    line: int
    record_id: Any
    reason: str
    message: str

    @property
    def severity(self) -> str:
        return REASONS[self.reason][0]

    def __str__(self) -> str:
        return f"{self.path}, line {self.line} (id={self.record_id!r}): {self.message}"


@dataclass
class RecordResult:
    """One non-blank line of a JSONL file: the parsed object (None when it did not parse) and its findings."""

    path: str
    line: int
    record: dict[str, Any] | None
    record_id: Any = None
    findings: list[Finding] = field(default_factory=list)

    def add(self, reason: str, message: str) -> None:
        self.findings.append(Finding(self.path, self.line, self.record_id, reason, message))

    @property
    def errors(self) -> list[Finding]:
        return [finding for finding in self.findings if finding.severity == ERROR]

    @property
    def is_valid(self) -> bool:
        return not self.errors


@dataclass
class ValidationReport:
    """Results of validating one or more JSONL files, in file and line order."""

    results: list[RecordResult]
    labels: tuple[str, ...]
    blank_lines: int = 0
    bom_lines: int = 0

    @property
    def valid(self) -> list[RecordResult]:
        return [result for result in self.results if result.is_valid]

    @property
    def bad(self) -> list[RecordResult]:
        return [result for result in self.results if not result.is_valid]

    @property
    def findings(self) -> list[Finding]:
        return [finding for result in self.results for finding in result.findings]

    def valid_records(self, path: str | os.PathLike) -> list[dict[str, Any]]:
        """Return the valid records of one file, in line order."""
        return [result.record for result in self.valid if result.path == str(path)]

    def bad_by_reason(self) -> Counter[str]:
        """Count bad records by their first error, so the counts add up to the number of bad records."""
        return Counter(result.errors[0].reason for result in self.bad)

    def warnings_by_reason(self) -> Counter[str]:
        return Counter(finding.reason for finding in self.findings if finding.severity == WARNING)

    def modality_patterns(self) -> Counter[str]:
        """Count valid records by modality pattern ("image+text", "image only", "text only")."""
        return Counter(modality_pattern(result.record) for result in self.valid)

    def summary(self) -> dict[str, Any]:
        return {
            "records_read": len(self.results),
            "valid": len(self.valid),
            "bad": len(self.bad),
            "valid_by_modality_pattern": dict(sorted(self.modality_patterns().items())),
            "bad_by_reason": dict(sorted(self.bad_by_reason().items())),
            "warnings_by_reason": dict(sorted(self.warnings_by_reason().items())),
            "blank_lines": self.blank_lines,
            "bom_lines": self.bom_lines,
            "labels": list(self.labels),
        }

    def format_summary(self) -> str:
        summary = self.summary()

        def counts(table: dict[str, int]) -> str:
            return ", ".join(f"{name} {count}" for name, count in table.items()) or "none"

        return "\n".join(
            [
                f"records read: {summary['records_read']} (valid {summary['valid']}, bad {summary['bad']})",
                f"valid records by modality pattern: {counts(summary['valid_by_modality_pattern'])}",
                f"bad records by first error: {counts(summary['bad_by_reason'])}",
                f"warnings: {counts(summary['warnings_by_reason'])}",
                f"labels: {summary['labels']}",
                f"blank lines skipped: {summary['blank_lines']}, lines with a UTF-8 BOM: {summary['bom_lines']}",
            ]
        )


def has_text(text: Any) -> bool:
    """Return True for a string with non-whitespace characters. None, "" and whitespace-only mean absent."""
    return isinstance(text, str) and bool(text.strip())


def modality_pattern(record: dict[str, Any]) -> str:
    return MODALITY_PATTERNS[(record["image"] is not None, has_text(record["text"]))]


def read_lines(path: str | os.PathLike) -> Iterator[tuple[int, bytes]]:
    """Yield (1-based line number, raw bytes without the line break) for every line of a file.

    The file is split on b"\\n" only, as JSON Lines defines, so a U+2028 inside a string stays in its line.
    """
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            yield line_number, raw.rstrip(b"\r\n")


class DuplicateKeyError(ValueError):
    """A JSON object repeats one or more keys."""

    def __init__(self, keys: list[str]) -> None:
        super().__init__(f"repeated key(s) {keys}")
        self.keys = keys


def reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Build a JSON object like `dict(pairs)`, but raise DuplicateKeyError when a key repeats."""
    counts = Counter(key for key, _ in pairs)
    repeated = sorted(key for key, count in counts.items() if count > 1)
    if repeated:
        raise DuplicateKeyError(repeated)
    return dict(pairs)


def guess_id(text: str) -> Any:
    """Return the id found in a line that did not parse, or None, so that its finding can name the record."""
    match = ID_IN_RAW_LINE.search(text)
    if match is None:
        return None
    try:
        return json.loads(match.group(1))
    except json.JSONDecodeError:
        return None


def parse_line(result: RecordResult, raw: bytes) -> None:
    """Decode and parse one line into `result.record`, or add the finding that explains why it failed."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        result.record_id = guess_id(raw.decode("utf-8", errors="replace"))
        bad_bytes = raw[error.start : error.end].hex(" ")
        result.add("invalid_utf8", f"line is not valid UTF-8 (bytes {bad_bytes} at offset {error.start}); "
                   "re-encode the file as UTF-8")  # fmt: skip
        return

    try:
        value = json.loads(text, object_pairs_hook=reject_duplicate_keys)
    except DuplicateKeyError as error:
        result.record_id = guess_id(text)
        result.add("duplicate_key", f"the object repeats the key(s) {error.keys}; keep one value per key")
        return
    except json.JSONDecodeError as error:
        result.record_id = guess_id(text)
        snippet = text if len(text) <= 80 else text[:77] + "..."
        result.add("invalid_json", f"invalid JSON ({error.msg} at column {error.colno}): {snippet!r}")
        return

    if not isinstance(value, dict):
        result.add("not_an_object", f"expected a JSON object, got {type(value).__name__}: {text[:80]!r}")
        return
    result.record = value
    result.record_id = value.get("id")


def read_results(path: str | os.PathLike) -> tuple[list[RecordResult], int, int]:
    """Parse every non-blank line of a JSONL file. Return the results, the blank-line count and the BOM count.

    A UTF-8 BOM at the start of a line is stripped and counted. Editors put one at the start of a
    file, and concatenated files carry one at the start of a later line.
    """
    results = []
    blank_lines = 0
    bom_lines = 0
    for line_number, raw in read_lines(path):
        if raw.startswith(UTF8_BOM):
            raw = raw[len(UTF8_BOM) :]
            bom_lines += 1
        if not raw.strip():
            blank_lines += 1
            continue
        result = RecordResult(path=str(path), line=line_number, record=None)
        parse_line(result, raw)
        results.append(result)
    return results, blank_lines, bom_lines


def read_labels(path: str | os.PathLike) -> list[Any]:
    """Return the `label` value of every record of a JSONL file that parses, skipping lines that do not."""
    results, _, _ = read_results(path)
    return [result.record.get("label") for result in results if result.record is not None]


def infer_labels(labels: Iterable[Any]) -> list[str]:
    """Return the sorted label set, taking one spelling per group of labels equal up to case and whitespace.

    The most frequent spelling of each group is kept (ties go to a stripped, lowercase spelling), so
    a stray "Severe " beside many "severe" is later reported as a `label_case_mismatch`, not taken as
    a third class. Non-string and blank labels are left out.
    """
    spellings: dict[str, Counter[str]] = defaultdict(Counter)
    for label in labels:
        if isinstance(label, str) and label.strip():
            spellings[label.strip().casefold()][label] += 1

    def preference(item: tuple[str, int]) -> tuple:
        spelling, count = item
        return (-count, spelling != spelling.strip(), spelling != spelling.lower(), spelling)

    return sorted(min(counts.items(), key=preference)[0] for counts in spellings.values())


def check_keys(result: RecordResult) -> bool:
    """Add a `missing_key` finding and return False when a required key is absent."""
    missing = [key for key in REQUIRED_KEYS if key not in result.record]
    if missing:
        result.add("missing_key", f"missing key(s) {missing}; every record needs {list(REQUIRED_KEYS)}")
        return False
    return True


def check_id(result: RecordResult, first_seen: dict[str, RecordResult]) -> None:
    """Check that the id is a non-empty string or an integer and that no earlier record has it.

    Ids are compared as strings, because training turns every id into a string, so 7 and "7" collide.
    """
    record_id = result.record["id"]
    if isinstance(record_id, bool) or not isinstance(record_id, (str, int)):
        result.add("invalid_id", f"id must be a non-empty string or an integer, got {record_id!r}")
        return
    key = str(record_id)
    if not key.strip():
        result.add("invalid_id", f"id must be a non-empty string or an integer, got {record_id!r}")
        return
    first = first_seen.setdefault(key, result)
    if first is not result:
        result.add("duplicate_id", f"duplicate id {key!r}, first used at {first.path}, line {first.line}")


def check_label(result: RecordResult, labels: Sequence[str]) -> None:
    label = result.record["label"]
    if label in labels:
        return
    if isinstance(label, str):
        for known in labels:
            if label.strip().casefold() == known.strip().casefold():
                result.add(
                    "label_case_mismatch",
                    f"label {label!r} differs from the known label {known!r} only in case or whitespace; "
                    f"write {known!r}",
                )
                return
    result.add("unknown_label", f"unknown label {label!r}, expected one of {sorted(labels)}")


def check_text(result: RecordResult, max_text_chars: int) -> None:
    text = result.record["text"]
    if text is not None and not isinstance(text, str):
        result.add("invalid_text", f"text must be a string or null, got {type(text).__name__} {_short(text)}")
        return
    if text is not None and len(text) > max_text_chars:
        result.add(
            "long_text",
            f"text has {len(text)} characters, more than {max_text_chars}; the tokenizer keeps only the "
            "first max_seq_length tokens",
        )


def check_modalities(result: RecordResult) -> None:
    image, text = result.record["image"], result.record["text"]
    if image is None and (text is None or (isinstance(text, str) and not text.strip())):
        result.add("no_modality", "both modalities absent (image is null and text is empty)")


def check_image(result: RecordResult, folder: Path, options: ValidationOptions) -> None:
    """Check the image path and, when it is allowed and exists, the file it names."""
    image = result.record["image"]
    if image is None:
        return
    if not isinstance(image, str) or not image.strip():
        result.add(
            "invalid_image_path",
            f"image must be a non-empty path string or null (null when the X-ray is absent), got {image!r}",
        )
        return

    path = folder / image
    if not options.allow_outside_paths:
        problem = outside_path_problem(folder, image)
        if problem is not None:
            result.add("image_outside_dataset", problem)
            return

    problem = check_image_file(path, options.max_image_pixels)
    if problem is not None:
        result.add(*problem)


def outside_path_problem(folder: Path, image: str) -> str | None:
    """Return why `image` resolves outside `folder` (through `..`, an absolute path or a symbolic link), or None."""
    resolved_folder = Path(os.path.realpath(folder))
    resolved = Path(os.path.realpath(folder / image))
    if resolved.is_relative_to(resolved_folder):
        return None
    lexical = Path(os.path.normpath(folder.absolute() / image))
    through_link = lexical.is_relative_to(Path(os.path.normpath(folder.absolute())))
    how = "through a symbolic link " if through_link else ""
    return (
        f"image path {image!r} resolves {how}to {resolved}, outside the dataset folder {resolved_folder}; "
        "move the file into the folder or pass --allow_outside_paths"
    )


def check_image_file(path: Path, max_image_pixels: int = MAX_IMAGE_PIXELS) -> tuple[str, str] | None:
    """Return (reason, message) when an image file cannot be used, else None.

    The header size is checked before any pixel is decoded, so a decompression bomb costs only its header.
    """
    if not path.is_file():
        if path.exists():
            return "image_not_found", f"image path is not a regular file: {path}"
        return "image_not_found", f"image file not found: {path}"
    if path.stat().st_size == 0:
        return "empty_image_file", f"image file is empty (0 bytes): {path}"

    if _is_dicom_path(path):
        problem = check_dicom_header(path, max_image_pixels)
    else:
        problem = check_image_header(path, max_image_pixels) or check_image_integrity(path)
    if problem is not None:
        return problem
    return check_image_pixels(path)


def check_dicom_header(path: Path, max_image_pixels: int) -> tuple[str, str] | None:
    """Read a DICOM file without its pixel data and check the declared size of all frames together."""
    try:
        import pydicom
    except ImportError:
        return "unreadable_image", f"unreadable image {path}: reading DICOM files requires pydicom"
    try:
        dataset = pydicom.dcmread(path, stop_before_pixels=True)
        rows, columns = int(dataset.Rows), int(dataset.Columns)
        frames = int(dataset.get("NumberOfFrames", 1) or 1)
    except Exception as error:  # noqa: BLE001 - pydicom raises many types on malformed files
        return "unreadable_image", f"unreadable image {path}: DICOM header could not be read ({error})"

    if rows * columns * frames > max_image_pixels:
        return (
            "image_too_large",
            f"image too large, refused before decoding: {path} declares {frames} frame(s) of {columns}x{rows} = "
            f"{rows * columns * frames} pixels, more than max_image_pixels={max_image_pixels}",
        )
    return None


def check_image_header(path: Path, max_image_pixels: int) -> tuple[str, str] | None:
    """Read only the image header and check the format and the declared size."""
    try:
        with warnings.catch_warnings():
            # Pillow warns above its own limit. This function applies `max_image_pixels` instead.
            warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
            with PIL.Image.open(path) as image:
                width, height = image.size
    except PIL.Image.DecompressionBombError as error:
        return "image_too_large", f"image too large, refused before decoding: {path}: {error}"
    except PIL.UnidentifiedImageError:
        return "unreadable_image", f"unreadable image {path}: not in an image format PIL can read"
    except (OSError, SyntaxError, ValueError) as error:
        return image_error_reason(error), f"unreadable image {path}: header could not be read ({error})"

    if width * height > max_image_pixels:
        return (
            "image_too_large",
            f"image too large, refused before decoding: {path} declares {width}x{height} = {width * height} "
            f"pixels, more than max_image_pixels={max_image_pixels}",
        )
    return None


def check_image_integrity(path: Path) -> tuple[str, str] | None:
    """Run PIL's `verify()`, which checks PNG chunk checksums and finds files that end early."""
    # Image plugins raise many exception types on malformed files (OSError, SyntaxError, struct.error,
    # IndexError...), so any exception counts as a bad file here rather than a crash of the validator.
    try:
        with PIL.Image.open(path) as image:
            image.verify()
    except Exception as error:  # noqa: BLE001
        return image_error_reason(error), f"unreadable image {path}: integrity check failed ({error})"
    return None


def check_image_pixels(path: Path) -> tuple[str, str] | None:
    """Decode the image as the image processor does."""
    # Any exception means a bad file, for the reason given in check_image_integrity.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
            load_grayscale_image(path)
    except Exception as error:  # noqa: BLE001
        cause = error.__cause__ or error
        return image_error_reason(cause), f"unreadable image {path}: pixels failed to decode ({cause})"
    return None


def image_error_reason(error: BaseException) -> str:
    """Return `truncated_image` when a PIL error says the data ends early, else `corrupt_image`."""
    # NOTE: Pillow has no exception type for truncation, so this reads its messages ("image file is
    # truncated", "Truncated File Read", "truncated PNG file" in Pillow 13).
    return "truncated_image" if "truncated" in str(error).lower() else "corrupt_image"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def validate_records(
    results: list[RecordResult], labels: Sequence[str], options: ValidationOptions
) -> None:
    """Run the record checks on parsed results, adding findings in place. Ids must be unique across all."""
    first_seen: dict[str, RecordResult] = {}
    for result in results:
        if result.record is None or not check_keys(result):
            continue
        check_id(result, first_seen)
        check_label(result, labels)
        check_text(result, options.max_text_chars)
        check_modalities(result)
        check_image(result, Path(result.path).parent, options)


def validate_files(
    paths: Sequence[str | os.PathLike], options: ValidationOptions = ValidationOptions()
) -> ValidationReport:
    """Validate JSONL files together (ids must be unique across them) and return the report.

    Without `options.labels`, the labels are inferred from all files with `infer_labels`.
    """
    results: list[RecordResult] = []
    blank_lines = 0
    bom_lines = 0
    for path in paths:
        file_results, file_blank_lines, file_bom_lines = read_results(path)
        results += file_results
        blank_lines += file_blank_lines
        bom_lines += file_bom_lines

    if options.labels is not None:
        labels = tuple(options.labels)
    else:
        labels = tuple(infer_labels(result.record.get("label") for result in results if result.record is not None))
    validate_records(results, labels, options)
    return ValidationReport(results=results, labels=labels, blank_lines=blank_lines, bom_lines=bom_lines)


def format_findings(findings: Iterable[Finding]) -> str:
    return "\n".join(f"{finding.severity}: {finding} [{finding.reason}]" for finding in findings)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path, help="JSONL files; ids must be unique across all of them")
    parser.add_argument(
        "--labels", nargs="+", default=None, help="the known labels (default: inferred from the files)"
    )
    parser.add_argument(
        "--allow_outside_paths",
        action="store_true",
        help="accept image paths that resolve outside the JSONL file's folder (.., absolute paths, symbolic links)",
    )
    parser.add_argument(
        "--max_image_pixels",
        type=int,
        default=MAX_IMAGE_PIXELS,
        help=f"maximum width x height an image header may declare (default: {MAX_IMAGE_PIXELS})",
    )
    parser.add_argument(
        "--max_text_chars",
        type=int,
        default=MAX_TEXT_CHARS,
        help=f"text length in characters above which a record gets a warning (default: {MAX_TEXT_CHARS})",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    missing = [str(path) for path in args.files if not path.is_file()]
    if missing:
        print(f"error: JSONL file(s) not found: {missing}", file=sys.stderr)
        return 2
    options = ValidationOptions(
        labels=tuple(args.labels) if args.labels else None,
        allow_outside_paths=args.allow_outside_paths,
        max_image_pixels=args.max_image_pixels,
        max_text_chars=args.max_text_chars,
    )
    report = validate_files(args.files, options)
    if report.findings:
        print(format_findings(report.findings))
        print()
    print(report.format_summary())
    return 1 if report.bad else 0


if __name__ == "__main__":
    sys.exit(main())
