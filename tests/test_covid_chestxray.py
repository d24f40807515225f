"""Tests for the COVID-19 image data collection converter, on a handmade collection and the real one."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from datasets_scripts.covid_chestxray import (
    OUTCOME_PATTERN,
    SPLIT_FRACTIONS,
    convert,
    format_summary,
    group_patients_by_shared_images,
    label_row,
    main,
    remove_outcome_sentences,
    scrub_outcome,
    split_by_patient,
    view_drop_reason,
)

COLUMNS = (
    "patientid",
    "offset",
    "sex",
    "age",
    "finding",
    "survival",
    "intubated",
    "intubation_present",
    "went_icu",
    "in_icu",
    "needed_supplemental_O2",
    "extubated",
    "view",
    "modality",
    "folder",
    "filename",
    "clinical_notes",
    "other_notes",
)
OUTCOME_FIELDS = ("survival", "intubated", "intubation_present", "went_icu", "in_icu", "needed_supplemental_O2")


def make_row(patientid: str, filename: str, **fields: str) -> dict[str, str]:
    """Return a frontal X-ray row with no outcome field set and a neutral note. `fields` overrides columns."""
    row = {column: "" for column in COLUMNS}
    row.update(
        patientid=patientid,
        filename=filename,
        view="PA",
        modality="X-ray",
        folder="images",
        finding="COVID-19",
        clinical_notes="Fever and cough for five days.",
    )
    row.update(fields)
    return row


def write_collection(data_dir: Path, rows: list[dict[str, str]], absent: set[str] = frozenset()) -> Path:
    """Write metadata.csv and a 4x4 PNG for every row whose filename is not in `absent`."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / "metadata.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    for row in rows:
        if row["filename"] in absent:
            continue
        image_path = data_dir / row["folder"] / row["filename"]
        image_path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (4, 4), color=len(row["filename"]) % 256).save(image_path, format="PNG")
    return data_dir


