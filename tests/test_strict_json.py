"""lineage/io/strict_json.py: refuses what Python's json module lets through."""
import json
import subprocess
import sys

import pytest

from lineage.io import strict_json


@pytest.mark.parametrize("text, problem", [
    ('{"a": 1, "a": 2}', "key 'a' appears twice"),
    ("[NaN]", "NaN is not a JSON number"),
    ("[-Infinity]", "-Infinity is not a JSON number"),
    ("[1e400]", "number 1e400 is out of range"),
    ("[" + "9" * 5000 + "]", "(5000 characters) is out of range"),
    ("[18446744073709551616]", "out of range (more than 64 bits)"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('["\\ud800"]', "lone UTF-16 surrogate"),
    ('{"\\udc00": 1}', "lone UTF-16 surrogate"),
    (b'["\xff"]', "not UTF-8"),
    ("[1,]", "Expecting value at line 1 column 4"),
])
def test_refused(text, problem):
    with pytest.raises(strict_json.JSONError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        strict_json.loads(text)


def test_ordinary_json_reads_as_json_module_does():
    text = '{"a": [1, 2.5, -0.0, "\\ud83d\\ude00", true, null], "b": {"c": 18446744073709551615}}'
    assert strict_json.loads(text) == json.loads(text)
    assert strict_json.loads(text.encode()) == json.loads(text)


def test_dumps_names_where_a_non_finite_number_sits():
    assert strict_json.dumps({"a": [1.5]}) == '{"a": [1.5]}'
    with pytest.raises(strict_json.JSONError, match=r"params\.weights\[1\] is not a finite number"):
        strict_json.dumps({"params": {"weights": [0.5, float("inf")]}})
    assert strict_json.nonfinite_path([0.0, {"x": float("nan")}]) == "[1].x"


def test_the_guards_do_not_import_torch():
    """Reading headers and graphs stays fast to start: these modules never import torch themselves."""
    modules = ["lineage.io.strict_json", "lineage.io.inputs", "lineage.io.atomic", "lineage.graph.registry",
               "lineage.graph.interchange", "lineage.graph.metadata", "lineage.graph.hub"]
    code = f"import sys\nfor m in {modules!r}: __import__(m)\nprint('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr
