"""Convert a hospital CSV export (Chinese or English) into RMT's JSONL splits, with identifiers removed.

The CSV has one row per chest X-ray study. Arguments name its columns: the label, the image file,
the clinical diagnosis and the radiological findings, optionally a record id and a patient id. Each
output line of `train.jsonl`, `validation.jsonl` and `test.jsonl` is

    {"id": str, "label": str, "image": str | null, "text": str | null, "patient_id": str}

- Identifier columns (hospital number, name, phone, ID number, address, date of birth...; see
  DEFAULT_IDENTIFIER_COLUMNS) are dropped. Their values are also redacted wherever they occur in the
  free text of any row, together with the identifiers that `redaction.Redactor` finds by pattern.
- Explicit diagnostic statements (重症肺炎, severe pneumonia, 轻症, mild...; see
  DEFAULT_DIAGNOSIS_PATTERNS) are removed from the diagnosis, because the label is derived from the
  same judgement. The findings keep their wording.
- `text` is the redacted diagnosis and the redacted findings, joined by a newline. It is null when
  both are empty.
- Images are copied to `images/<id><suffix>`, because original file names often carry a name or a
  hospital number. A missing image file gives `image: null`. Rows with neither image nor text are
  dropped.
- Labels are mapped with `--label_map` (e.g. 重症=severe 轻症=mild). Unmapped values, empty ids and
  duplicate ids are errors that list every row, unless `--skip_bad_rows` drops those rows.
- `id` is the `--id_column` value, or `record-<row number>` without one. `patient_id` is a pseudonym,
  `patient-<n>` in order of first appearance. With `--patient_column`, all rows of a patient go to the
  same split.
- The splits are 7:2:1 and stratified by label, seeded (see covid_chestxray.split_by_patient).
- `redaction_report.json` counts the redactions per identifier type, the non-empty cells per dropped
  column, the removed diagnostic statements per pattern and the rows per split and label. It never
  contains a redacted value.

Usage:
    python datasets_scripts/hospital_records.py --csv export.csv --output_dir OUT \\
        --label_column 病情分级 --label_map 重症=severe 轻症=mild --image_column 影像文件 \\
        --diagnosis_column 临床诊断 --findings_column 影像所见 [--id_column 病例编号] \\
        [--patient_column 住院号] [--image_root DIR] [--seed 42] [--encoding utf-8-sig]

NOTE: DICOM images are copied as they are, so patient data in their headers is not removed.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import re
import shutil
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    # Run as a script: make the `datasets_scripts` package importable.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasets_scripts import redaction  # noqa: E402
from datasets_scripts.covid_chestxray import SPLIT_FRACTIONS, split_by_patient  # noqa: E402

logger = logging.getLogger(__name__)

# Column name -> identifier type of its values. Names are matched after stripping, case-insensitively.
DEFAULT_IDENTIFIER_COLUMNS: dict[str, str] = {
    "住院号": redaction.MRN,
    "门诊号": redaction.MRN,
    "病案号": redaction.MRN,
    "病历号": redaction.MRN,
    "登记号": redaction.MRN,
    "姓名": redaction.NAME,
    "患者姓名": redaction.NAME,
    "患儿姓名": redaction.NAME,
    "家长姓名": redaction.NAME,
    "监护人": redaction.NAME,
    "监护人姓名": redaction.NAME,
    "电话": redaction.PHONE,
    "联系电话": redaction.PHONE,
    "手机": redaction.PHONE,
    "手机号": redaction.PHONE,
    "家长电话": redaction.PHONE,
    "身份证号": redaction.ID_NUMBER,
    "身份证": redaction.ID_NUMBER,
    "身份证号码": redaction.ID_NUMBER,
    "地址": redaction.ADDRESS,
    "住址": redaction.ADDRESS,
    "家庭住址": redaction.ADDRESS,
    "出生日期": redaction.DOB,
    "Name": redaction.NAME,
    "Patient Name": redaction.NAME,
    "Guardian": redaction.NAME,
    "Guardian Name": redaction.NAME,
    "Phone": redaction.PHONE,
    "Telephone": redaction.PHONE,
    "Mobile": redaction.PHONE,
    "MRN": redaction.MRN,
    "Medical Record Number": redaction.MRN,
    "Hospital Number": redaction.MRN,
    "ID Number": redaction.ID_NUMBER,
    "National ID": redaction.ID_NUMBER,
    "SSN": redaction.ID_NUMBER,
    "Address": redaction.ADDRESS,
    "Date of Birth": redaction.DOB,
    "DOB": redaction.DOB,
    "Email": redaction.EMAIL,
}

# Statements of the severity judgement that the label encodes. Longer patterns are tried first, so
# 重症肺炎 goes as a whole. English patterns match case-insensitively between ASCII word boundaries.
DEFAULT_DIAGNOSIS_PATTERNS = (
    "重症肺炎",
    "轻症肺炎",
    "危重症",
    "非重症",
    "重症",
    "轻症",
    "危重",
    "severe pneumonia",
    "mild pneumonia",
    "non-severe",
    "severe",
    "mild",
)

# Separators and brackets left over when a statement is removed from a diagnosis list.
EMPTY_BRACKETS = re.compile(r"[（(\[【]\s*[）)\]】]")
REPEATED_SEPARATORS = re.compile(r"\s*([，,；;、])(?:\s*[，,；;、])+\s*")
EDGE_SEPARATORS = re.compile(r"^[\s，,；;、：:。.\-]+|[\s，,；;、：:\-]+$")
MULTIPLE_SPACES = re.compile(r"[ \t]{2,}")


class ConversionError(ValueError):
    """The CSV cannot be converted; the message lists every problem row."""


@dataclass(frozen=True)
class ConversionOptions:
    """Column mapping and settings of one conversion (see the module docstring and `parse_args`)."""

    csv_path: Path
    output_dir: Path
    label_column: str
    label_map: Mapping[str, str]
    diagnosis_column: str | None = None
    findings_column: str | None = None
    image_column: str | None = None
    id_column: str | None = None
    patient_column: str | None = None
    image_root: Path | None = None
    identifier_columns: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_IDENTIFIER_COLUMNS))
    diagnosis_patterns: Sequence[str] = DEFAULT_DIAGNOSIS_PATTERNS
    seed: int = 42
    encoding: str = "utf-8-sig"
    skip_bad_rows: bool = False


@dataclass(frozen=True)
class RowProblem:
    """A row that cannot be converted. `detail` may show a label value, never an identifier."""

    line: int
    reason: str
    detail: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.detail}"


@dataclass
class Record:
    id: str
    label: str
    image: str | None
    text: str | None
    patient_id: str
    group: str

    def to_json(self) -> str:
        return json.dumps(
            {"id": self.id, "label": self.label, "image": self.image, "text": self.text, "patient_id": self.patient_id},
            ensure_ascii=False,
        )


def read_csv(path: Path, encoding: str) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """Return the header and (line number, row) pairs. The line number is where the row ends in the file."""
    try:
        with open(path, newline="", encoding=encoding) as handle:
            reader = csv.DictReader(handle)
            header = [name.strip() for name in reader.fieldnames or []]
            reader.fieldnames = header
            rows = [(reader.line_num, {key: (value or "") for key, value in row.items()}) for row in reader]
    except UnicodeDecodeError as error:
        raise ConversionError(
            f"{path} is not valid {encoding} (byte offset {error.start}); exports from Chinese Excel are often "
            "GB18030, so try --encoding gb18030"
        ) from error
    return header, rows


def match_identifier_columns(header: Sequence[str], identifier_columns: Mapping[str, str]) -> dict[str, str]:
    """Return the header columns that are identifier columns, mapped to their identifier type."""
    wanted = {name.strip().casefold(): kind for name, kind in identifier_columns.items()}
    return {column: wanted[column.casefold()] for column in header if column.casefold() in wanted}


def check_columns(header: Sequence[str], options: ConversionOptions, identifier_columns: Mapping[str, str]) -> None:
    """Raise ConversionError for a named column that is missing, or an id column that is an identifier."""
    named = {
        "--label_column": options.label_column,
        "--diagnosis_column": options.diagnosis_column,
        "--findings_column": options.findings_column,
        "--image_column": options.image_column,
        "--id_column": options.id_column,
        "--patient_column": options.patient_column,
    }
    missing = [f"{flag} {column!r}" for flag, column in named.items() if column is not None and column not in header]
    if missing:
        raise ConversionError(f"{options.csv_path}: column(s) not found: {', '.join(missing)}; the header is {header}")
    if options.id_column in identifier_columns:
        raise ConversionError(
            f"--id_column {options.id_column!r} is an identifier column and would be written to the output; "
            "name a study record id column, or leave --id_column out to number the records"
        )
    if options.diagnosis_column is None and options.findings_column is None and options.image_column is None:
        raise ConversionError("give at least one of --diagnosis_column, --findings_column and --image_column")


def collect_known_identifiers(
    rows: Sequence[tuple[int, dict[str, str]]], identifier_columns: Mapping[str, str]
) -> tuple[dict[str, str], dict[str, int]]:
    """Return every identifier value of every row mapped to its type, and the non-empty cells per column."""
    known: dict[str, str] = {}
    non_empty: Counter[str] = Counter({column: 0 for column in identifier_columns})
    for _, row in rows:
        for column, kind in identifier_columns.items():
            value = row.get(column, "").strip()
            if value:
                known.setdefault(value, kind)
                non_empty[column] += 1
    return known, dict(non_empty)


def compile_diagnosis_patterns(patterns: Sequence[str]) -> re.Pattern[str]:
    """Compile the statements into one pattern, longest first. ASCII words get ASCII word boundaries.

    The boundaries are ASCII only because Python's \\b finds no boundary between a Chinese character and
    a Latin letter, so a boundary rule would miss "诊断severe".
    """
    alternatives = []
    for pattern in sorted(patterns, key=len, reverse=True):
        escaped = re.escape(pattern).replace(r"\ ", r"\s+")
        if pattern[:1].isascii() and pattern[:1].isalnum():
            escaped = r"(?<![A-Za-z0-9])" + escaped
        if pattern[-1:].isascii() and pattern[-1:].isalnum():
            escaped += r"(?![A-Za-z0-9])"
        alternatives.append(escaped)
    return re.compile("|".join(alternatives), re.IGNORECASE)


def remove_diagnostic_statements(text: str, pattern: re.Pattern[str]) -> tuple[str, Counter[str]]:
    """Remove every statement that matches `pattern`, tidy the separators left behind, and count removals."""
    removed: Counter[str] = Counter()

    def drop(match: re.Match[str]) -> str:
        removed[match.group(0).casefold()] += 1
        return ""

    text = pattern.sub(drop, text)
    text = EMPTY_BRACKETS.sub("", text)
    text = REPEATED_SEPARATORS.sub(lambda match: match.group(1) + (" " if match.group(1) in ",;" else ""), text)
    text = EDGE_SEPARATORS.sub("", text)
    text = MULTIPLE_SPACES.sub(" ", text)
    return text.strip(), removed


def copy_image(options: ConversionOptions, value: str, record_id: str) -> str | None:
    """Copy the image to `images/<id><suffix>` in the output folder and return that path, or None if absent."""
    if not value.strip():
        return None
    root = options.image_root or options.csv_path.parent
    source = root / value.strip()
    if not source.is_file():
        return None
    target = Path("images") / f"{safe_file_stem(record_id)}{source.suffix.lower()}"
    shutil.copyfile(source, options.output_dir / target)
    return target.as_posix()


def safe_file_stem(record_id: str) -> str:
    return re.sub(r"[^0-9A-Za-z_\-\u4e00-\u9fff]", "_", record_id)


@dataclass
class ConversionState:
    """Counts and problems gathered while rows are converted."""

    problems: list[RowProblem] = field(default_factory=list)
    redactions: dict[str, Counter[str]] = field(default_factory=lambda: {"diagnosis": Counter(), "findings": Counter()})
    statements_removed: Counter[str] = field(default_factory=Counter)
    dropped: Counter[str] = field(default_factory=lambda: Counter({"bad_row": 0, "no_modality": 0}))
    images_missing: list[int] = field(default_factory=list)


def row_label(line: int, row: Mapping[str, str], options: ConversionOptions, state: ConversionState) -> str | None:
    value = row[options.label_column].strip()
    label = options.label_map.get(value)
    if label is None:
        state.problems.append(
            RowProblem(line, "unknown_label", f"unknown label value {value!r}, expected one of {list(options.label_map)}")
        )
    return label


def row_id(line: int, row: Mapping[str, str], options: ConversionOptions, seen: dict[str, int],
           state: ConversionState, redactor: redaction.Redactor) -> str | None:  # fmt: skip
    """Return the record id, or None after adding the problem when it is empty, repeated or identifying."""
    if options.id_column is None:
        return f"record-{line:06d}"
    value = row[options.id_column].strip()
    if not value:
        state.problems.append(RowProblem(line, "empty_id", f"empty {options.id_column!r}"))
        return None
    if redactor.redact(value)[0] != value:
        state.problems.append(RowProblem(line, "identifying_id", f"{options.id_column!r} looks like an identifier"))
        return None
    if value in seen:
        state.problems.append(RowProblem(line, "duplicate_id", f"duplicate id {value!r}, first on line {seen[value]}"))
        return None
    seen[value] = line
    return value


def redacted_field(row: Mapping[str, str], column: str | None, name: str, redactor: redaction.Redactor,
                   state: ConversionState) -> str:  # fmt: skip
    if column is None:
        return ""
    text, counts = redactor.redact(row[column].strip())
    state.redactions[name].update(counts)
    return text.strip()


def build_records(
    rows: Sequence[tuple[int, dict[str, str]]], options: ConversionOptions, redactor: redaction.Redactor
) -> tuple[list[Record], ConversionState]:
    """Convert the rows into records. Rows with a problem are left out and listed in the returned state."""
    state = ConversionState()
    diagnosis_pattern = compile_diagnosis_patterns(options.diagnosis_patterns)
    seen_ids: dict[str, int] = {}
    patient_pseudonyms: dict[str, str] = {}
    records = []
    for line, row in rows:
        problems_before = len(state.problems)
        label = row_label(line, row, options, state)
        record_id = row_id(line, row, options, seen_ids, state, redactor)
        if len(state.problems) > problems_before:
            state.dropped["bad_row"] += 1
            continue

        diagnosis = redacted_field(row, options.diagnosis_column, "diagnosis", redactor, state)
        diagnosis, removed = remove_diagnostic_statements(diagnosis, diagnosis_pattern)
        state.statements_removed.update(removed)
        findings = redacted_field(row, options.findings_column, "findings", redactor, state)
        text = "\n".join(part for part in (diagnosis, findings) if part) or None

        image = copy_image(options, row[options.image_column], record_id) if options.image_column else None
        if options.image_column and row[options.image_column].strip() and image is None:
            state.images_missing.append(line)
        if image is None and text is None:
            state.dropped["no_modality"] += 1
            continue

        patient_key = row[options.patient_column].strip() if options.patient_column else f"row-{line}"
        patient_id = patient_pseudonyms.setdefault(patient_key, f"patient-{len(patient_pseudonyms) + 1:05d}")
        records.append(Record(record_id, label, image, text, patient_id, group=patient_id))
    return records, state


def write_splits(records: Sequence[Record], output_dir: Path, seed: int) -> dict[str, dict[str, int]]:
    """Write the 7:2:1 grouped, stratified splits and return the rows per split and label."""
    splits = split_by_patient([record.label for record in records], [record.group for record in records], seed)
    labels = sorted({record.label for record in records})
    table = {split: {label: 0 for label in labels} for split in SPLIT_FRACTIONS}
    for split in SPLIT_FRACTIONS:
        with open(output_dir / f"{split}.jsonl", "w", encoding="utf-8") as handle:
            for record, name in zip(records, splits):
                if name == split:
                    handle.write(record.to_json() + "\n")
                    table[split][record.label] += 1
    return table


def build_report(
    options: ConversionOptions,
    rows: Sequence[tuple[int, dict[str, str]]],
    records: Sequence[Record],
    state: ConversionState,
    dropped_columns: Mapping[str, int],
    splits: Mapping[str, Mapping[str, int]],
) -> dict[str, Any]:
    return {
        "seed": options.seed,
        "input_rows": len(rows),
        "kept_rows": len(records),
        "dropped_rows": dict(state.dropped),
        "problems": [{"line": problem.line, "reason": problem.reason} for problem in state.problems],
        "dropped_columns": dict(dropped_columns),
        "redactions": redaction.total_counts(state.redactions.values()),
        "redactions_by_field": {name: redaction.total_counts([counts]) for name, counts in state.redactions.items()},
        "diagnostic_statements_removed": dict(sorted(state.statements_removed.items())),
        "images_missing": len(state.images_missing),
        "images_missing_lines": state.images_missing,
        "splits": splits,
    }


def convert(options: ConversionOptions) -> dict[str, Any]:
    """Write the JSONL splits, the copied images and `redaction_report.json`, and return the report.

    Raises:
        ConversionError: a named column is missing, the id column is an identifier column, or (without
            `skip_bad_rows`) some rows have an unknown label or an empty, repeated or identifying id.
    """
    header, rows = read_csv(options.csv_path, options.encoding)
    identifier_columns = match_identifier_columns(header, options.identifier_columns)
    check_columns(header, options, identifier_columns)
    known, dropped_columns = collect_known_identifiers(rows, identifier_columns)
    logger.info("Read %d rows; dropping %d identifier column(s)", len(rows), len(identifier_columns))

    (options.output_dir / "images").mkdir(parents=True, exist_ok=True)
    records, state = build_records(rows, options, redaction.Redactor(known))
    if state.problems and not options.skip_bad_rows:
        listing = "\n".join(str(problem) for problem in state.problems)
        raise ConversionError(
            f"{options.csv_path}: {len(state.problems)} problem(s) in {state.dropped['bad_row']} row(s):\n{listing}\n"
            "Fix them (for labels, extend --label_map), or pass --skip_bad_rows to leave those rows out."
        )
    for problem in state.problems:
        logger.warning("Skipping %s, %s", options.csv_path, problem)

    splits = write_splits(records, options.output_dir, options.seed)
    report = build_report(options, rows, records, state, dropped_columns, splits)
    with open(options.output_dir / "redaction_report.json", "w", encoding="utf-8") as handle:
        json.dump(report, handle, ensure_ascii=False, indent=2)
    logger.info(
        "Kept %d of %d rows (dropped %s); redactions %s",
        len(records), len(rows), dict(state.dropped), {k: v for k, v in report["redactions"].items() if v},
    )  # fmt: skip
    return report


def parse_mapping(entries: Sequence[str], flag: str) -> dict[str, str]:
    """Parse `KEY=VALUE` entries; raise argparse.ArgumentTypeError naming the flag for a malformed one."""
    mapping = {}
    for entry in entries:
        key, separator, value = entry.partition("=")
        if not separator or not key.strip() or not value.strip():
            raise argparse.ArgumentTypeError(f"{flag} expects KEY=VALUE entries, got {entry!r}")
        mapping[key.strip()] = value.strip()
    return mapping


def parse_identifier_columns(entries: Sequence[str]) -> dict[str, str]:
    """Parse `COLUMN` or `COLUMN=TYPE` entries. A bare column takes its default type, else IDENTIFIER."""
    defaults = {name.casefold(): kind for name, kind in DEFAULT_IDENTIFIER_COLUMNS.items()}
    columns = {}
    for entry in entries:
        column, _, kind = entry.partition("=")
        kind = kind.strip().upper() or defaults.get(column.strip().casefold(), redaction.IDENTIFIER)
        if kind not in redaction.IDENTIFIER_TYPES:
            raise argparse.ArgumentTypeError(f"unknown identifier type {kind!r} in {entry!r}, expected one of "
                                             f"{list(redaction.IDENTIFIER_TYPES)}")  # fmt: skip
        columns[column.strip()] = kind
    return columns


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", type=Path, required=True, help="the hospital CSV export")
    parser.add_argument("--output_dir", type=Path, required=True, help="folder for the splits, images/ and report")
    parser.add_argument("--label_column", required=True, help="column with the severity grade")
    parser.add_argument("--label_map", nargs="+", required=True, metavar="VALUE=LABEL",
                        help="label values to RMT labels, e.g. 重症=severe 轻症=mild")  # fmt: skip
    parser.add_argument("--diagnosis_column", help="column with the clinical diagnosis")
    parser.add_argument("--findings_column", help="column with the radiological findings")
    parser.add_argument("--image_column", help="column with the image path, relative to --image_root")
    parser.add_argument("--image_root", type=Path, help="folder the image paths start from (default: the CSV's)")
    parser.add_argument("--id_column", help="column with a study record id (default: record-<CSV line>)")
    parser.add_argument("--patient_column", help="column with a patient id; a patient's rows share one split")
    parser.add_argument("--identifier_columns", nargs="+", metavar="COLUMN[=TYPE]",
                        help="replace the default list of identifier columns to drop and redact")  # fmt: skip
    parser.add_argument("--extra_identifier_columns", nargs="+", default=[], metavar="COLUMN[=TYPE]",
                        help="add identifier columns to the default list")  # fmt: skip
    parser.add_argument("--diagnosis_patterns", nargs="+", help="replace the default diagnostic statements")
    parser.add_argument("--seed", type=int, default=42, help="seed of the split (default: 42)")
    parser.add_argument("--encoding", default="utf-8-sig", help="CSV encoding, e.g. gb18030 (default: utf-8-sig)")
    parser.add_argument("--skip_bad_rows", action="store_true",
                        help="leave out rows with an unknown label or a bad id instead of stopping")  # fmt: skip
    return parser.parse_args(argv)


def options_from_args(args: argparse.Namespace) -> ConversionOptions:
    identifier_columns = (
        parse_identifier_columns(args.identifier_columns) if args.identifier_columns else dict(DEFAULT_IDENTIFIER_COLUMNS)
    )
    identifier_columns.update(parse_identifier_columns(args.extra_identifier_columns))
    return ConversionOptions(
        csv_path=args.csv,
        output_dir=args.output_dir,
        label_column=args.label_column,
        label_map=parse_mapping(args.label_map, "--label_map"),
        diagnosis_column=args.diagnosis_column,
        findings_column=args.findings_column,
        image_column=args.image_column,
        id_column=args.id_column,
        patient_column=args.patient_column,
        image_root=args.image_root,
        identifier_columns=identifier_columns,
        diagnosis_patterns=tuple(args.diagnosis_patterns or DEFAULT_DIAGNOSIS_PATTERNS),
        seed=args.seed,
        encoding=args.encoding,
        skip_bad_rows=args.skip_bad_rows,
    )


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        report = convert(options_from_args(args))
    except (ConversionError, argparse.ArgumentTypeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(json.dumps({key: report[key] for key in ("input_rows", "kept_rows", "dropped_rows", "redactions")},
                     ensure_ascii=False))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
