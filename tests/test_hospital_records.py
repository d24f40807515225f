"""Conversion of hospital CSV exports: identifiers removed everywhere, diagnoses scrubbed, labels mapped.

Every identity below is invented for these tests.
"""

import csv
import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from datasets_scripts import redaction
from datasets_scripts.hospital_records import (
    DEFAULT_DIAGNOSIS_PATTERNS,
    ConversionError,
    ConversionOptions,
    compile_diagnosis_patterns,
    convert,
    main,
    remove_diagnostic_statements,
)
from datasets_scripts.validate import ValidationOptions, validate_files

CHINESE_HEADER = ["病例编号", "住院号", "姓名", "性别", "联系电话", "身份证号", "出生日期", "家庭住址", "病情分级",
                  "临床诊断", "影像所见", "影像文件"]  # fmt: skip
CHINESE_ROWS = [
    ["C001", "ZY2023001", "张小明", "男", "13812345678", "110105201803071234", "2018-03-07", "北京市朝阳区幸福路12号",
     "重症", "重症肺炎；呼吸衰竭。患儿张小明，联系电话13812345678", "双肺多发斑片影，右下肺实变。", "张小明_ZY2023001.png"],
    ["C002", "ZY2023002", "李梅梅", "女", "010-62345678", "11010520190812345X", "2019年8月12日", "上海市浦东新区花园路8号",
     "轻症", "轻症肺炎（社区获得性），姓名：李梅梅，住院号ZY2023002", "右肺纹理增粗。出生日期：2019年8月12日",
     "李梅梅.png"],
    ["C003", "ZY2023003", "王建国", "男", "13987654321", "440106201705051111", "2017-05-05", "广州市天河区体育西路100号",
     "重症", "社区获得性肺炎（重症）",
     "患儿王建国，男，7岁，双肺渗出。家长电话：13987654321，地址：广州市天河区体育西路100号", ""],
    ["C004", "ZY2023004", "赵丽丽", "女", "13700001111", "320102201601012222", "2016-01-01", "南京市玄武区长江路3号",
     "轻症", "支气管肺炎", "左肺下叶少许渗出，患者赵丽丽复查。", "missing.png"],
    ["C005", "ZY2023001", "张小明", "男", "13812345678", "110105201803071234", "2018-03-07", "北京市朝阳区幸福路12号",
     "重症", "重症肺炎，身份证号110105201803071234", "复查：双肺斑片影较前增多。", "张小明_复查.png"],
]  # fmt: skip
CHINESE_IDENTIFIERS = [
    "张小明", "小明", "李梅梅", "王建国", "赵丽丽", "ZY2023001", "ZY2023002", "ZY2023003", "ZY2023004",
    "13812345678", "010-62345678", "62345678", "13987654321", "13700001111",
    "110105201803071234", "11010520190812345X", "440106201705051111", "320102201601012222",
    "2018-03-07", "2019年8月12日", "2017-05-05", "2016-01-01",
    "北京市朝阳区幸福路12号", "上海市浦东新区花园路8号", "广州市天河区体育西路100号", "南京市玄武区长江路3号", "幸福路",
]  # fmt: skip

ENGLISH_HEADER = ["Record ID", "MRN", "Name", "Phone", "Address", "Date of Birth", "Severity", "Diagnosis",
                  "Findings", "Image"]  # fmt: skip
ENGLISH_ROWS = [
    ["E001", "A1234567", "John Carver", "(555) 201-3344", "42 Elm Street, Springfield", "03/07/2016", "Severe",
     "Severe pneumonia with hypoxemia. Patient: John Carver", "Bilateral opacities. Mr. Carver, DOB 03/07/2016.",
     "carver_john.png"],
    ["E002", "A7654321", "Emily Hartwell", "555-867-5309", "17 Birch Lane, Riverton", "11/23/2017", "Mild",
     "Mild community-acquired pneumonia; MRN: A7654321", "Right lower lobe infiltrate. Call Emily at 555-867-5309.",
     "hartwell.png"],
    ["E003", "A5550001", "Oliver Quist", "(555) 310-0099", "8 Cedar Road, Lakeside", "01/15/2018", "Severe",
     "Pneumonia, severe, with pleural effusion", "Large left effusion. Contact oliver.quist@example.com.", ""],
    ["E004", "A5550002", "Maya Lindqvist", "555-222-0147", "230 Oak Avenue, Hillview", "June 2, 2015", "Mild",
     "Bronchopneumonia", "Patchy opacity, born on June 2, 2015, seen by Dr. Ruth Abernathy.", "maya.png"],
]  # fmt: skip
ENGLISH_IDENTIFIERS = [
    "John Carver", "Carver", "Emily Hartwell", "Hartwell", "Emily", "Oliver Quist", "Quist", "Maya Lindqvist",
    "Lindqvist", "Ruth Abernathy", "Abernathy", "A1234567", "A7654321", "A5550001", "A5550002",
    "(555) 201-3344", "5552013344", "201-3344", "555-867-5309", "867-5309", "(555) 310-0099", "555-222-0147",
    "42 Elm Street", "Springfield", "17 Birch Lane", "Riverton", "8 Cedar Road", "Lakeside", "230 Oak Avenue",
    "Hillview", "03/07/2016", "11/23/2017", "01/15/2018", "June 2, 2015", "oliver.quist@example.com",
]  # fmt: skip


