"""Nothing a command writes lands on one of its inputs; links, devices and pipes given as
destinations are written through or refused, never replaced by a regular file (lineage/io/atomic.py)."""
import json
import os
import stat
import subprocess
import sys

import pytest

from lineage.errors import LineageError
from lineage.io.atomic import atomic_write, destination


def _one_line_error(code: int, err: str, path: object, message: str) -> None:
    assert code == 1, err
    assert err.startswith(f"error: {path}: ") and message in err and err.count("\n") == 1, err


def _is_char_device(path: str) -> bool:
    return stat.S_ISCHR(os.stat(path).st_mode)


# -- outputs onto inputs -----------------------------------------------------------------------

def test_save_recipe_onto_an_input_model_is_refused_before_merging(lmerge, tiny, tmp_path):
    a, b = tiny("a.safetensors", 1), tiny("b.safetensors", 2)
    before = open(a, "rb").read()
    out = tmp_path / "m.safetensors"
    code, _, err = lmerge("merge", a, b, "-o", out, "--save-recipe", a)
    _one_line_error(code, err, a, "is one of the inputs of this command")
    assert open(a, "rb").read() == before
    assert not out.exists()  # refused up front: no merge ran


def test_output_onto_the_recipe_it_reads_is_refused(lmerge, tiny, tmp_path):
    a, b = tiny("a.safetensors", 1), tiny("b.safetensors", 2)
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'method = "weighted_sum"\n[params]\nalpha = 0.5\n'
                      f'[[inputs]]\npath = "{a}"\n[[inputs]]\npath = "{b}"\n')
    before = recipe.read_bytes()
    code, _, err = lmerge("merge", "--recipe", recipe, "-o", recipe, "--no-record")
    _one_line_error(code, err, recipe, "is one of the inputs")
    code, _, err = lmerge("merge", "--recipe", recipe, "-o", tmp_path / "m.safetensors", "--save-recipe", recipe)
    _one_line_error(code, err, recipe, "is one of the inputs")
    assert recipe.read_bytes() == before and not (tmp_path / "m.safetensors").exists()


def test_save_recipe_onto_the_merged_output_is_refused(lmerge, tiny, tmp_path):
    a, b = tiny("a.safetensors", 1), tiny("b.safetensors", 2)
    out = tmp_path / "m.safetensors"
    code, _, err = lmerge("merge", a, b, "-o", out, "--save-recipe", out, "--no-record")
    _one_line_error(code, err, out, "is one of the inputs")
    assert not out.exists()


def test_tree_and_export_refuse_to_replace_the_registry(lmerge, tiny, isolated_registry):
    lmerge("add", tiny("a.safetensors", 1))
    before = isolated_registry.read_bytes()
    for args in (("tree", "-o", isolated_registry), ("registry", "export", isolated_registry),
                 ("hub", "card", "illustrious-xl-v1.0", "-o", isolated_registry)):
        code, _, err = lmerge(*args)
        assert code == 1 and "is one of the inputs" in err and err.count("\n") == 1, (args, err)
    assert isolated_registry.read_bytes() == before


def test_convert_and_reproduce_refuse_their_own_input(lmerge, tiny, tmp_path):
    import torch

    ckpt = tmp_path / "model.ckpt"
    torch.save({"w": torch.ones(2)}, ckpt)
    code, _, err = lmerge("convert", ckpt, ckpt)
    _one_line_error(code, err, ckpt, "is one of the inputs")
    a, b = tiny("a.safetensors", 1), tiny("b.safetensors", 2)
    merged = tmp_path / "m.safetensors"
    assert lmerge("merge", a, b, "-o", merged, "--no-record")[0] == 0
    before = merged.read_bytes()
    code, _, err = lmerge("reproduce", merged, "-o", merged)
    _one_line_error(code, err, merged, "is one of the inputs")
    assert merged.read_bytes() == before


# -- symbolic links --------------------------------------------------------------------------

def test_a_symlink_destination_is_written_at_its_target_and_stays_a_link(lmerge, tiny, tmp_path):
    a, b = tiny("a.safetensors", 1), tiny("b.safetensors", 2)
    for name, args in {
        "tree.txt": ("tree", "--format", "text", "-o"),
        "export.json": ("registry", "export", "--format", "json"),
        "m.safetensors": ("merge", a, b, "--no-record", "-o"),
        "recipe.toml": ("merge", a, b, "--no-record", "-o", tmp_path / "m2.safetensors", "--save-recipe"),
        "README.md": ("hub", "card", "illustrious-xl-v1.0", "-o"),
    }.items():
        target = tmp_path / f"real-{name}"
        target.write_text("old")
        link = tmp_path / name
        link.symlink_to(target.name)
        code, _, err = lmerge(*args, link)
        assert code == 0, (args, err)
        assert link.is_symlink() and os.readlink(link) == target.name, name
        assert target.read_bytes() != b"old", name
    assert (tmp_path / "real-recipe.toml").read_text().startswith("version = 1")
    assert "base_model:" in (tmp_path / "real-README.md").read_text()  # the card kept its text and gained the chain


