"""The streaming executor (lineage/engine) on its own, through a second planner that is not a merge,
and the run-time safety of the files it reads and writes: inputs changed or truncated while a run
reads them, temporaries after a kill, metadata known only at the end."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import safetensors
import torch

from lineage.engine.executor import JobContext, run_jobs
from lineage.engine.inputs import InputFile
from lineage.engine.jobs import Job, Output, Source
from lineage.errors import CheckpointError, LineageError
from lineage.io.hashing import hash_file
from lineage.io.safetensors import SafetensorsFile, SafetensorsWriter, save_file


def _tensors(path):
    with SafetensorsFile(path) as f:
        return {k: f.read(k) for k in f.keys()}, f.metadata


# ---------------------------------------------------------------------------------------------
# A second planner: every 2-D tensor of input 0 becomes two outputs (its top and bottom rows, the
# bottom ones in fp32), and one job reads a key from both inputs to produce one flat difference.


def _split_rows(ctx: JobContext) -> None:
    whole = ctx.sources[0].fp32()
    top, bottom = ctx.outputs
    top.copy_(whole[: top.shape[0]])
    bottom.copy_(whole[top.shape[0]:])


def _difference(ctx: JobContext) -> None:
    flat = ctx.outputs[0]
    for start, block in ctx.fp32_chunks():
        flat[start:start + block.shape[1]] = block[1] - block[0]


def plan_split(files: list[InputFile], diff_key: str) -> list[Job]:
    jobs = []
    for key, info in files[0].tensors.items():
        if len(info.shape) == 2 and info.shape[0] >= 2 and info.is_float:
            half = info.shape[0] // 2
            outputs = (Output(f"{key}.top", info.dtype, (half, info.shape[1])),
                       Output(f"{key}.bottom", "F32", (info.shape[0] - half, info.shape[1])))
            jobs.append(Job((Source(0, key),), outputs, _split_rows))
    numel = files[0].tensors[diff_key].numel
    jobs.append(Job((Source(0, diff_key), Source(1, diff_key)), (Output("difference", "F32", (numel,)),), _difference))
    return jobs


DIFF_KEY = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"  # 4-D, 9,216 entries


def test_a_second_planner_splits_tensors_into_outputs_of_other_shapes(trio, tmp_path):
    out = tmp_path / "split.safetensors"
    with InputFile(trio["base"]) as a, InputFile(trio["x"]) as b:
        jobs = plan_split([a, b], DIFF_KEY)
        result = run_jobs([a, b], jobs, out, workers=2, progress=False,
                          metadata=lambda inputs, output: {"inputs": json.dumps(inputs), "output": str(output)})
    base, _ = _tensors(trio["base"])
    x, _ = _tensors(trio["x"])
    written, metadata = _tensors(out)
    split = [k for k, v in base.items() if v.dim() == 2 and v.shape[0] >= 2 and v.is_floating_point()]
    assert len(split) > 500 and len(written) == 2 * len(split) + 1
    assert list(written)[:4] == [f"{split[0]}.top", f"{split[0]}.bottom", f"{split[1]}.top", f"{split[1]}.bottom"]
    for key in split:
        top, bottom = torch.split(base[key], [base[key].shape[0] // 2, base[key].shape[0] - base[key].shape[0] // 2])
        assert torch.equal(written[f"{key}.top"], top) and written[f"{key}.top"].dtype == base[key].dtype
        assert torch.equal(written[f"{key}.bottom"], bottom.float())
    assert torch.equal(written["difference"], (x[DIFF_KEY].float() - base[DIFF_KEY].float()).reshape(-1))
    # The hashes come from the streams: the output's from the writer, the inputs' from the hashing thread.
    assert result.output_autov3 == hash_file(out).autov3
    assert result.input_autov3 == [hash_file(trio["base"]).autov3, hash_file(trio["x"]).autov3]
    assert json.loads(metadata["inputs"]) == result.input_autov3 and metadata["output"] == result.output_autov3


def test_without_an_output_file_a_run_only_hashes(trio, tmp_path, monkeypatch):
    with InputFile(trio["base"]) as a, InputFile(trio["x"]) as b:
        written = run_jobs([a, b], plan_split([a, b], DIFF_KEY), tmp_path / "split.safetensors", progress=False)
        monkeypatch.setattr(SafetensorsWriter, "__init__", lambda *a, **k: pytest.fail("a file was written"))
        hashed = run_jobs([a, b], plan_split([a, b], DIFF_KEY), None, progress=False)
    assert hashed == written


def test_jobs_are_checked_before_any_work(trio, tmp_path):
    with InputFile(trio["base"]) as a:
        key = next(iter(a.tensors))
        twice = [Job((Source(0, key),), (Output("same", "F32", (1,)),), _split_rows)] * 2
        with pytest.raises(LineageError, match="two jobs produce the output tensor 'same'"):
            run_jobs([a], twice, tmp_path / "o.safetensors", progress=False)
        with pytest.raises(CheckpointError, match="has no tensor 'missing'"):
            run_jobs([a], [Job((Source(0, "missing"),), (), _split_rows)], tmp_path / "o.safetensors", progress=False)
        with pytest.raises(LineageError, match="reads input 1 of a run with 1 inputs"):
            run_jobs([a], [Job((Source(1, key),), (), _split_rows)], tmp_path / "o.safetensors", progress=False)
    assert os.listdir(tmp_path) == []


def test_a_failing_job_leaves_nothing(trio, tmp_path):
    def fail(ctx: JobContext) -> None:
        raise RuntimeError("job failed")

    with InputFile(trio["base"]) as a:
        jobs = [Job((Source(0, k),), (Output(k, i.dtype, i.shape),), fail) for k, i in a.tensors.items()]
        with pytest.raises(RuntimeError, match="job failed"):
            run_jobs([a], jobs, tmp_path / "o.safetensors", progress=False)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# Inputs changed or truncated while a run reads them


def _change_input_at_write(monkeypatch, at: int, change) -> list[int]:
    """Call `change()` when the writer gets its `at`-th tensor (the run is midway)."""
    real_write, calls = SafetensorsWriter.write, []

    def write(self, name, tensor):
        calls.append(1)
        if len(calls) == at:
            change()
        real_write(self, name, tensor)

    monkeypatch.setattr(SafetensorsWriter, "write", write)
    return calls


def test_an_input_changed_during_a_merge_fails_it_and_nothing_is_written_or_recorded(trio, tmp_path, monkeypatch,
                                                                                    isolated_registry):
    """Bytes rewritten in place, same size, mtime set back: the ctime still tells."""
    from lineage.merge.api import merge

    changed = tmp_path / "in" / "x.safetensors"
    changed.parent.mkdir()
    changed.write_bytes(open(trio["x"], "rb").read())

    def rewrite():
        stat = os.stat(changed)
        with open(changed, "r+b") as f:
            f.seek(stat.st_size // 10)  # a part the run has already read
            f.write(b"\x7f" * 4096)
        os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    calls = _change_input_at_write(monkeypatch, 1000, rewrite)
    out = tmp_path / "out" / "m.safetensors"
    out.parent.mkdir()
    with pytest.raises(CheckpointError, match="was changed while being read; nothing was written") as e:
        merge([trio["base"], str(changed)], out, alpha=0.5)
    assert str(changed) in str(e.value) and len(calls) >= 1000
    assert os.listdir(out.parent) == []
    assert not isolated_registry.exists()  # nothing was recorded (the registry was not even created)


TRUNCATED_MERGE = """
import os, sys
from lineage.cli import main
from lineage.io.safetensors import SafetensorsWriter