def write_csv(path: Path, header: list[str], rows: list[list[str]], encoding: str = "utf-8-sig") -> Path:
    with open(path, "w", newline="", encoding=encoding) as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_images(folder: Path, rows: list[list[str]], image_index: int) -> None:
    for number, row in enumerate(rows):
        name = row[image_index]
        if name and name != "missing.png":
            pixels = np.full((16, 16), 40 * number % 256, dtype=np.uint8)
            PIL.Image.fromarray(pixels).save(folder / name)


def chinese_options(tmp_path: Path, rows: list[list[str]] = CHINESE_ROWS, **overrides) -> ConversionOptions:
    source = tmp_path / "export"
    source.mkdir(parents=True, exist_ok=True)
    write_images(source, rows, CHINESE_HEADER.index("影像文件"))
    settings = {
        "csv_path": write_csv(source / "export.csv", CHINESE_HEADER, rows),
        "output_dir": tmp_path / "out",
        "label_column": "病情分级",
        "label_map": {"重症": "severe", "轻症": "mild"},
        "diagnosis_column": "临床诊断",
        "findings_column": "影像所见",
        "image_column": "影像文件",
        "id_column": "病例编号",
        "patient_column": "住院号",
        **overrides,
    }
    return ConversionOptions(**settings)


def english_options(tmp_path: Path, rows: list[list[str]] = ENGLISH_ROWS, **overrides) -> ConversionOptions:
    source = tmp_path / "export"
    source.mkdir(parents=True, exist_ok=True)
    write_images(source, rows, ENGLISH_HEADER.index("Image"))
    settings = {
        "csv_path": write_csv(source / "export.csv", ENGLISH_HEADER, rows),
        "output_dir": tmp_path / "out",
        "label_column": "Severity",
        "label_map": {"Severe": "severe", "Mild": "mild"},
        "diagnosis_column": "Diagnosis",
        "findings_column": "Findings",
        "image_column": "Image",
        "id_column": "Record ID",
        **overrides,
    }
    return ConversionOptions(**settings)


