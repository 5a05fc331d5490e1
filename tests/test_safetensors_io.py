import errno
import os

import pytest
import safetensors.torch
import torch

from lineage.errors import LineageError
from lineage.io.atomic import refuse_inputs
from lineage.io.safetensors import DTYPES, SafetensorsFile, SafetensorsWriter, plan_of, save_file


def _every_dtype() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, dtype in DTYPES.items():
        if dtype.is_floating_point:
            t = (torch.randn(3, 5, generator=g) * 4).to(dtype)
        elif dtype == torch.bool:
            t = torch.randint(0, 2, (7,), generator=g).bool()
        else:
            t = torch.randint(0, 100, (2, 3), generator=g).to(dtype)
        out[f"t.{name}"] = t
    out["scalar"] = torch.tensor(3.5)
    out["empty"] = torch.empty(0)
    return out


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def test_roundtrip_every_dtype_bit_exact_with_the_safetensors_library(tmp_path):
    tensors = _every_dtype()
    path = tmp_path / "all.safetensors"
    save_file(tensors, path, {"title": "x", "ünïcode": "✓"})
    # The reference library reads what we wrote ...
    ref = safetensors.torch.load_file(str(path))
    assert ref.keys() == tensors.keys()
    for k, t in tensors.items():
        assert ref[k].dtype == t.dtype and ref[k].shape == t.shape and _bytes(ref[k]) == _bytes(t)
    with safetensors.safe_open(str(path), "pt") as f:
        assert f.metadata() == {"title": "x", "ünïcode": "✓"}
    # ... and we read what the reference library wrote.
    other = tmp_path / "ref.safetensors"
    safetensors.torch.save_file(tensors, str(other), {"a": "b"})
    with SafetensorsFile(other) as f:
        assert f.metadata == {"a": "b"}
        for k, t in tensors.items():
            got = f.read(k)
            assert got.dtype == t.dtype and got.shape == t.shape and _bytes(got) == _bytes(t)


def test_data_section_is_8_byte_aligned(tmp_path):
    path = tmp_path / "a.safetensors"
    save_file({"x": torch.ones(3, dtype=torch.float16)}, path, {"k": "odd-length"})
    with SafetensorsFile(path) as f:
        assert f.data_start % 8 == 0


def test_writer_takes_the_plan_order_and_refuses_unplanned_or_misshapen_tensors(tmp_path):
    plan = {"a": ("F32", (2,)), "b": ("F16", (3,))}
    path = tmp_path / "o.safetensors"
    with SafetensorsWriter(path, plan) as w:
        with pytest.raises(LineageError, match="out of order: the plan has 'a' next"):
            w.write("b", torch.ones(3, dtype=torch.float16))
        with pytest.raises(LineageError, match="not in the write plan"):
            w.write("c", torch.ones(1))
        with pytest.raises(LineageError, match="planned F32"):
            w.write("a", torch.ones(2, dtype=torch.float16))
        w.write("a", torch.zeros(2))
        w.write("b", torch.ones(3, dtype=torch.float16))
    got = safetensors.torch.load_file(str(path))
    assert got["a"].tolist() == [0, 0] and got["b"].tolist() == [1, 1, 1]


def test_writer_streams_blocks_and_hashes_its_data_section(tmp_path, monkeypatch):
    """Tensors larger than a block, spanning blocks, and a last partial block come out bit-exact; the
    file has exactly its size (the padding of the last direct write is cut); data_sha256 is AutoV3."""
    import hashlib

    from lineage.io import direct_write

    monkeypatch.setattr(direct_write, "BLOCK_BYTES", 3 * direct_write.ALIGN)
    g = torch.Generator().manual_seed(0)
    tensors = {"big": torch.randn(10_000, generator=g), "odd": torch.randn(7, generator=g).half(),
               "empty": torch.empty(0), "last": torch.arange(1001, dtype=torch.int64)}
    path = tmp_path / "o.safetensors"
    with SafetensorsWriter(path, plan_of(tensors), {"k": "v"}, hash_data=True) as w:
        for name, t in tensors.items():
            w.write(name, t)
        autov3 = w.data_sha256()
    got = safetensors.torch.load_file(str(path))
    assert all(torch.equal(got[k], t) for k, t in tensors.items())
    with SafetensorsFile(path) as f:
        data = path.read_bytes()[f.data_start:]
    assert len(data) == sum(t.numel() * t.element_size() for t in tensors.values())
    assert autov3 == hashlib.sha256(data).hexdigest()


