"""The header parser is at least as strict as the safetensors library, case by case, and never raises
anything but CheckpointError (lineage/io/safetensors.py, lineage/io/strict_json.py)."""
import json
import struct

import pytest
import safetensors

from lineage.errors import CheckpointError
from lineage.io.safetensors import SafetensorsFile

A = '"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}'
EIGHT = b"\0" * 8

# name -> (header JSON text, data section, does the safetensors library (0.4+) accept it?)
CASES = {
    "duplicate tensor names": ("{" + A + "," + A + "}", EIGHT, True),
    "duplicate __metadata__": ('{"__metadata__":{"x":"1"},"__metadata__":{"x":"2"},' + A + "}", EIGHT, False),
    "duplicate metadata keys": ('{"__metadata__":{"x":"1","x":"2"},' + A + "}", EIGHT, True),
    "duplicate field in an entry": ('{"a":{"dtype":"F32","dtype":"F16","shape":[2],"data_offsets":[0,8]}}', EIGHT,
                                    False),
    "boolean dimension": ('{"a":{"dtype":"F32","shape":[true,2],"data_offsets":[0,8]}}', EIGHT, False),
    "boolean offset": ('{"a":{"dtype":"F32","shape":[2],"data_offsets":[false,8]}}', EIGHT, False),
    "gap before the first tensor": ('{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', EIGHT, False),
    "gap between tensors": ('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
                            '"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}', b"\0" * 12, False),
    "bytes after the last tensor": ('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', EIGHT, False),
    "data but no tensors": ("{}", b"\0" * 4, False),
    "overlapping tensors": ('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
                            '"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', EIGHT, False),
    "dtype that is a list": ('{"a":{"dtype":["F32"],"shape":[2],"data_offsets":[0,8]}}', EIGHT, False),
    "dtype that is a number": ('{"a":{"dtype":7,"shape":[2],"data_offsets":[0,8]}}', EIGHT, False),
    "unknown dtype": ('{"a":{"dtype":"F33","shape":[2],"data_offsets":[0,8]}}', EIGHT, False),
    "5,000-digit dimension": ('{"a":{"dtype":"F32","shape":[' + "9" * 5000 + '],"data_offsets":[0,8]}}', EIGHT, False),
    "5,000-digit number in metadata": ('{"__metadata__":{"x":' + "9" * 5000 + "}," + A + "}", EIGHT, False),
    "5,000-digit number in an unknown field": ('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":'
                                               + "9" * 5000 + "}}", EIGHT, False),
    "dimension of 2**64": ('{"a":{"dtype":"F32","shape":[18446744073709551616],"data_offsets":[0,8]}}', EIGHT, False),
    "shape whose size overflows 64 bits": ('{"a":{"dtype":"F32","shape":[4294967296,4294967296],'
                                           '"data_offsets":[0,8]}}', EIGHT, False),
    "float dimension": ('{"a":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}}', EIGHT, False),
    "negative dimension": ('{"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}}', EIGHT, False),
    "three offsets": ('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8,8]}}', EIGHT, False),
    "100,000 nested lists": ('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":' + "[" * 100_000
                             + "]" * 100_000 + "}}", EIGHT, False),
    "100,000 nested objects": ('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":' + '{"k":' * 100_000
                               + "1" + "}" * 100_000 + "}}", EIGHT, False),
    "lone surrogate in a tensor name": ('{"\\ud800":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', EIGHT, False),
    "lone surrogate in a metadata key": ('{"__metadata__":{"\\udc00":"x"},' + A + "}", EIGHT, False),
    "lone surrogate in a metadata value": ('{"__metadata__":{"x":"\\udfff"},' + A + "}", EIGHT, False),
    "lone surrogate in an unknown field": ('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":"\\ud800"}}',
                                           EIGHT, False),
    "metadata value that is a number": ('{"__metadata__":{"x":1},' + A + "}", EIGHT, False),
    "metadata value that is an object": ('{"__metadata__":{"x":{"a":"b"}},' + A + "}", EIGHT, False),
    "metadata that is a list": ('{"__metadata__":[],' + A + "}", EIGHT, False),
    "metadata that is a string": ('{"__metadata__":"x",' + A + "}", EIGHT, False),
    "NaN in an unknown field": ('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":NaN}}', EIGHT, False),
    "Infinity in an unknown field": ('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":-Infinity}}', EIGHT,
                                     False),
    "1e400 in an unknown field": ('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":1e400}}', EIGHT, False),
    "entry that is a list": ('{"a":[1,2]}', EIGHT, False),
    "header that is a list": ("[]", b"", False),
    "trailing characters": ("{" + A + "} x", EIGHT, False),
    "invalid UTF-8": (b'{"\xff":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', EIGHT, False),
    "missing dtype": ('{"a":{"shape":[2],"data_offsets":[0,8]}}', EIGHT, False),
}

