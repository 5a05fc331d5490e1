import hashlib
import os
import struct
import zlib

from lineage.io.hashing import hash_file


def test_hashes_match_independent_definitions(family):
    path = family["vchild"]
    data = open(path, "rb").read()
    (n,) = struct.unpack("<Q", data[:8])
    full = hashlib.sha256(data).hexdigest()
    h = hash_file(path)
    assert h.sha256 == full
    assert h.autov2 == full[:10]
    assert h.autov1 == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert h.autov3 == hashlib.sha256(data[8 + n:]).hexdigest()
    assert h.crc32 == f"{zlib.crc32(data):08x}"


def test_small_chunks_give_the_same_hashes(family):
    assert hash_file(family["base"], chunk_size=1 << 16) == hash_file(family["base"])


def test_autov3_ignores_metadata(tmp_path, family):
    from lineage.io.safetensors import SafetensorsFile, save_file

    with SafetensorsFile(family["base"]) as f:
        tensors = {k: f.read(k) for k in list(f.keys())[:20]}
    save_file(tensors, tmp_path / "a.safetensors", {"title": "a"})
    save_file(tensors, tmp_path / "b.safetensors", {"title": "something else"})
    a, b = hash_file(tmp_path / "a.safetensors"), hash_file(tmp_path / "b.safetensors")
    assert a.autov3 == b.autov3 and a.sha256 != b.sha256


def test_non_safetensors_file_has_no_autov3(tmp_path):
    p = tmp_path / "x.bin"
    p.write_bytes(os.urandom(3000))
    h = hash_file(p)
    assert h.autov3 is None and h.sha256 == hashlib.sha256(p.read_bytes()).hexdigest()


def test_hash_cli_json(lmerge, family):
    import json

    code, out, _ = lmerge("hash", family["base"], family["child"], "--json")
    assert code == 0
    rows = json.loads(out)
    assert [r["path"] for r in rows] == [family["base"], family["child"]]
    assert set(rows[0]) == {"path", "sha256", "autov1", "autov2", "autov3", "crc32"}
    assert rows[0]["sha256"] == hashlib.sha256(open(family["base"], "rb").read()).hexdigest()


def test_lmerge_hash_reports_its_progress(lmerge, tmp_path, monkeypatch):
    import tqdm

    bars = []

    class Recorder:
        def __init__(self, total=None, **kwargs):
            self.total, self.done = total, 0
            bars.append(self)

        def update(self, n):
            self.done += n

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

    monkeypatch.setattr(tqdm, "tqdm", Recorder)
    files = []
    for i, size in enumerate((3 << 20, 5 << 20)):
        path = tmp_path / f"f{i}.bin"
        path.write_bytes(os.urandom(size))
        files.append(path)
    code, _, _ = lmerge("hash", *files)
    assert code == 0 and len(bars) == 1 and bars[0].total == bars[0].done == (8 << 20)