def test_without_direct_io_the_same_bytes_are_written(tmp_path, monkeypatch):
    """A file system without O_DIRECT (tmpfs, macOS), or one refusing a direct write, gets the same file."""
    import errno as errno_

    from lineage.io import direct_write

    tensors = {"x": torch.randn(5000), "y": torch.ones(3, dtype=torch.float16)}
    save_file(tensors, tmp_path / "direct.safetensors")
    monkeypatch.setattr(direct_write, "_open_direct", lambda path: None)
    save_file(tensors, tmp_path / "buffered.safetensors")
    monkeypatch.undo()
    import fcntl

    probe = direct_write._open_direct(str(tmp_path / "direct.safetensors"))
    if probe is None:
        pytest.skip("this file system takes no O_DIRECT writes")
    os.close(probe)
    real_pwrite, refused = os.pwrite, []

    def no_direct(fd, data, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(fd)
            raise OSError(errno_.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", no_direct)
    save_file(tensors, tmp_path / "refused.safetensors")
    monkeypatch.undo()
    assert refused
    data = (tmp_path / "direct.safetensors").read_bytes()
    assert (tmp_path / "buffered.safetensors").read_bytes() == data == (tmp_path / "refused.safetensors").read_bytes()


def test_unfinished_write_leaves_nothing(tmp_path):
    dest = tmp_path / "out.safetensors"
    with pytest.raises(LineageError, match="never written"):
        with SafetensorsWriter(dest, {"a": ("F32", (2,)), "b": ("F32", (2,))}) as w:
            w.write("a", torch.ones(2))
    assert os.listdir(tmp_path) == []


def test_exception_midway_keeps_the_previous_destination(tmp_path):
    dest = tmp_path / "out.safetensors"
    save_file({"old": torch.ones(1)}, dest)
    before = dest.read_bytes()
    with pytest.raises(RuntimeError):
        with SafetensorsWriter(dest, {"a": ("F32", (2,)), "b": ("F32", (2,))}) as w:
            w.write("a", torch.ones(2))
            raise RuntimeError("killed")
    assert dest.read_bytes() == before
    assert os.listdir(tmp_path) == ["out.safetensors"]


def test_disk_full_gives_a_clear_error_and_no_output(tmp_path, monkeypatch):
    dest = tmp_path / "out.safetensors"
    w = SafetensorsWriter(dest, {"a": ("F32", (1000,))})
    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(LineageError, match="No space left on device"):
        with w:
            w.write("a", torch.ones(1000))
    assert os.listdir(tmp_path) == []


def test_refuses_to_overwrite_an_input(tmp_path):
    a = tmp_path / "a.safetensors"
    save_file({"x": torch.ones(1)}, a)
    os.symlink(a, tmp_path / "link.safetensors")
    with pytest.raises(LineageError, match="is one of the inputs of this command"):
        refuse_inputs(tmp_path / "link.safetensors", [a])
    refuse_inputs(tmp_path / "new.safetensors", [a])


def test_metadata_must_be_strings(tmp_path):
    with pytest.raises(LineageError, match="strings to strings"):
        SafetensorsWriter(tmp_path / "m.safetensors", {}, {"n": 1})


def test_output_gets_the_usual_file_mode(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"x": torch.ones(1)}, path)
    mask = os.umask(0)
    os.umask(mask)
    assert (path.stat().st_mode & 0o777) == (0o666 & ~mask)


def test_without_anonymous_files_a_hidden_partial_file_is_used_and_removed(tmp_path, monkeypatch):
    """Where O_TMPFILE is missing (not Linux, or a file system without it) the output goes through a
    `.NAME.*.partial` file beside the destination: renamed into place when complete, removed on error."""
    monkeypatch.delattr(os, "O_TMPFILE", raising=False)
    dest = tmp_path / "out.safetensors"
    seen = []
    with SafetensorsWriter(dest, {"a": ("F32", (2,)), "b": ("F32", (2,))}) as w:
        w.write("a", torch.ones(2))
        seen = os.listdir(tmp_path)
        w.write("b", torch.zeros(2))
    assert len(seen) == 1 and seen[0].startswith(".out.safetensors.") and seen[0].endswith(".partial")
    assert os.listdir(tmp_path) == ["out.safetensors"]
    assert safetensors.torch.load_file(str(dest))["b"].tolist() == [0, 0]
    with pytest.raises(RuntimeError):
        with SafetensorsWriter(tmp_path / "other.safetensors", {"a": ("F32", (2,))}) as w:
            raise RuntimeError("midway")
    assert os.listdir(tmp_path) == ["out.safetensors"]


def test_with_anonymous_files_nothing_shows_in_the_directory_until_complete(tmp_path):
    if not hasattr(os, "O_TMPFILE"):
        pytest.skip("no O_TMPFILE on this platform")
    dest = tmp_path / "out.safetensors"
    with SafetensorsWriter(dest, {"a": ("F32", (2,))}) as w:
        assert os.listdir(tmp_path) == []
        w.write("a", torch.ones(2))
    assert os.listdir(tmp_path) == ["out.safetensors"]
    assert oct(dest.stat().st_mode & 0o777) == oct(0o666 & ~_current_umask())


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
