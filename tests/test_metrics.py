"""Relaxed accuracy: numbers within 5% with %, thousands separators and currency normalised; text exact."""

import pytest

from train.metrics import markdown_table, normalize_answer, parse_number, relaxed_match, score


@pytest.mark.parametrize("prediction, answer, expected", [
    ("15%", "15%", True),
    ("15", "15%", True),
    ("15.5 %", "15%", True),          # within 5%
    ("16%", "15%", False),            # 6.7% off
    ("1,000", "1000", True),
    ("1,049", "1,000", True),
    ("1,051", "1,000", False),
    ("$2.5", "2.50", True),
    ("0", "0", True),
    ("0.01", "0", False),
    ("-3", "-3.1", True),
    ("Teachers", "teachers", True),
    ("  Teachers. ", "Teachers", True),
    ("Teacher", "Teachers", False),
    ("pie chart", "pie  chart", True),
    ("4 categories", "4", False),     # only a bare number counts as a number
    ("", "4", False),
])
def test_relaxed_match(prediction, answer, expected):
    assert relaxed_match(prediction, answer) is expected


def test_parse_and_normalise():
    assert parse_number("1,234.5%") == 1234.5
    assert parse_number("1e3") == 1000.0
    assert parse_number("pie") is None
    assert normalize_answer(' "Pie  Chart!" ') == "pie chart"


def test_score_groups_and_table():
    records = [
        {"prediction": "pie", "answer": "pie", "chart_type": "pie", "question_type": "type"},
        {"prediction": "bar", "answer": "pie", "chart_type": "pie", "question_type": "type"},
        {"prediction": "20%", "answer": "20%", "chart_type": "bar", "question_type": "value"},
    ]
    report = score(records, ["chart_type", "question_type"])
    assert report["overall"] == {"n": 3, "correct": 2, "accuracy": 2 / 3}
    assert report["groups"]["chart_type"]["pie"] == {"n": 2, "correct": 1, "accuracy": 0.5}
    assert report["groups"]["question_type"]["value"]["accuracy"] == 1.0
    blank = score([{**r, "prediction": "x"} for r in records], ["chart_type"])
    table = markdown_table({"fine-tuned": report, "blank image": blank})
    assert table.splitlines()[0] == "| | fine-tuned | blank image |"
    assert "| **overall** | 0.67 (2/3) | 0.00 (0/3) |" in table
    assert "| question_type: value | 1.00 (1/1) | - |" in table
