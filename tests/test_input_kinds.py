"""Inputs that are not regular files are refused up front by every command that reads files, in one
line naming the file; a FIFO used to hang every command, so each case runs under a timer and a hang
fails the test instead of the suite (lineage/io/inputs.py)."""
import os
import signal
import subprocess
import sys
from contextlib import contextmanager

import pytest

HANG_AFTER_S = 20


class Hang(BaseException):
    """Raised by the timer; a BaseException, so the CLI runner does not swallow it as a command error."""


@contextmanager
def no_hang(seconds: float = HANG_AFTER_S):
    """Interrupt a blocked open()/read() (the signal handler raising stops the system call's retry)."""
    def expire(signum, frame):
        raise Hang(f"still running after {seconds} s: the command blocked on its input")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _make_kind(kind: str, folder) -> str:
    path = folder / f"{kind}.safetensors"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "device":
        path.symlink_to("/dev/zero")  # endless zeros: a reader that does not refuse it never finishes
    elif kind == "directory":
        path.mkdir()
    elif kind == "dangling-link":
        path.symlink_to(folder / "gone.safetensors")
    elif kind == "link-loop":
        path.symlink_to(folder / "loop-b")
        (folder / "loop-b").symlink_to(path)
    return str(path)


MESSAGES = {
    "fifo": "is a named pipe (FIFO), not a regular file",
    "device": "is a character device, not a regular file",
    "directory": "is a directory",
    "dangling-link": "which does not exist",
    "link-loop": "is a symbolic link loop",
}


def _commands(bad: str, good: str, out: str) -> dict[str, tuple[str, ...]]:
    return {
        "inspect": ("inspect", bad),
        "hash": ("hash", bad),
        "merge": ("merge", bad, good, "-o", out, "--no-record"),
        "merge --recipe": ("merge", "--recipe", bad, "-o", out),
        "add": ("add", bad),
        "add --parent": ("add", good, "--parent", bad),
        "scan": ("scan", bad),
        "link": ("link", bad, "sdxl-1.0-base"),
        "compat": ("compat", bad, good),
        "convert": ("convert", bad, out),
        "reproduce": ("reproduce", bad),
        "registry import": ("registry", "import", bad),
    }


# What a directory legitimately is for some commands: a folder to scan, a diffusers model to
# inspect, or (for node lookups) a name that is not a file.
DIRECTORY_MESSAGES = {"inspect": "neither a diffusers model folder nor a checkpoint file",
                      "add --parent": "no node", "compat": "no node"}


@pytest.mark.parametrize("kind", MESSAGES)
def test_every_command_refuses_an_input_that_is_not_a_regular_file(lmerge, tiny, tmp_path, kind):
    bad = _make_kind(kind, tmp_path)
    good = tiny("good.safetensors", 1)
    out = str(tmp_path / "out.safetensors")
    for command, args in _commands(bad, good, out).items():
        if kind == "directory" and command == "scan":
            continue  # scanning a folder is what scan is for
        with no_hang():
            code, stdout, err = lmerge(*args)
        message = DIRECTORY_MESSAGES.get(command, MESSAGES[kind]) if kind == "directory" else MESSAGES[kind]
        assert code == (2 if command == "compat" else 1), (command, stdout, err)  # compat: 1 means incompatible
        assert message in err and bad in err and err.count("\n") == 1, (command, err)
        assert not os.path.exists(out), command


def test_scan_reports_a_pipe_inside_the_folder_and_records_the_rest(lmerge, tiny, tmp_path):
    tiny("good.safetensors", 1)
    fifo = _make_kind("fifo", tmp_path)
    with no_hang():
        code, stdout, err = lmerge("scan", tmp_path)
    assert code == 1 and "recorded 1 file(s)" in stdout
    errors = [line for line in err.splitlines() if line.startswith("error: ")]  # (the rest: "reading ..." progress)
    assert errors == [f"error: {fifo}: {MESSAGES['fifo']}; lineage reads only regular files"]


def test_a_real_process_refuses_a_fifo_at_once(tmp_path):
    fifo = _make_kind("fifo", tmp_path)
    for command in ("inspect", "hash"):
        r = subprocess.run([sys.executable, "-m", "lineage", command, fifo], capture_output=True, text=True,
                           timeout=120, env={**os.environ, "LINEAGE_HOME": str(tmp_path)})
        assert r.returncode == 1 and r.stderr.strip() == (
            f"error: {fifo}: {MESSAGES['fifo']}; lineage reads only regular files"), r.stderr


def test_a_registry_that_is_a_pipe_is_refused(lmerge, tmp_path):
    fifo = _make_kind("fifo", tmp_path)
    with no_hang():
        code, _, err = lmerge("registry", "info", "--registry", fifo)
    assert code == 1 and MESSAGES["fifo"] in err and err.count("\n") == 1
