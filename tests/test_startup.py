"""Commands that only read headers and recipes start without importing torch (or Triton): each runs in
a fresh interpreter that reports afterwards which of the two it loaded. No timing: what is imported
decides the start-up time (torch alone takes over a second)."""
import json
import subprocess
import sys

import pytest

from lineage.lazy import LazyDict, LazyModule

PROBE = """
import json, runpy, sys
sys.argv = ["lmerge", *sys.argv[1:]]
try:
    runpy.run_module("lineage", run_name="__main__")
finally:  # torch._C is imported by torch's own __init__: present once torch was really imported
    print(json.dumps(sorted(m for m in ("torch._C", "triton") if m in sys.modules)), file=sys.stderr)
"""


def _run(*args: str, cwd=None) -> tuple[int, str, list[str]]:
    result = subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], capture_output=True, text=True,
                            cwd=cwd, timeout=120)
    *messages, loaded = result.stderr.strip().splitlines()
    return result.returncode, result.stdout + "\n".join(messages), json.loads(loaded)


@pytest.fixture(scope="module")
def files(family, tmp_path_factory) -> dict[str, str]:
    from lineage.io.safetensors import save_file
    from lineage.lazy import torch

    d = tmp_path_factory.mktemp("startup")
    module = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    lora = d / "lora.safetensors"
    save_file({f"{module}.lora_down.weight": torch.ones(4, 10), f"{module}.lora_up.weight": torch.ones(10, 4)}, lora,
              {"ss_base_model_version": "sdxl_base_v1-0"})
    recipe = d / "r.toml"
    recipe.write_text(f'method = "ties"\n[params]\ndensity = 0.3\n[[inputs]]\npath = "{family["base"]}"\n'
                      f'[[inputs]]\npath = "{family["child"]}"\n[[inputs]]\npath = "{family["vchild"]}"\n')
    return {**family, "lora": str(lora), "recipe": str(recipe), "out": str(d / "merged.safetensors")}


COMMANDS = {
    "inspect": lambda f: ["inspect", f["child"]],
    "inspect --json --hash": lambda f: ["inspect", f["vchild"], "--json", "--hash"],
    "methods": lambda f: ["methods"],
    "compat": lambda f: ["compat", f["lora"], f["base"]],
    "merge --dry-run": lambda f: ["merge", f["base"], f["child"], "-o", f["out"], "--dry-run"],
    "merge --dry-run, blocks": lambda f: ["merge", f["base"], f["child"], "-o", f["out"], "--dry-run",
                                          "--preset", "supermerger", "--blocks", "IN04=0.2"],
    "merge --dry-run, recipe": lambda f: ["merge", "--recipe", f["recipe"], "-o", f["out"], "--dry-run",
                                          "--prediction-type", "epsilon"],
}


@pytest.mark.parametrize("name", COMMANDS)
def test_header_only_commands_do_not_import_torch(files, name):
    code, output, loaded = _run(*COMMANDS[name](files))
    assert code in (0, 1), output  # compat exits 1 for "incompatible"; anything else is a crash
    assert "Traceback" not in output and "error:" not in output, output
    assert output.strip()
    assert loaded == [], f"lmerge {name} imported {loaded}"


def test_the_probe_sees_torch_when_a_command_needs_it(files, tmp_path):
    """The check above can fail: a real merge imports torch, and the probe reports it."""
    code, output, loaded = _run("merge", files["base"], files["child"], "-o", tmp_path / "m.safetensors", "--no-record")
    assert code == 0, output
    assert "torch._C" in loaded


def test_lazy_torch_is_imported_once_when_threads_first_touch_it_together():
    """Worker threads that reach torch at the same moment all get the one fully initialised module
    (importlib.util.LazyLoader on Python 3.11 hands some of them a half-initialised one)."""
    script = """
import sys, threading
from lineage.lazy import torch
assert "torch" not in sys.modules
results, start = [], threading.Barrier(4)
def first_touch():
    start.wait()
    try:
        results.append(float(torch.ones(3).sum()))
    except Exception as e:
        results.append(repr(e))
threads = [threading.Thread(target=first_touch) for _ in range(4)]
[t.start() for t in threads]
[t.join() for t in threads]
print(results)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[3.0, 3.0, 3.0, 3.0]"


def test_lazy_dict_builds_on_first_use_only():
    built = []
    table = LazyDict(lambda: built.append(1) or {"a": 1, "b": 2})
    assert built == []
    assert table["a"] == 1 and "b" in table and "c" not in table and len(table) == 2 and dict(table) == {"a": 1, "b": 2}
    assert built == [1]


def test_lazy_module_forwards_to_the_real_module():
    import json as real

    stand_in = LazyModule("json")
    assert stand_in.dumps([1]) == real.dumps([1]) and "dumps" in dir(stand_in)
    with pytest.raises(AttributeError):
        stand_in.no_such_name  # noqa: B018


def test_dtype_sizes_match_torch():
    from lineage.io.safetensors import DTYPE_NAMES, DTYPE_SIZES, DTYPES

    assert DTYPES.keys() == DTYPE_SIZES.keys()
    assert {name: DTYPES[name].itemsize for name in DTYPES} == DTYPE_SIZES
    assert all(DTYPE_NAMES[dtype] == name for name, dtype in DTYPES.items())