victim = sys.argv[2]
real_write, calls = SafetensorsWriter.write, []
def write(self, name, tensor):
    calls.append(1)
    if len(calls) == 300:  # midway: cut the input in half
        os.truncate(victim, os.path.getsize(victim) // 2)
    real_write(self, name, tensor)
SafetensorsWriter.write = write
main(["merge", *sys.argv[1:3], "-o", sys.argv[3], "--alpha", "0.5"])
"""


def test_an_input_truncated_during_a_merge_fails_it_with_one_line_and_no_sigbus(trio, tmp_path, isolated_registry):
    victim = tmp_path / "in" / "x.safetensors"
    victim.parent.mkdir()
    victim.write_bytes(open(trio["x"], "rb").read())
    out = tmp_path / "out" / "m.safetensors"
    out.parent.mkdir()
    run = subprocess.run([sys.executable, "-c", TRUNCATED_MERGE, trio["base"], str(victim), str(out)],
                         capture_output=True, text=True)
    assert run.returncode == 1, run.stderr  # not -SIGBUS
    assert run.stderr.startswith(f"error: {victim}: was truncated while being read")
    assert run.stderr.count("\n") == 1
    assert os.listdir(out.parent) == []
    assert not isolated_registry.exists()


# ---------------------------------------------------------------------------------------------
# Metadata known only at the end


def test_the_writer_keeps_header_room_for_metadata_set_at_the_end(tmp_path):
    tensors = {"a": torch.arange(5, dtype=torch.float16), "b": torch.ones(2, 3)}
    path = tmp_path / "m.safetensors"
    with SafetensorsWriter(path, {k: ("F16" if k == "a" else "F32", tuple(t.shape)) for k, t in tensors.items()},
                           {"known": "early"}, hash_data=True, metadata_room=200) as w:
        for k, t in tensors.items():
            w.write(k, t)
        w.update_metadata({"known": "early", "hash": w.data_sha256(), "late": "x" * 100})
    with safetensors.safe_open(str(path), "pt") as f:  # the reference library reads the padded header
        assert f.metadata()["late"] == "x" * 100 and torch.equal(f.get_tensor("a"), tensors["a"])
        assert f.metadata()["hash"] == hash_file(path).autov3

    too_long = tmp_path / "long.safetensors"
    with pytest.raises(LineageError, match="bytes more header than was kept for it"):
        with SafetensorsWriter(too_long, {"a": ("F32", (1,))}, {"k": "v"}, metadata_room=50) as w:
            w.write("a", torch.ones(1))
            w.update_metadata({"k": "v", "late": "x" * 100})
    assert not too_long.exists()


def test_merge_metadata_is_written_once_the_hashes_are_known(trio, tmp_path, monkeypatch):
    """The metadata first written names only the hashes known then; the final one all of them."""
    import lineage.merge.api as api

    seen = []
    real = api.merge_metadata
    monkeypatch.setattr(api, "merge_metadata", lambda recipe, *a: seen.append(
        ([i.autov3 for i in recipe.inputs], a[2])) or real(recipe, *a))
    result = api.merge([trio["base"], trio["x"]], tmp_path / "m.safetensors", record=False)
    hashes = [hash_file(trio["base"]).autov3, hash_file(trio["x"]).autov3]
    assert seen == [([None, None], None), (hashes, result.autov3)]
    _, metadata = _tensors(result.path)
    assert metadata["modelspec.hash_sha256"] == "0x" + result.autov3


# ---------------------------------------------------------------------------------------------
# Temporary files after a kill


KILLED_WRITE = """
import os, sys, time
if sys.argv[1] == "no-tmpfile":
    del os.O_TMPFILE  # as on a system or file system without anonymous files
from lineage.io.safetensors import SafetensorsWriter
import torch

with SafetensorsWriter(sys.argv[2], {f"t{i}": ("F32", (1000,)) for i in range(1000)}) as w:
    for i in range(1000):
        w.write(f"t{i}", torch.ones(1000))
        if i == 10:
            print("writing", flush=True)  # the test kills us from here on
            time.sleep(60)
"""

KILLED_RENAME = """
import os, sys, time
from lineage.io.safetensors import save_file
import torch

real_replace = os.replace
def slow_replace(src, dst):
    print("renaming", flush=True)  # the complete file has a hidden name; the test kills us here
    time.sleep(60)
    real_replace(src, dst)
os.replace = slow_replace
save_file({"new": torch.ones(3)}, sys.argv[1])
"""


def _kill_when(script: list[str], line: str) -> None:
    proc = subprocess.Popen([sys.executable, "-c", *script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == line + "\n"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def _eventually_only(directory, names: list[str]) -> None:
    """The guard removes a killed writer's hidden file a moment after the kill."""
    for _ in range(100):
        if sorted(os.listdir(directory)) == names:
            return
        time.sleep(0.05)
    assert sorted(os.listdir(directory)) == names


def test_no_temporary_is_left_after_a_kill_without_anonymous_files(tmp_path):
    out = tmp_path / "m.safetensors"
    _kill_when([KILLED_WRITE, "no-tmpfile", str(out)], "writing")
    _eventually_only(tmp_path, [])


def test_no_temporary_is_left_after_a_kill_while_replacing_a_file(tmp_path):
    """Between naming the complete file and renaming it over the old one, a kill leaves the old one."""
    out = tmp_path / "m.safetensors"
    save_file({"old": torch.zeros(2)}, out)
    before = out.read_bytes()
    _kill_when([KILLED_RENAME, str(out)], "renaming")
    _eventually_only(tmp_path, ["m.safetensors"])
    assert out.read_bytes() == before


KILLED_REPRODUCE = """
import sys, time
from lineage.cli import main
from lineage.engine import executor

real = executor._Run.execute
calls = []
def slow(self, job, slot):
    calls.append(1)
    if len(calls) == 100:
        print("reproducing", flush=True)  # the test kills us from here on
        time.sleep(60)
    return real(self, job, slot)
executor._Run.execute = slow
main(["reproduce", *sys.argv[1:]])
"""


@pytest.mark.parametrize("keep", [False, True])
def test_no_temporary_is_left_after_a_killed_reproduce(trio, tmp_path, keep):
    from lineage.merge.api import merge

    merged = tmp_path / "merged" / "m.safetensors"
    merged.parent.mkdir()
    merge([trio["base"], trio["x"]], merged, alpha=0.3, record=False)
    kept = tmp_path / "kept"
    kept.mkdir()
    _kill_when([KILLED_REPRODUCE, str(merged), "--input", trio["base"], "--input", trio["x"],
                *(["-o", str(kept / "again.safetensors")] if keep else [])], "reproducing")
    _eventually_only(merged.parent, ["m.safetensors"])
    _eventually_only(kept, [])


def test_reproduce_without_an_output_writes_nothing(trio, tmp_path, monkeypatch):
    from lineage.merge.api import merge
    from lineage.merge.reproduce import reproduce

    merged = tmp_path / "m.safetensors"
    merge([trio["base"], trio["x"]], merged, alpha=0.3, record=False)
    monkeypatch.setattr(SafetensorsWriter, "__init__", lambda *a, **k: pytest.fail("a file was written"))
    found = reproduce(merged, inputs=[trio["base"], trio["x"]], progress=False)
    assert found.matches and found.output is None
    assert os.listdir(tmp_path) == ["m.safetensors"]


def test_data_section_hash_of_an_input(trio):
    with InputFile(trio["y"]) as f:
        data = open(trio["y"], "rb").read()[f.header.data_start:]
        assert f.data_autov3() == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("anonymous", [True, False])
def test_a_file_that_cannot_be_put_in_place_is_one_error_and_leaves_the_old_one(tmp_path, monkeypatch, anonymous):
    import errno

    if not anonymous:
        monkeypatch.delattr(os, "O_TMPFILE", raising=False)
    out = tmp_path / "m.safetensors"
    save_file({"old": torch.zeros(2)}, out)
    before = out.read_bytes()

    def refused(src, dst):
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "replace", refused)
    with pytest.raises(LineageError, match="cannot put the output in place \\(Permission denied\\)"):
        save_file({"new": torch.ones(3)}, out)
    assert os.listdir(tmp_path) == ["m.safetensors"] and out.read_bytes() == before


