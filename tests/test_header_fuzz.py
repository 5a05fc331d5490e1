"""A structured fuzzer over a valid file's header: whatever the mutation, opening the file either
gives a consistent result (and then the safetensors library reads the same file the same way) or
raises CheckpointError — never another exception. Deterministic (derandomized) and bounded to a
few seconds."""
import json
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import safetensors
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lineage.errors import CheckpointError
from lineage.io.safetensors import SafetensorsFile, save_file

FUZZ_SETTINGS = settings(max_examples=400, deadline=None, derandomize=True, database=None,
                         suppress_health_check=list(HealthCheck))


@dataclass(frozen=True)
class Raw:
    """A JSON token written as it is (numbers JSON cannot hold, literals Python accepts and JSON does not)."""

    text: str


@dataclass(frozen=True)
class Obj:
    """A JSON object as (key, value) pairs, so a key can appear twice."""

    pairs: tuple


def emit(value) -> str:
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, Obj):
        return "{" + ",".join(f"{json.dumps(k)}:{emit(v)}" for k, v in value.pairs) + "}"
    if isinstance(value, list):
        return "[" + ",".join(emit(v) for v in value) + "]"
    return json.dumps(value)  # floats: NaN/Infinity appear as Python writes them; strings: surrogates escaped


def _valid_header() -> tuple[Obj, bytes]:
    folder = Path(tempfile.mkdtemp(prefix="lineage-fuzz-"))
    tensors = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.float16),
               "empty": torch.empty(0, 2), "c": torch.tensor([True, False])}
    save_file(tensors, folder / "valid.safetensors", {"title": "x", "modelspec.date": "2024"})
    raw = (folder / "valid.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])

    def to_obj(value):
        if isinstance(value, dict):
            return Obj(tuple((k, to_obj(v)) for k, v in value.items()))
        if isinstance(value, list):
            return [to_obj(v) for v in value]
        return value

    return to_obj(json.loads(raw[8:8 + n])), raw[8 + n:]


BASE_HEADER, BASE_DATA = _valid_header()

NAMES = st.sampled_from(["a", "b", "c", "empty", "__metadata__", "dtype", "shape", "data_offsets", "", "x",
                         "\ud800", "\udfff", "\ud83d\ude00", "é"])
RAW_TOKENS = st.sampled_from([Raw("9" * 5000), Raw("-" + "9" * 30), Raw("18446744073709551616"),
                              Raw("18446744073709551615"), Raw("1e400"), Raw("-0"), Raw("NaN"), Raw("Infinity"),
                              Raw("-Infinity"), Raw("[" * 5000 + "]" * 5000), Raw('{"k":' * 3000 + "1" + "}" * 3000),
                              Raw("01"), Raw("1.5e3"), Raw('"\\u0000"'), Raw("true")])
LEAVES = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), NAMES,
                   st.sampled_from(["F32", "F16", "BF16", "I64", "BOOL", "F8_E4M3", "F33", "f32"]), RAW_TOKENS)
VALUES = st.recursive(LEAVES, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.lists(st.tuples(NAMES, inner), max_size=4).map(lambda p: Obj(tuple(p)))),
    max_leaves=12)


def _places(value, path=()):
    """Every (path, value) in the header tree; a path step is an index into pairs or a list."""
    yield path, value
    if isinstance(value, Obj):
        for i, (_, v) in enumerate(value.pairs):
            yield from _places(v, (*path, i))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _places(v, (*path, i))


def _replace(value, path, make):
    if not path:
        return make(value)
    i, rest = path[0], path[1:]
    if isinstance(value, Obj):
        pairs = list(value.pairs)
        key, child = pairs[i]
        pairs[i] = (key, _replace(child, rest, make))
        return Obj(tuple(pairs))
    items = list(value)
    items[i] = _replace(items[i], rest, make)
    return items


