"""`lmerge convert`: what a pickle holds is written, refused with a clear error, or listed as left
out — never silently dropped (lineage/io/pickle_convert.py)."""
import sys

import safetensors.torch
import torch


def _convert(lmerge, tmp_path, obj, name="model.ckpt"):
    src, dst = tmp_path / name, tmp_path / "model.safetensors"
    torch.save(obj, src)
    code, out, err = lmerge("convert", src, dst)
    return code, out, err, src, dst


def _refused(result, message: str) -> None:
    code, _, err, src, dst = result
    assert code == 1 and err.startswith(f"error: {src}: ") and message in err and err.count("\n") == 1, err
    assert not dst.exists()


def test_two_entries_flattening_to_one_name_are_an_error(lmerge, tmp_path):
    result = _convert(lmerge, tmp_path, {"a": {"b": torch.ones(2)}, "a.b": torch.zeros(2)})
    _refused(result, "two entries flatten to the same tensor name 'a.b': ['a']['b'] and ['a.b']")


def test_sparse_meta_and_nested_tensors_are_errors(lmerge, tmp_path):
    _refused(_convert(lmerge, tmp_path, {"s": torch.eye(3).to_sparse()}), "tensor 's' is a sparse tensor")
    _refused(_convert(lmerge, tmp_path, {"m": torch.empty(2, device="meta")}),
             "tensor 'm' is a meta tensor: it has a shape but no data")
    _refused(_convert(lmerge, tmp_path, {"c": torch.ones(2, dtype=torch.complex64)}),
             "tensor 'c' has dtype torch.complex64, which safetensors cannot store")


def test_a_container_holding_itself_is_an_error_not_an_endless_walk(lmerge, tmp_path):
    looped = {"w": torch.ones(2)}
    looped["again"] = looped
    _refused(_convert(lmerge, tmp_path, looped), "entry 'again' contains itself")


def test_keys_that_make_no_name_are_errors(lmerge, tmp_path):
    _refused(_convert(lmerge, tmp_path, {("a", 1): torch.ones(1)}), "has a key of type tuple")
    _refused(_convert(lmerge, tmp_path, torch.ones(3)), "holds a tensor without a name")


def test_deep_nesting_is_converted_without_hitting_the_recursion_limit(lmerge, tmp_path):
    deep: object = torch.arange(3.0)
    for _ in range(3000):  # three times Python's default recursion limit
        deep = {"k": deep}
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20_000)  # pickling it needs the depth; converting it must not
    try:
        torch.save(deep, tmp_path / "deep.ckpt")
    finally:
        sys.setrecursionlimit(limit)
    code, out, err = lmerge("convert", tmp_path / "deep.ckpt", tmp_path / "deep.safetensors")
    assert code == 0, err
    got = safetensors.torch.load_file(str(tmp_path / "deep.safetensors"))
    assert list(got) == [".".join(["k"] * 3000)] and got[".".join(["k"] * 3000)].tolist() == [0, 1, 2]


def test_lists_keep_their_tensors_by_index_and_non_tensors_are_listed(lmerge, tmp_path):
    state = {"blocks": [torch.ones(1), (torch.zeros(2), 7)], "w": torch.full((2,), 3.0),
             "note": "trained on cats", "nothing": None}
    code, out, err, src, dst = _convert(lmerge, tmp_path,
                                        {"state_dict": state, "global_step": 12, "optimizer_states": [{"lr": 1e-4}]})
    assert code == 0, err
    got = safetensors.torch.load_file(str(dst))
    assert sorted(got) == ["blocks.0", "blocks.1.0", "w"]
    assert "wrote" in out and "(3 tensors)" in out
    assert err.strip() == ("left out 5 entries that are not tensors: global_step (beside state_dict, int), "
                           "optimizer_states (beside state_dict, list), blocks.1.1 (int), note (str), "
                           "nothing (NoneType)")