def read_splits(output_dir: Path) -> dict[str, list[dict]]:
    return {
        split: [json.loads(line) for line in (output_dir / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]
        for split in SPLIT_FRACTIONS
    }


def all_records(output_dir: Path) -> list[dict]:
    return [record for records in read_splits(output_dir).values() for record in records]


def patients_per_split(output_dir: Path) -> dict[str, set[str]]:
    return {split: {record["patient_id"] for record in records} for split, records in read_splits(output_dir).items()}


# One row per rule, plus rows for every way a row can be dropped.
HANDMADE_ROWS = [
    make_row("1", "severe-intubated.png", intubated="Y"),
    make_row("2", "severe-intubation-present.png", intubation_present="Y"),
    make_row("3", "severe-went-icu.png", went_icu="Y"),
    make_row("4", "severe-in-icu.png", in_icu="Y"),
    make_row("5", "severe-died.png", survival="N"),
    make_row("6", "mild-not-intubated.png", intubated="N"),
    make_row("7", "mild-no-icu.png", went_icu="N"),
    make_row("8", "mild-no-oxygen.png", needed_supplemental_O2="N"),
    make_row("9", "mild-survived.png", survival="Y"),
    make_row("10", "unlabeled.png", survival="?", intubated="Not visible"),
    make_row("11", "missing-image.png", survival="Y"),
    make_row("12", "lateral.png", survival="Y", view="L"),
    make_row("13", "ct.png", survival="Y", modality="CT", view="Axial"),
    make_row("14", "no-modality.png", survival="Y", clinical_notes=""),
    make_row("15", "no-modality-after-scrub.png", survival="N", clinical_notes="He was intubated. He died."),
    make_row("16", "no-view.png", survival="Y", view=""),
    make_row(
        "17",
        "scrubbed.png",
        went_icu="Y",
        clinical_notes="Fever for 3 days. He was admitted to the ICU.\n患者咳嗽。转入ICU治疗。行气管插管。",
    ),
    make_row("18", "no-text.png", survival="Y", clinical_notes=""),
    make_row("18", "no-text-day2.png", survival="Y", clinical_notes="   "),
]
ABSENT_FILES = {"missing-image.png", "no-modality.png", "no-modality-after-scrub.png"}


@pytest.fixture(scope="module")
def handmade_output(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """Convert HANDMADE_ROWS into a folder two levels below a sibling of the data folder.

    Returns the output folder and the summary.
    """
    root = tmp_path_factory.mktemp("collection")
    data_dir = write_collection(root / "data", HANDMADE_ROWS, ABSENT_FILES)
    output_dir = root / "converted" / "nested"
    return output_dir, convert(data_dir, output_dir, seed=42)


def records_by_patient(output_dir: Path) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for record in all_records(output_dir):
        grouped.setdefault(record["patient_id"], []).append(record)
    return grouped


@pytest.mark.parametrize("field", ["intubated", "intubation_present", "went_icu", "in_icu"])
def test_label_severe_when_field_yes(field: str) -> None:
    assert label_row(make_row("1", "a.png", **{field: "Y"})) == "severe"


def test_label_severe_when_not_survived() -> None:
    assert label_row(make_row("1", "a.png", survival="N")) == "severe"


@pytest.mark.parametrize("field", ["intubated", "went_icu", "needed_supplemental_O2"])
def test_label_mild_when_field_no(field: str) -> None:
    assert label_row(make_row("1", "a.png", **{field: "N"})) == "mild"


def test_label_mild_when_survived() -> None:
    assert label_row(make_row("1", "a.png", survival="Y")) == "mild"


def test_label_severe_beats_mild() -> None:
    assert label_row(make_row("1", "a.png", survival="Y", intubated="N", went_icu="Y")) == "severe"


@pytest.mark.parametrize("value", ["", "?", "Not visible", "Would have been stated"])
def test_label_none_when_unknown(value: str) -> None:
    row = make_row("1", "a.png", **{field: value for field in OUTCOME_FIELDS})
    assert label_row(row) is None


@pytest.mark.parametrize(
    ("modality", "view", "reason"),
    [
        ("X-ray", "PA", None),
        ("X-ray", " AP ", None),
        ("X-ray", "AP Supine", None),
        ("X-ray", "L", "lateral_view"),
        ("X-ray", "", "unknown_view"),
        ("X-ray", "?", "unknown_view"),
        ("X-ray", "Oblique", "other_view"),
        ("CT", "Axial", "not_xray"),
        ("CT", "Coronal", "not_xray"),
    ],
)
def test_view_drop_reason_cases(modality: str, view: str, reason: str | None) -> None:
    assert view_drop_reason(make_row("1", "a.png", modality=modality, view=view)) == reason


@pytest.mark.parametrize(
    "sentence",
    [
        "He was intubated on day 3.",
        "Extubation followed on day 9.",
        "An ET tube is in place.",
        "The endotracheal tube tip is 4 cm above the carina.",
        "Mechanical ventilation was started.",
        "She was put on a ventilator.",
        "He was admitted to the ICU.",
        "Transferred to intensive care.",
        "The patient died two days later.",
        "The patient passed away.",
        "He was deceased on arrival.",
        "The patient expired.",
        "ECMO was required.",
        "She was discharged on day 12.",
    ],
)
def test_scrub_removes_english_outcome(sentence: str) -> None:
    scrubbed = scrub_outcome(f"Fever for 3 days. {sentence} Bilateral opacities.")
    assert scrubbed == "Fever for 3 days. Bilateral opacities."


@pytest.mark.parametrize(
    "sentence",
    [
        "予以气管插管。",
        "使用呼吸机辅助通气。",
        "行机械通气。",
        "转入ICU治疗。",
        "转入重症监护室。",
        "患者死亡。",
        "患者去世。",
        "行ECMO治疗。",
        "第5天拔管。",
    ],
)
def test_scrub_removes_chinese_outcome(sentence: str) -> None:
    assert scrub_outcome(f"患者发热三天。{sentence}双肺磨玻璃影。") == "患者发热三天。双肺磨玻璃影。"


def test_scrub_keeps_neutral_text() -> None:
    text = "Temperature 38.5 C on admission. Etta reported dyspnea!\nCXR: bilateral opacities? 双肺磨玻璃影；咳嗽。"
    assert scrub_outcome(text) == text


def test_scrub_is_case_insensitive() -> None:
    assert scrub_outcome("INTUBATED ON ARRIVAL. Stable.") == "Stable."


def test_scrub_splits_on_newline() -> None:
    assert scrub_outcome("Cough\nicu admission\nFever") == "Cough\nFever"


def test_scrub_counts_removed_sentences() -> None:
    assert remove_outcome_sentences("He was intubated. Cough. He died.\n转入ICU。") == ("Cough.", 3)


def test_scrub_returns_empty_when_all_removed() -> None:
    assert scrub_outcome("He was intubated. He died.") == ""


def test_shared_images_merge_patients() -> None:
    groups = group_patients_by_shared_images(["a", "b", "c", "b"], ["x.png", "x.png", "y.png", "z.png"])
    assert groups[0] == groups[1] == groups[3]
    assert groups[2] != groups[0]


def test_split_close_to_ratio() -> None:
    labels = ["mild", "severe"] * 100
    splits = split_by_patient(labels, [str(index) for index in range(200)], seed=0)
    assert [splits.count(name) for name in SPLIT_FRACTIONS] == [140, 40, 20]


@settings(max_examples=50, deadline=None)
@given(
    rows=st.lists(st.tuples(st.sampled_from(["mild", "severe"]), st.integers(0, 30)), min_size=1, max_size=80),
    seed=st.integers(0, 2**32 - 1),
)
def test_split_never_shares_group(rows: list[tuple[str, int]], seed: int) -> None:
    labels = [label for label, _ in rows]
    groups = [str(group) for _, group in rows]
    splits = split_by_patient(labels, groups, seed)
    split_of_group: dict[str, set[str]] = {}
    for group, split in zip(groups, splits):
        split_of_group.setdefault(group, set()).add(split)
    assert all(len(names) == 1 for names in split_of_group.values())
    assert set(splits) <= set(SPLIT_FRACTIONS)


def test_convert_labels_each_rule(handmade_output: tuple[Path, dict]) -> None:
    output_dir, _ = handmade_output
    labels = {record["patient_id"]: record["label"] for record in all_records(output_dir)}
    assert {patient: labels[patient] for patient in ["1", "2", "3", "4", "5", "17"]} == dict.fromkeys(
        ["1", "2", "3", "4", "5", "17"], "severe"
    )
    assert {patient: labels[patient] for patient in ["6", "7", "8", "9", "11", "18"]} == dict.fromkeys(
        ["6", "7", "8", "9", "11", "18"], "mild"
    )


def test_convert_drops_by_reason(handmade_output: tuple[Path, dict]) -> None:
    output_dir, summary = handmade_output
    assert summary["dropped"] == {
        "not_xray": 1,
        "lateral_view": 1,
        "unknown_view": 1,
        "other_view": 0,
        "unlabeled": 1,
        "no_modality": 2,
    }
    assert not {"10", "12", "13", "14", "15", "16"} & set(records_by_patient(output_dir))


def test_convert_counts_add_up(handmade_output: tuple[Path, dict]) -> None:
    output_dir, summary = handmade_output
    table_total = sum(
        count
        for per_label in summary["splits"].values()
        for per_pattern in per_label.values()
        for count in per_pattern.values()
    )
    assert summary["kept_rows"] + sum(summary["dropped"].values()) == len(HANDMADE_ROWS)
    assert table_total == summary["kept_rows"]
    assert len(all_records(output_dir)) == summary["kept_rows"]


def test_convert_writes_summary_json(handmade_output: tuple[Path, dict]) -> None:
    output_dir, summary = handmade_output
    assert json.loads((output_dir / "summary.json").read_text(encoding="utf-8")) == summary


def test_convert_keeps_missing_image(handmade_output: tuple[Path, dict]) -> None:
    output_dir, summary = handmade_output
    (record,) = records_by_patient(output_dir)["11"]
    assert record["image"] is None
    assert record["text"] == "Fever and cough for five days."
    assert summary["images_missing"] == 1


def test_convert_nulls_empty_text(handmade_output: tuple[Path, dict]) -> None:
    output_dir, _ = handmade_output
    records = records_by_patient(output_dir)["18"]
    assert [record["text"] for record in records] == [None, None]
    assert all(record["image"] is not None for record in records)


def test_convert_scrubs_text(handmade_output: tuple[Path, dict]) -> None:
    output_dir, summary = handmade_output
    (record,) = records_by_patient(output_dir)["17"]
    # A removed sentence takes its separator with it, so the newline before 患者 goes too.
    assert record["text"] == "Fever for 3 days. 患者咳嗽。"
    assert summary["sentences_removed"] == 3 + 2


def test_convert_image_paths_resolve(handmade_output: tuple[Path, dict]) -> None:
    output_dir, _ = handmade_output
    data_dir = output_dir.parent.parent / "data"
    expected = {f"{row['patientid']}-{Path(row['filename']).stem}": row["filename"] for row in HANDMADE_ROWS}
    records = [record for record in all_records(output_dir) if record["image"] is not None]
    assert len(records) == 12
    for record in records:
        assert "\\" not in record["image"]
        assert (output_dir / record["image"]).resolve() == (data_dir / "images" / expected[record["id"]]).resolve()


def test_convert_ids_unique(handmade_output: tuple[Path, dict]) -> None:
    output_dir, _ = handmade_output
    ids = [record["id"] for record in all_records(output_dir)]
    assert len(ids) == len(set(ids))


def test_convert_disambiguates_same_stem(tmp_path: Path) -> None:
    rows = [make_row("7", "scan.png", survival="Y"), make_row("7", "scan.jpeg", survival="Y")]
    output_dir = tmp_path / "out"
    convert(write_collection(tmp_path / "data", rows), output_dir)
    assert sorted(record["id"] for record in all_records(output_dir)) == ["7-scan", "7-scan-2"]


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_convert_patients_disjoint(tmp_path: Path, seed: int) -> None:
    rows = [
        make_row(str(patient), f"p{patient}-day{day}.png", survival="Y" if patient % 3 else "N")
        for patient in range(30)
        for day in range(1 + patient % 4)
    ]
    output_dir = tmp_path / "out"
    convert(write_collection(tmp_path / "data", rows), output_dir, seed=seed)
    patients = patients_per_split(output_dir)
    assert not patients["train"] & patients["validation"]
    assert not patients["train"] & patients["test"]
    assert not patients["validation"] & patients["test"]


def test_convert_seed_changes_split(tmp_path: Path) -> None:
    rows = [make_row(str(patient), f"p{patient}.png", survival="Y" if patient % 2 else "N") for patient in range(40)]
    data_dir = write_collection(tmp_path / "data", rows)
    convert(data_dir, tmp_path / "a", seed=0)
    convert(data_dir, tmp_path / "b", seed=1)
    convert(data_dir, tmp_path / "c", seed=0)
    assert read_splits(tmp_path / "a") == read_splits(tmp_path / "c")
    assert read_splits(tmp_path / "a") != read_splits(tmp_path / "b")


def test_convert_rejects_missing_metadata(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="metadata.csv"):
        convert(tmp_path, tmp_path / "out")


def test_main_prints_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data_dir = write_collection(tmp_path / "data", HANDMADE_ROWS, ABSENT_FILES)
    main(["--data_dir", str(data_dir), "--output_dir", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    summary = json.loads((tmp_path / "out" / "summary.json").read_text(encoding="utf-8"))
    assert printed.strip() == format_summary(summary)
    assert f"input rows {len(HANDMADE_ROWS)}" in printed


@pytest.mark.shared_data
def test_real_collection_converts(covid_data_dir: Path, tmp_path: Path) -> None:
    with open(covid_data_dir / "metadata.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    absent = [row for row in rows if not (covid_data_dir / row["folder"] / row["filename"]).is_file()]
    absent_images = [row for row in absent if row["folder"] == "images"]
    # Absent frontal X-rays with a label and a note that survives the scrub must come out with image null.
    expected_null_images = {
        f"{row['patientid']}-{Path(row['filename']).stem}"
        for row in absent_images
        if row["modality"] == "X-ray"
        and row["view"].strip() in {"PA", "AP", "AP Supine"}
        and label_row(row) is not None
        and scrub_outcome(row["clinical_notes"].strip())
    }

    output_dir = tmp_path / "out"
    summary = convert(covid_data_dir, output_dir, seed=42)
    records = all_records(output_dir)

    assert len(absent_images) == 14
    assert {record["id"] for record in records if record["image"] is None} == expected_null_images
    assert summary["images_missing"] == len(expected_null_images)
    assert summary["kept_rows"] + sum(summary["dropped"].values()) == len(rows)
    assert {record["label"] for record in records} == {"mild", "severe"}
    assert not [record["id"] for record in records if record["text"] and OUTCOME_PATTERN.search(record["text"])]
    assert all((output_dir / record["image"]).is_file() for record in records if record["image"] is not None)
    patients = patients_per_split(output_dir)
    assert not patients["train"] & patients["validation"]
    assert not patients["train"] & patients["test"]
    assert not patients["validation"] & patients["test"]