@st.composite
def mutated_files(draw) -> bytes:
    header = BASE_HEADER
    for _ in range(draw(st.integers(1, 3))):
        places = list(_places(header))
        path, target = draw(st.sampled_from(places))
        action = draw(st.sampled_from(["replace", "drop", "duplicate", "add", "nudge"]))
        if action == "replace":
            new = draw(VALUES)
            header = _replace(header, path, lambda _: new)
        elif isinstance(target, Obj) and target.pairs and action in ("drop", "duplicate"):
            i = draw(st.integers(0, len(target.pairs) - 1))
            pairs = list(target.pairs)
            if action == "drop":
                del pairs[i]
            else:
                again = (pairs[i][0], draw(st.one_of(st.just(pairs[i][1]), VALUES)))
                pairs.insert(draw(st.integers(0, len(pairs))), again)
            header = _replace(header, path, lambda _: Obj(tuple(pairs)))
        elif isinstance(target, Obj) and action == "add":
            extra = (draw(NAMES), draw(VALUES))
            header = _replace(header, path, lambda obj: Obj((*obj.pairs, extra)))
        elif isinstance(target, int) and not isinstance(target, bool):
            delta = draw(st.sampled_from([-8, -4, -2, -1, 1, 2, 4, 8, 2**32, 2**63]))
            header = _replace(header, path, lambda n: n + delta)
    text = emit(header) + " " * draw(st.integers(0, 9))
    raw = text.encode()
    data = BASE_DATA
    if draw(st.booleans()):  # sometimes damage the bytes themselves
        damage = draw(st.sampled_from(["truncate-header", "flip", "length", "data-short", "data-long"]))
        if damage == "truncate-header":
            raw = raw[:draw(st.integers(0, len(raw)))]
        elif damage == "flip":
            i = draw(st.integers(0, len(raw) - 1))
            raw = raw[:i] + bytes([raw[i] ^ draw(st.integers(1, 255))]) + raw[i + 1:]
        elif damage == "data-short":
            data = data[:draw(st.integers(0, max(0, len(data) - 1)))]
        elif damage == "data-long":
            data = data + b"\0" * draw(st.integers(1, 16))
        else:
            wrong_length = (len(raw) + draw(st.sampled_from([-9, -1, 1, 7, 2**40, 2**64 - 9]))) % 2**64
            return struct.pack("<Q", wrong_length) + raw + data
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "f.safetensors"


def _library_view(path: str):
    try:
        with safetensors.safe_open(path, "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {})
    except Exception:
        return None


def test_the_base_header_is_valid(scratch):
    scratch.write_bytes(struct.pack("<Q", len(emit(BASE_HEADER).encode())) + emit(BASE_HEADER).encode() + BASE_DATA)
    with SafetensorsFile(scratch) as f:
        assert sorted(f.keys()) == ["a", "b", "c", "empty"]


@FUZZ_SETTINGS
@given(content=mutated_files())
def test_any_mutation_parses_consistently_or_raises_checkpoint_error(scratch, content):
    scratch.write_bytes(content)
    try:
        with SafetensorsFile(scratch) as f:
            ours = {name: f.read(name) for name in f.keys()}
            metadata = dict(f.metadata)
            spans = sorted((i.begin, i.end) for i in f.tensors.values())
            data_start, size = f.data_start, f.file_size
    except CheckpointError as e:
        assert str(e).startswith(f"{scratch}: ") and "\n" not in str(e)
        return
    # Accepted: the tensors tile the data section, every name and value is plain text ...
    covered = data_start
    for begin, end in spans:
        assert begin == covered
        covered = end
    assert covered == size
    for text in (*ours, *metadata, *metadata.values()):
        text.encode("utf-8")
    # ... and the reference library, given the same bytes, accepts them and reads the same.
    reference = _library_view(str(scratch))
    assert reference is not None, "we accepted a header the safetensors library refuses"
    tensors, ref_metadata = reference
    assert tensors.keys() == ours.keys() and ref_metadata == metadata
    for name, tensor in ours.items():
        assert tensor.dtype == tensors[name].dtype and torch.equal(tensor, tensors[name])
