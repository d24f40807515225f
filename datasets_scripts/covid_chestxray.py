"""Convert the COVID-19 image data collection into RMT's JSONL splits.

Source: J. P. Cohen, P. Morrison, L. Dao, K. Roth, T. Q. Duong, M. Ghassemi, "COVID-19 Image Data
Collection: Prospective Predictions Are the Future", 2020 (github.com/ieee8023/covid-chestxray-dataset).
The input folder contains `metadata.csv` and the image files at `<folder>/<filename>`.

Each output line of `train.jsonl`, `validation.jsonl` and `test.jsonl` is one frontal chest X-ray:

    {"id": str, "label": "mild" | "severe", "image": str | null, "text": str | null, "patient_id": str}

`image` is the image path relative to the output folder (POSIX separators, nothing is copied), or null
when the file is absent. `text` is `clinical_notes` with every sentence that states the outcome removed,
because the label is derived from that outcome. Rows with neither an image file nor text are dropped.
The splits are 7:2:1, grouped by patient and stratified by label. `summary.json` records every count.

Usage:
    python datasets_scripts/covid_chestxray.py --data_dir DATA --output_dir OUT [--seed 42]
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import random
import re
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path, PurePath
from typing import Iterable, Mapping, Sequence

from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

LABELS = ("mild", "severe")
SPLIT_FRACTIONS = {"train": 0.7, "validation": 0.2, "test": 0.1}
MODALITY_PATTERNS = ("image_text", "image_only", "text_only")

FRONTAL_VIEWS = frozenset({"PA", "AP", "AP Supine"})
SEVERE_IF_YES = ("intubated", "intubation_present", "went_icu", "in_icu")
MILD_IF_NO = ("intubated", "went_icu", "needed_supplemental_O2")
REQUIRED_COLUMNS = (
    "patientid",
    "view",
    "modality",
    "folder",
    "filename",
    "clinical_notes",
    "survival",
    *SEVERE_IF_YES,
    "needed_supplemental_O2",
)

# Drop reasons in the order they are tested. Each dropped row counts under the first that applies.
DROP_REASONS = ("not_xray", "lateral_view", "unknown_view", "other_view", "unlabeled", "no_modality")

# Words that reveal the outcome behind the label (intubation, ventilation, ICU, death, ECMO, discharge).
# English patterns match case-insensitively between ASCII word boundaries. The boundaries are ASCII only
# because Python's `\b` finds no word boundary between a Chinese character and a Latin letter, so
# `\bICU\b` would miss "转入ICU". ICU and ECMO are only in this list because it covers Chinese text too.
# NOTE: this is a keyword list, so paraphrases slip through, e.g. "transferred back to the ward".
ENGLISH_OUTCOME_PATTERNS = (
    r"(?:re-?)?intubat[a-z]*",
    r"(?:re-?)?extubat[a-z]*",
    r"ETT",
    r"ET[ -]tubes?",
    r"endotracheal[a-z]*",
    r"tracheal[ -](?:tubes?|cannulas?)",
    r"tracheo?stom[a-z]*",
    r"ventilat[a-z]*",
    r"C-?PAP",
    r"Bi-?PAP",
    r"ICU",
    r"ITU",
    r"intensive[^\S\n]+care",
    r"critical[^\S\n]+care",
    r"deaths?",
    r"died",
    r"dies",
    r"dying",
    r"deceased",
    r"expired",
    r"passed[^\S\n]+away",
    r"succumb[a-z]*",
    r"fatal[a-z]*",
    r"ECMO",
    r"extracorporeal",
    r"cardiac[^\S\n]+arrest",
    r"resuscitat[a-z]*",
    r"CPR",
    r"vasopressors?",
    r"discharged",
    r"discharge[^\S\n]+home",
    r"recovered",
    r"surviv(?:ed|al|or|ors)",
)
# Chinese has no spaces between words, so these patterns match anywhere in a sentence.
CHINESE_OUTCOME_PATTERNS = (
    "插管",
    "气管插管",
    "拔管",
    "呼吸机",
    "机械通气",
    "无创通气",
    "有创通气",
    "气管切开",
    "重症监护",
    "监护室",
    "死亡",
    "去世",
    "病逝",
    "身亡",
    "抢救",
    "心肺复苏",
    "体外膜肺",
    "出院",
    "治愈",
)
OUTCOME_PATTERN = re.compile(
    "|".join(
        [rf"(?<![A-Za-z0-9])(?:{pattern})(?![A-Za-z0-9])" for pattern in ENGLISH_OUTCOME_PATTERNS]
        + [re.escape(pattern) for pattern in CHINESE_OUTCOME_PATTERNS]
    ),
    re.IGNORECASE,
)

# A sentence ends at a newline, at . ! ? followed by whitespace (so "37.5" stays whole), or right after
# a Chinese 。！？；. The capture group keeps the separators so that kept sentences can be rejoined as written.
# NOTE: the collection often has "?" in place of quotes and apostrophes ("a ?wet market? (a market ..."),
# which splits a sentence early. A fragment without an outcome word is then kept.
SENTENCE_SEPARATOR = re.compile(r"(\n+|(?<=[.!?])[^\S\n]+|(?<=[。！？；])[^\S\n]*)")


@dataclass(frozen=True)
class Example:
    """One output row. `group` is the split unit (see group_patients_by_shared_images) and stays out of the JSONL."""

    id: str
    label: str
    image: str | None
    text: str | None
    patient_id: str
    group: str

    def to_json(self) -> str:
        record = asdict(self)
        del record["group"]
        return json.dumps(record, ensure_ascii=False)

    @property
    def modality_pattern(self) -> str:
        if self.image is not None and self.text is not None:
            return "image_text"
        return "image_only" if self.image is not None else "text_only"


def read_metadata(csv_path: Path) -> list[dict[str, str]]:
    """Read `metadata.csv` as a list of string dicts. Raise ValueError when a required column is missing."""
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        missing = [column for column in REQUIRED_COLUMNS if column not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(
                f"{csv_path} is missing the required columns {missing}. "
                "Expected the metadata.csv of the COVID-19 image data collection."
            )
        return [{key: (value or "") for key, value in row.items()} for row in reader]


def view_drop_reason(row: Mapping[str, str]) -> str | None:
    """Return why a row is not a frontal chest X-ray, or None when it is one."""
    if row["modality"].strip() != "X-ray":
        return "not_xray"
    view = row["view"].strip()
    if view in FRONTAL_VIEWS:
        return None
    if view == "L":
        return "lateral_view"
    if view in ("", "?"):
        return "unknown_view"
    return "other_view"


def label_row(row: Mapping[str, str]) -> str | None:
    """Return the severity label derived from the outcome fields, or None when no rule applies.

    Severe: intubated, intubation_present, went_icu or in_icu is "Y", or survival is "N".
    Mild otherwise, when intubated, went_icu or needed_supplemental_O2 is "N", or survival is "Y".
    Other values ("", "?", "Not visible", "Would have been stated") count as unknown.
    """

    def field_is(name: str, value: str) -> bool:
        return row[name].strip().upper() == value

    if any(field_is(name, "Y") for name in SEVERE_IF_YES) or field_is("survival", "N"):
        return "severe"
    if any(field_is(name, "N") for name in MILD_IF_NO) or field_is("survival", "Y"):
        return "mild"
    return None


def remove_outcome_sentences(text: str) -> tuple[str, int]:
    """Remove every sentence that matches OUTCOME_PATTERN and return the rest with the number removed.

    The rest keeps the original separators between kept sentences and is stripped, so it may be "".
    A removed sentence takes the separator after it along.
    """
    pieces = SENTENCE_SEPARATOR.split(text)
    kept: list[str] = []
    removed = 0
    # `pieces` alternates sentence, separator, sentence, ... and ends with a sentence.
    for index in range(0, len(pieces), 2):
        sentence = pieces[index]
        separator = pieces[index + 1] if index + 1 < len(pieces) else ""
        if OUTCOME_PATTERN.search(sentence):
            removed += 1
            continue
        kept.append(sentence + separator)
    return "".join(kept).strip(), removed


def scrub_outcome(text: str) -> str:
    """Return `text` without the sentences that reveal the outcome (see OUTCOME_PATTERN)."""
    return remove_outcome_sentences(text)[0]


def resolve_image(data_dir: Path, output_dir: Path, folder: str, filename: str) -> str | None:
    """Return the image path relative to `output_dir` in POSIX form, or None when the file is absent."""
    if not filename.strip():
        return None
    image_path = data_dir / folder.strip() / filename.strip()
    if not image_path.is_file():
        return None
    relative = os.path.relpath(os.path.abspath(image_path), os.path.abspath(output_dir))
    return PurePath(relative).as_posix()


def make_unique_id(patient_id: str, filename: str, used: set[str]) -> str:
    """Build `<patientid>-<filename stem>` and append `-2`, `-3`, ... until it is not in `used`."""
    base = f"{patient_id}-{PurePath(filename.strip()).stem}"
    candidate = base
    suffix = 2
    while candidate in used:
        candidate = f"{base}-{suffix}"
        suffix += 1
    used.add(candidate)
    return candidate


def group_patients_by_shared_images(patient_ids: Sequence[str], image_keys: Sequence[str]) -> list[str]:
    """Return a split group per row: patients that share an image file end up in one group.

    The collection lists some images under two patient ids (for example patients 285 and 339 in the
    June 2020 snapshot), so grouping by patient id alone would put one picture in two splits.
    """
    parent: dict[str, str] = {}

    def find(node: str) -> str:
        parent.setdefault(node, node)
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    first_patient_of_image: dict[str, str] = {}
    for patient_id, image_key in zip(patient_ids, image_keys):
        find(patient_id)
        other = first_patient_of_image.setdefault(image_key, patient_id)
        root_a, root_b = find(patient_id), find(other)
        if root_a != root_b:
            parent[max(root_a, root_b)] = min(root_a, root_b)
    return [find(patient_id) for patient_id in patient_ids]


def split_by_patient(
    labels: Sequence[str],
    groups: Sequence[str],
    seed: int,
    fractions: Mapping[str, float] = SPLIT_FRACTIONS,
) -> list[str]:
    """Assign each row a split name so that no group spans two splits and labels stay stratified.

    Greedy grouped split: groups are shuffled with `seed`, then sorted by size (largest first, the
    shuffle breaks ties). Each group goes to the split where adding its label counts lowers the
    squared distance between the split's label counts and their targets (fraction x label total)
    the most. Because whole groups move together the result is close to, not exactly, 7:2:1.
    """
    if len(labels) != len(groups):
        raise ValueError(f"labels and groups differ in length: {len(labels)} != {len(groups)}")

    label_counts_per_group: dict[str, Counter[str]] = defaultdict(Counter)
    for label, group in zip(labels, groups):
        label_counts_per_group[group][label] += 1
    label_totals = Counter(labels)
    targets = {
        split: {label: fraction * total for label, total in label_totals.items()}
        for split, fraction in fractions.items()
    }

    ordered_groups = sorted(label_counts_per_group)
    random.Random(seed).shuffle(ordered_groups)
    ordered_groups.sort(key=lambda group: -sum(label_counts_per_group[group].values()))

    assigned: dict[str, Counter[str]] = {split: Counter() for split in fractions}
    split_of_group: dict[str, str] = {}
    for group in ordered_groups:
        group_counts = label_counts_per_group[group]

        def cost_increase(split: str) -> float:
            return sum(
                count * (2 * (assigned[split][label] - targets[split][label]) + count)
                for label, count in group_counts.items()
            )

        best_split = min(fractions, key=cost_increase)
        assigned[best_split].update(group_counts)
        split_of_group[group] = best_split
    return [split_of_group[group] for group in groups]


def build_examples(
    rows: Iterable[Mapping[str, str]], data_dir: Path, output_dir: Path
) -> tuple[list[Example], Counter[str], Counter[str]]:
    """Filter, label and scrub the rows, then return the examples, the drop counts and the scrub counts.

    Drop counts are keyed by DROP_REASONS. The other counter contains `images_missing` (kept rows whose
    image is null), `sentences_removed` and `texts_emptied` (notes whose every sentence was removed).
    """
    dropped: Counter[str] = Counter({reason: 0 for reason in DROP_REASONS})
    counts: Counter[str] = Counter({"images_missing": 0, "sentences_removed": 0, "texts_emptied": 0})
    used_ids: set[str] = set()
    kept_rows: list[tuple[Mapping[str, str], str, str | None, str | None]] = []

    for row in tqdm(rows, desc="Converting rows", unit="row"):
        reason = view_drop_reason(row)
        label = label_row(row) if reason is None else None
        if reason is None and label is None:
            reason = "unlabeled"
        if reason is not None:
            dropped[reason] += 1
            continue

        notes = row["clinical_notes"].strip()
        text, removed = remove_outcome_sentences(notes) if notes else ("", 0)
        counts["sentences_removed"] += removed
        counts["texts_emptied"] += int(bool(notes) and not text)
        image = resolve_image(data_dir, output_dir, row["folder"], row["filename"])
        if image is None and not text:
            dropped["no_modality"] += 1
            continue
        counts["images_missing"] += int(image is None)
        kept_rows.append((row, label, image, text or None))

    patient_ids = [row["patientid"].strip() for row, *_ in kept_rows]
    image_keys = [f"{row['folder'].strip()}/{row['filename'].strip()}" for row, *_ in kept_rows]
    groups = group_patients_by_shared_images(patient_ids, image_keys)
    examples = [
        Example(
            id=make_unique_id(patient_id, row["filename"], used_ids),
            label=label,
            image=image,
            text=text,
            patient_id=patient_id,
            group=group,
        )
        for (row, label, image, text), patient_id, group in zip(kept_rows, patient_ids, groups)
    ]
    return examples, dropped, counts


def count_by_split(examples: Sequence[Example], splits: Sequence[str]) -> dict[str, dict[str, dict[str, int]]]:
    """Count examples per split x label x modality pattern, with zeros for absent cells."""
    table = {
        split: {label: {pattern: 0 for pattern in MODALITY_PATTERNS} for label in LABELS}
        for split in SPLIT_FRACTIONS
    }
    for example, split in zip(examples, splits):
        table[split][example.label][example.modality_pattern] += 1
    return table


def write_jsonl(path: Path, examples: Iterable[Example]) -> int:
    """Write one JSON object per line and return the number of lines."""
    lines = 0
    with open(path, "w", encoding="utf-8") as handle:
        for example in examples:
            handle.write(example.to_json() + "\n")
            lines += 1
    return lines


def format_split_table(splits: Mapping[str, Mapping[str, Mapping[str, int]]]) -> list[str]:
    """Render the split x label x modality pattern counts as fixed-width lines with a total row."""
    header = f"{'split':<11} {'label':<7} {'image+text':>10} {'image only':>10} {'text only':>10} {'total':>6}"
    rule = "-" * len(header)
    lines = [header, rule]

    column_totals: Counter[str] = Counter()
    for split, per_label in splits.items():
        for label, per_pattern in per_label.items():
            row_total = sum(per_pattern.values())
            column_totals.update(per_pattern)
            column_totals["total"] += row_total
            lines.append(
                f"{split:<11} {label:<7} {per_pattern['image_text']:>10} {per_pattern['image_only']:>10} "
                f"{per_pattern['text_only']:>10} {row_total:>6}"
            )

    lines.append(rule)
    lines.append(
        f"{'all':<11} {'':<7} {column_totals['image_text']:>10} {column_totals['image_only']:>10} "
        f"{column_totals['text_only']:>10} {column_totals['total']:>6}"
    )
    return lines


def format_summary(summary: Mapping) -> str:
    """Render the summary returned by `convert` as plain text: the split table, then the drop counts."""
    lines = format_split_table(summary["splits"])

    lines.extend(["", "dropped rows by reason:"])
    for reason, count in summary["dropped"].items():
        lines.append(f"  {reason:<13} {count:>5}")

    dropped_total = sum(summary["dropped"].values())
    lines.append("")
    lines.append(f"input rows {summary['input_rows']} = kept {summary['kept_rows']} + dropped {dropped_total}")
    lines.append(
        f"kept rows with a missing image file: {summary['images_missing']}, "
        f"outcome sentences removed: {summary['sentences_removed']}, "
        f"notes emptied by the scrub: {summary['texts_emptied']}"
    )
    return "\n".join(lines)


def convert(data_dir: str | Path, output_dir: str | Path, seed: int = 42) -> dict:
    """Write the three JSONL splits and `summary.json` to `output_dir` and return the summary."""
    data_dir = Path(data_dir)
    output_dir = Path(output_dir)
    csv_path = data_dir / "metadata.csv"
    if not csv_path.is_file():
        raise FileNotFoundError(f"{csv_path} not found: --data_dir must contain the collection's metadata.csv")
    output_dir.mkdir(parents=True, exist_ok=True)

    rows = read_metadata(csv_path)
    logger.info("Read %d rows from %s", len(rows), csv_path)
    examples, dropped, counts = build_examples(rows, data_dir, output_dir)
    logger.info("Kept %d rows, dropped %s", len(examples), dict(dropped))
    logger.info(
        "Kept %d rows with a missing image file, removed %d outcome sentences, emptied %d notes",
        counts["images_missing"],
        counts["sentences_removed"],
        counts["texts_emptied"],
    )

    splits = split_by_patient([example.label for example in examples], [example.group for example in examples], seed)
    for split in SPLIT_FRACTIONS:
        in_split = [example for example, name in zip(examples, splits) if name == split]
        lines = write_jsonl(output_dir / f"{split}.jsonl", in_split)
        logger.info("Wrote %d rows (%d patients) to %s", lines, len({e.patient_id for e in in_split}), split)

    summary = {
        "seed": seed,
        "input_rows": len(rows),
        "kept_rows": len(examples),
        "dropped": dict(dropped),
        **dict(counts),
        "splits": count_by_split(examples, splits),
    }
    with open(output_dir / "summary.json", "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=2)
    return summary


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", type=Path, required=True, help="folder with metadata.csv and the image folders")
    parser.add_argument("--output_dir", type=Path, required=True, help="folder for the JSONL splits and summary.json")
    parser.add_argument("--seed", type=int, default=42, help="seed of the grouped split (default: 42)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    summary = convert(args.data_dir, args.output_dir, args.seed)
    print(format_summary(summary))


if __name__ == "__main__":
    main()