def test_a_dangling_symlink_destination_creates_its_target(tmp_path):
    link = tmp_path / "card.md"
    link.symlink_to("made-later.md")
    atomic_write(link, "hello")
    assert link.is_symlink() and (tmp_path / "made-later.md").read_text() == "hello"


def test_link_loops_directories_and_block_devices_are_refused(tmp_path):
    (tmp_path / "x").symlink_to("y")
    (tmp_path / "y").symlink_to("x")
    with pytest.raises(LineageError, match="symbolic link loop"):
        atomic_write(tmp_path / "x", "data")
    with pytest.raises(LineageError, match="is a directory"):
        atomic_write(tmp_path, "data")
    block = tmp_path / "disk"
    try:
        os.mknod(block, 0o600 | stat.S_IFBLK, os.makedev(7, 250))
    except (PermissionError, OSError):
        pytest.skip("cannot create a device node here")
    with pytest.raises(LineageError, match="is a block device"):
        atomic_write(block, "data")
    assert stat.S_ISBLK(os.lstat(block).st_mode)


# -- devices, pipes and descriptors ----------------------------------------------------------

@pytest.fixture
def null_device(tmp_path) -> str:
    """A character device node like /dev/null (the same device numbers) in the test's folder: a
    regression then replaces this node, not the machine's /dev/null."""
    node = tmp_path / "null"
    try:
        os.mknod(node, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except OSError:
        pytest.skip("cannot create a device node here")
    return str(node)


def test_a_character_device_is_written_through_for_text_and_refused_for_models(lmerge, tiny, null_device, tmp_path):
    for args in (("tree", "--format", "text", "-o", null_device), ("registry", "export", null_device),
                 ("hub", "card", "illustrious-xl-v1.0", "-o", null_device)):
        code, _, err = lmerge(*args)
        assert code == 0, (args, err)
        assert _is_char_device(null_device)
    a, b = tiny("a.safetensors", 1), tiny("b.safetensors", 2)
    code, _, err = lmerge("merge", a, b, "-o", tmp_path / "m.safetensors", "--save-recipe", null_device, "--no-record")
    assert code == 0 and _is_char_device(null_device), err
    code, _, err = lmerge("merge", a, b, "-o", null_device, "--no-record")
    _one_line_error(code, err, null_device, "a model file is written only to a regular file")
    assert _is_char_device(null_device)


def test_a_fifo_destination_is_written_through_when_read_and_refused_without_a_reader(lmerge, tmp_path):
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    code, _, err = lmerge("registry", "export", "--format", "json", fifo)
    _one_line_error(code, err, fifo, "is a named pipe that nobody reads")
    # A reader that is also a writer (O_RDWR) is there at once and never sees end-of-file; the export is
    # smaller than the pipe's buffer, so it goes in whole before anyone reads.
    reader = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
    try:
        code, _, err = lmerge("registry", "export", "--format", "json", fifo)
        assert code == 0, err
        received = os.read(reader, 1 << 16)
    finally:
        os.close(reader)
    assert json.loads(received)["format"] == "lineage-graph"
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_dev_stdout_writes_to_the_open_descriptor_keeping_what_came_before(tmp_path):
    """`-o /dev/stdout >> log` appends: reopening the path would start at offset 0 and overwrite the log."""
    log = tmp_path / "log.txt"
    log.write_text("before\n")
    with open(log, "ab") as out:
        r = subprocess.run([sys.executable, "-m", "lineage", "tree", "--format", "json", "-o", "/dev/stdout"],
                           stdout=out, stderr=subprocess.PIPE, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    text = log.read_text()
    assert text.startswith("before\n{") and '"format": "lineage-graph"' in text
    assert stat.S_ISREG(os.lstat(log).st_mode)


def test_destination_is_decided_before_any_work(tmp_path):
    assert destination(tmp_path / "new.txt").target == str(tmp_path / "new.txt")
    assert destination(os.devnull).target is None
    assert destination("/dev/stdout").descriptor == 1