# Headers both accept, with what they hold.
VALID = {
    "surrogate pair in a name": ('{"\\ud83d\\ude00":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', EIGHT),
    "null metadata": ('{"__metadata__":null,' + A + "}", EIGHT),
    "an unknown field in an entry": ('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":[1,{"y":2.5}]}}', EIGHT),
    "empty tensors at one offset": ('{"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},'
                                    '"b":{"dtype":"F16","shape":[3,0],"data_offsets":[0,0]}}', b""),
    "metadata only": ('{"__metadata__":{"k":"v"}}', b""),
    "trailing spaces (padding)": ("{" + A + "}     ", EIGHT),
}


def _write(path, header: str | bytes, data: bytes) -> str:
    raw = header.encode() if isinstance(header, str) else header
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return str(path)


def _library_accepts(path: str) -> bool:
    try:
        with safetensors.safe_open(path, "pt") as f:
            f.keys()
    except Exception:
        return False
    return True


@pytest.mark.parametrize("case", CASES)
def test_refused_in_one_line_whatever_the_library_does(tmp_path, case, lmerge):
    header, data, library = CASES[case]
    path = _write(tmp_path / "h.safetensors", header, data)
    assert _library_accepts(path) == library  # the reference, measured here
    with pytest.raises(CheckpointError) as e:
        SafetensorsFile(path)
    assert str(e.value).startswith(f"{path}: ") and "\n" not in str(e.value)
    code, out, err = lmerge("inspect", path)
    assert code == 1 and out == "" and err.startswith(f"error: {path}: ") and err.count("\n") == 1


@pytest.mark.parametrize("case", VALID)
def test_what_both_accept_reads_the_same(tmp_path, case):
    header, data = VALID[case]
    path = _write(tmp_path / "h.safetensors", header, data)
    with safetensors.safe_open(path, "pt") as ref, SafetensorsFile(path) as ours:
        assert sorted(ours.keys()) == sorted(ref.keys())
        assert ours.metadata == (ref.metadata() or {})
        for name in ours.keys():
            assert ours.read(name).tolist() == ref.get_tensor(name).tolist()


def test_json_header_values_are_plain_python_values(tmp_path):
    """Names and metadata come back as str (encodable), shapes as int tuples: nothing a later
    json.dumps, print or SQLite insert can fail on."""
    header = {"__metadata__": {"ünï": "✓"}, "w": {"dtype": "BF16", "shape": [1, 2], "data_offsets": [0, 4]}}
    path = _write(tmp_path / "h.safetensors", json.dumps(header), b"\0" * 4)
    with SafetensorsFile(path) as f:
        assert f.metadata == {"ünï": "✓"} and f.info("w").shape == (1, 2)


def test_a_hostile_header_fails_fast_with_a_short_message(tmp_path):
    """A million 64-bit dimensions (whose exact product would take minutes to compute) under a
    megabyte-long name: refused in well under a second, in a message that stays short."""
    import time

    name, shape = "n" * 1_000_000, [2**64 - 1] * 1_000_000
    header = json.dumps({name: {"dtype": "F32", "shape": shape, "data_offsets": [0, 8]}})
    path = _write(tmp_path / "h.safetensors", header, EIGHT)
    started = time.perf_counter()
    with pytest.raises(CheckpointError, match="is too large for any file") as e:
        SafetensorsFile(path)
    assert time.perf_counter() - started < 5
    assert len(str(e.value)) < len(path) + 300 and "(1,000,002 characters)" in str(e.value)