def read_records(output_dir: Path) -> list[dict]:
    return [
        json.loads(text)
        for split in ("train", "validation", "test")
        for text in (output_dir / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
    ]


def surviving_identifiers(output_dir: Path, identifiers: list[str]) -> list[tuple[str, str]]:
    """Return (file, identifier) for every identifier found in a file's content or path under output_dir."""
    found = []
    for path in sorted(output_dir.rglob("*")):
        relative = str(path.relative_to(output_dir))
        content = path.read_bytes() if path.is_file() else b""
        for identifier in identifiers:
            if identifier.encode("utf-8") in content or identifier in relative:
                found.append((relative, identifier))
    return found


@pytest.fixture
def chinese_output(tmp_path):
    options = chinese_options(tmp_path / "zh")
    return options.output_dir, convert(options)


@pytest.fixture
def english_output(tmp_path):
    options = english_options(tmp_path / "en")
    return options.output_dir, convert(options)


def test_chinese_identifiers_removed_everywhere(chinese_output):
    output_dir, _ = chinese_output

    assert surviving_identifiers(output_dir, CHINESE_IDENTIFIERS) == []


def test_english_identifiers_removed_everywhere(english_output):
    output_dir, _ = english_output

    assert surviving_identifiers(output_dir, ENGLISH_IDENTIFIERS) == []


def test_chinese_diagnostic_statements_removed(chinese_output):
    output_dir, _ = chinese_output
    texts = {record["id"]: record["text"] for record in read_records(output_dir)}

    for text in texts.values():
        for statement in ("重症", "轻症"):
            assert statement not in text
    assert texts["C001"].startswith("呼吸衰竭")
    assert "社区获得性" in texts["C002"]
    assert texts["C003"].startswith("社区获得性肺炎\n")


def test_english_diagnostic_statements_removed(english_output):
    output_dir, _ = english_output
    texts = {record["id"]: record["text"] for record in read_records(output_dir)}

    for text in texts.values():
        assert "severe" not in text.lower()
        assert "mild" not in text.lower()
    assert texts["E001"].startswith("with hypoxemia")
    assert texts["E003"].startswith("Pneumonia, with pleural effusion")


def test_clinical_content_kept(chinese_output, english_output):
    chinese = {record["id"]: record["text"] for record in read_records(chinese_output[0])}
    english = {record["id"]: record["text"] for record in read_records(english_output[0])}

    assert "双肺多发斑片影，右下肺实变。" in chinese["C001"]
    assert "患儿[NAME]，男，7岁，双肺渗出" in chinese["C003"]
    assert "Right lower lobe infiltrate" in english["E002"]


def test_placeholders_name_identifier_types(chinese_output):
    output_dir, _ = chinese_output
    texts = {record["id"]: record["text"] for record in read_records(output_dir)}

    assert "联系电话[PHONE]" in texts["C001"]
    assert "姓名：[NAME]" in texts["C002"]
    assert "出生日期：[DOB]" in texts["C002"]
    assert "身份证号[ID_NUMBER]" in texts["C005"]
    assert "地址：[ADDRESS]" in texts["C003"]


def test_labels_mapped(chinese_output, english_output):
    chinese = {record["id"]: record["label"] for record in read_records(chinese_output[0])}
    english = {record["id"]: record["label"] for record in read_records(english_output[0])}

    assert chinese == {"C001": "severe", "C002": "mild", "C003": "severe", "C004": "mild", "C005": "severe"}
    assert english == {"E001": "severe", "E002": "mild", "E003": "severe", "E004": "mild"}


def test_images_copied_under_record_ids(chinese_output):
    output_dir, report = chinese_output
    images = {record["id"]: record["image"] for record in read_records(output_dir)}

    assert images == {"C001": "images/C001.png", "C002": "images/C002.png", "C003": None, "C004": None,
                      "C005": "images/C005.png"}  # fmt: skip
    assert report["images_missing"] == 1


def test_patient_rows_share_split(chinese_output):
    output_dir, _ = chinese_output
    split_of = {}
    for split in ("train", "validation", "test"):
        for text in (output_dir / f"{split}.jsonl").read_text(encoding="utf-8").splitlines():
            split_of[json.loads(text)["id"]] = split

    assert split_of["C001"] == split_of["C005"]


def test_patient_ids_are_pseudonyms(chinese_output):
    output_dir, _ = chinese_output
    patients = {record["id"]: record["patient_id"] for record in read_records(output_dir)}

    assert patients["C001"] == patients["C005"] == "patient-00001"
    assert patients["C002"] == "patient-00002"


def test_report_counts_without_values(chinese_output):
    output_dir, report = chinese_output
    saved = json.loads((output_dir / "redaction_report.json").read_text(encoding="utf-8"))

    assert saved == report
    assert report["dropped_columns"] == {"住院号": 5, "姓名": 5, "联系电话": 5, "身份证号": 5, "出生日期": 5,
                                         "家庭住址": 5}  # fmt: skip
    assert report["redactions"]["NAME"] >= 4
    assert report["redactions"]["PHONE"] >= 2
    assert report["redactions"]["ID_NUMBER"] == 1
    assert report["diagnostic_statements_removed"] == {"重症": 1, "重症肺炎": 2, "轻症肺炎": 1}
    assert report["input_rows"] == report["kept_rows"] == 5


def test_output_passes_validator(chinese_output, english_output):
    for output_dir, _ in (chinese_output, english_output):
        files = [output_dir / f"{split}.jsonl" for split in ("train", "validation", "test")]
        report = validate_files(files, ValidationOptions(labels=("mild", "severe")))

        assert report.bad == [], [str(finding) for finding in report.findings]


def test_split_is_seeded(tmp_path):
    first = convert(chinese_options(tmp_path / "a"))
    second = convert(chinese_options(tmp_path / "b"))

    assert first["splits"] == second["splits"]
    for split in ("train", "validation", "test"):
        assert (tmp_path / "a" / "out" / f"{split}.jsonl").read_text() == (
            tmp_path / "b" / "out" / f"{split}.jsonl"
        ).read_text()


UNKNOWN_LABEL_ROW = ["C006", "ZY2023006", "孙悦", "女", "13600002222", "110101201501011111", "2015-01-01",
                     "北京市东城区东单路1号", "中度", "肺炎", "双肺纹理增多。", ""]  # fmt: skip


def test_unknown_label_reported_by_row(tmp_path):
    options = chinese_options(tmp_path, rows=CHINESE_ROWS + [UNKNOWN_LABEL_ROW])

    with pytest.raises(ConversionError) as raised:
        convert(options)
    assert "line 7: unknown label value '中度'" in str(raised.value)
    assert "--skip_bad_rows" in str(raised.value)


def test_unknown_label_skipped_and_listed(tmp_path):
    options = chinese_options(tmp_path, rows=CHINESE_ROWS + [UNKNOWN_LABEL_ROW], skip_bad_rows=True)
    report = convert(options)

    assert report["problems"] == [{"line": 7, "reason": "unknown_label"}]
    assert report["dropped_rows"]["bad_row"] == 1
    assert "C006" not in {record["id"] for record in read_records(options.output_dir)}
    assert surviving_identifiers(options.output_dir, ["孙悦", "13600002222", "110101201501011111"]) == []


def test_duplicate_id_reported_by_row(tmp_path):
    rows = CHINESE_ROWS + [["C001", *CHINESE_ROWS[1][1:]]]

    with pytest.raises(ConversionError, match="line 7: duplicate id 'C001', first on line 2"):
        convert(chinese_options(tmp_path, rows=rows))


def test_identifier_id_column_rejected(tmp_path):
    with pytest.raises(ConversionError, match="'住院号' is an identifier column"):
        convert(chinese_options(tmp_path, id_column="住院号"))


def test_missing_column_named(tmp_path):
    with pytest.raises(ConversionError, match="--findings_column '检查所见'"):
        convert(chinese_options(tmp_path, findings_column="检查所见"))


def test_gb18030_export_read(tmp_path):
    options = chinese_options(tmp_path, encoding="gb18030")
    write_csv(options.csv_path, CHINESE_HEADER, CHINESE_ROWS, encoding="gb18030")

    assert convert(options)["kept_rows"] == 5
    assert surviving_identifiers(options.output_dir, CHINESE_IDENTIFIERS) == []


def test_wrong_encoding_names_fix(tmp_path):
    options = chinese_options(tmp_path)
    write_csv(options.csv_path, CHINESE_HEADER, CHINESE_ROWS, encoding="gb18030")

    with pytest.raises(ConversionError, match="--encoding gb18030"):
        convert(options)


def test_cli_converts(tmp_path, capsys):
    options = english_options(tmp_path)
    exit_code = main([
        "--csv", str(options.csv_path), "--output_dir", str(options.output_dir), "--label_column", "Severity",
        "--label_map", "Severe=severe", "Mild=mild", "--diagnosis_column", "Diagnosis",
        "--findings_column", "Findings", "--image_column", "Image", "--id_column", "Record ID",
    ])  # fmt: skip

    assert exit_code == 0
    assert '"kept_rows": 4' in capsys.readouterr().out
    assert surviving_identifiers(options.output_dir, ENGLISH_IDENTIFIERS) == []


@pytest.mark.parametrize(
    "diagnosis,expected",
    [
        ("重症肺炎；呼吸衰竭", "呼吸衰竭"),
        ("社区获得性肺炎（重症）", "社区获得性肺炎"),
        ("非重症肺炎", "肺炎"),
        ("Severe community-acquired pneumonia", "community-acquired pneumonia"),
        ("Pneumonia, severe, with effusion", "Pneumonia, with effusion"),
        ("mild pneumonia", ""),
        ("Mildly raised CRP", "Mildly raised CRP"),
    ],
)
def test_remove_diagnostic_statements(diagnosis, expected):
    pattern = compile_diagnosis_patterns(DEFAULT_DIAGNOSIS_PATTERNS)

    assert remove_diagnostic_statements(diagnosis, pattern)[0] == expected


@pytest.mark.parametrize(
    "text,expected",
    [
        ("身份证号：110105201803071234", "身份证号：[ID_NUMBER]"),
        ("手机 138 1234 5678", "手机 [PHONE]"),
        ("电话(021)12345678", "电话[PHONE]"),
        ("出生于2018年3月7日", "出生于[DOB]"),
        ("门诊号：MZ889900", "门诊号：[MRN]"),
        ("患儿刘洋，男", "患儿[NAME]，男"),
        ("患儿高热3天", "患儿高热3天"),
        ("Name: Ada Winslow", "Name: [NAME]"),
        ("Hospital No. 7788123", "Hospital No. [MRN]"),
        ("Seen on 2021-04-05", "Seen on [DATE]"),
        ("SpO2 92%, temp 38.5, WBC 12000", "SpO2 92%, temp 38.5, WBC 12000"),
    ],
)
def test_redactor_patterns(text, expected):
    assert redaction.Redactor().redact(text)[0] == expected


def test_redactor_known_latin_name_needs_word_boundary():
    redactor = redaction.Redactor({"Ann Lee": redaction.NAME})

    assert redactor.redact("Annual review for Ann Lee")[0] == "Annual review for [NAME]"