KILLED_TEXT_WRITE = """
import os, sys, time
if sys.argv[1] == "no-tmpfile":
    del os.O_TMPFILE
from lineage.io import atomic

real_fsync = os.fsync
def slow_fsync(fd):
    print("writing", flush=True)  # the text is in the temporary, not yet in place; the test kills us here
    time.sleep(60)
os.fsync = slow_fsync
atomic.atomic_write(sys.argv[2], "new text")
"""


@pytest.mark.parametrize("anonymous", [True, False])
def test_no_temporary_is_left_after_a_killed_small_write(tmp_path, anonymous):
    """Recipes, trees, exports and cards (atomic_write) leave the old file and nothing else after a kill."""
    out = tmp_path / "tree.txt"
    out.write_text("old text")
    _kill_when([KILLED_TEXT_WRITE, "tmpfile" if anonymous else "no-tmpfile", str(out)], "writing")
    _eventually_only(tmp_path, ["tree.txt"])
    assert out.read_text() == "old text"


def test_the_inputs_hashing_has_a_progress_bar_of_its_own(trio, tmp_path, monkeypatch):
    """The hashing of unrecorded inputs can outlast the merge itself: it reports its own progress."""
    from lineage.engine import executor
    from lineage.io.safetensors import SafetensorsFile
    from lineage.merge.api import merge

    bars = {}

    class Recorder:
        def __init__(self, total=None, desc=None, disable=None, **kwargs):
            self.total, self.done, self.disable = total, 0, disable
            bars[desc] = self

        def update(self, n):
            self.done += n

        def close(self):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.close()

    monkeypatch.setattr(executor, "tqdm", Recorder)
    merge([trio["base"], trio["x"]], tmp_path / "m.safetensors", record=False)
    data = 0
    for path in (trio["base"], trio["x"]):  # whole files: the same pass takes A1111's whole-file sha256
        with SafetensorsFile(path) as f:
            data += f.file_size
    assert bars["hashing inputs"].total == data and bars["hashing inputs"].done == data
    assert not bars["hashing inputs"].disable
