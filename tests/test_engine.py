"""The streaming engine on small generated checkpoints: results, pass-through keys, markers, blocks,
mismatches, NaN/Inf, determinism, metadata and recording."""
import hashlib
import json
from pathlib import Path

import pytest
import torch

from lineage.engine.budget import CHUNK_ELEMENTS
from lineage.errors import LineageError
from lineage.io.hashing import hash_file
from lineage.io.safetensors import SafetensorsFile, SafetensorsWriter, save_file
from lineage.merge.api import build_recipe, merge, plan
from lineage.merge.methods import get_method
from lineage.merge.planner import is_elementwise
from lineage.merge.ranking import SAMPLE_SIZE
from lineage.merge.recipe import Input, Recipe
from lineage.sdxl.blocks import block_of
from lineage.sdxl.detection import detect
from lineage.sdxl.layout import is_pass_through

POSITION_IDS = "conditioner.embedders.0.transformer.text_model.embeddings.position_ids"
LOGIT_SCALE = "conditioner.embedders.1.model.logit_scale"


def _tensors(path):
    with SafetensorsFile(path) as f:
        return {k: f.read(k) for k in f.keys()}, f.metadata


def test_weighted_sum_is_lerp_in_fp32_rounded_once(trio, tmp_path):
    out = merge([trio["base"], trio["x"]], tmp_path / "m.safetensors", alpha=0.3, record=False)
    merged, _ = _tensors(out.path)
    a, _ = _tensors(trio["base"])
    b, _ = _tensors(trio["x"])
    assert list(merged) == list(a)  # the first model's key order
    for key, value in merged.items():
        if is_pass_through(key) or not value.is_floating_point():
            assert torch.equal(value, a[key]) and value.dtype == a[key].dtype
        else:
            assert torch.equal(value, torch.lerp(a[key].float(), b[key].float(), 0.3).half()), key
    assert merged[POSITION_IDS].dtype == torch.int64 and torch.equal(merged[POSITION_IDS], a[POSITION_IDS])
    assert torch.equal(merged[LOGIT_SCALE], a[LOGIT_SCALE])


@pytest.mark.slow
@pytest.mark.parametrize("method, order, alpha", [("weighted_sum", ("base", "x"), 0.3),
                                                 ("add_difference", ("x", "y", "base"), 0.7)])
def test_equals_sd_mecha_to_fp16_rounding(trio, tmp_path, method, order, alpha):
    sd_mecha = pytest.importorskip("sd_mecha")
    paths = [trio[n] for n in order]
    ours = merge(paths, tmp_path / "ours.safetensors", method=method, alpha=alpha, record=False)
    models = [sd_mecha.model(p) for p in paths]
    sd_mecha.merge(getattr(sd_mecha, method)(*models, alpha=alpha), output=tmp_path / "mecha.safetensors",
                   merge_dtype=torch.float32, output_dtype=torch.float16)
    mine, _ = _tensors(ours.path)
    theirs, _ = _tensors(tmp_path / "mecha.safetensors")
    assert set(mine) == set(theirs)
    compared = 0
    for key, value in mine.items():
        if is_pass_through(key):  # sd-mecha writes position_ids as fp16; we keep them as they are
            continue
        ulp = torch.finfo(torch.float16).eps * value.float().abs().clamp(min=2**-14)
        assert ((value.float() - theirs[key].float()).abs() <= ulp).all(), key
        compared += 1
    assert compared == len(mine) - 2


def test_block_weights_touch_exactly_their_block(trio, tmp_path):
    """alpha 0 everywhere except IN04 = 1: IN04's keys are B's, every other key is A's."""
    out = merge([trio["base"], trio["x"]], tmp_path / "m.safetensors", alpha=0.0, blocks="IN04=1",
                preset="supermerger", record=False)
    merged, _ = _tensors(out.path)
    a, _ = _tensors(trio["base"])
    b, _ = _tensors(trio["x"])
    in_block = [k for k in merged if block_of(k, "supermerger") == "IN04"]
    assert len(in_block) > 20
    for key, value in merged.items():
        source = b if key in in_block else a
        assert torch.equal(value, source[key]), key
    assert not torch.equal(a[in_block[0]], b[in_block[0]])  # so the test can tell A from B


def test_a_preset_that_leaves_keys_unmerged_copies_the_first_model(trio, tmp_path):
    result = merge([trio["base"], trio["x"]], tmp_path / "m.safetensors", blocks=",".join(["1"] * 20),
                   preset="supermerger-legacy", record=False)
    merged, _ = _tensors(result.path)
    a, _ = _tensors(trio["base"])
    b, _ = _tensors(trio["x"])
    # time_embed/label_emb, and the keys without weight/bias in their names (OpenCLIP-G's positional
    # embedding and text projection): model A's
    kept_keys = [k for k in merged if ".time_embed." in k or ".label_emb." in k or k.endswith(".positional_embedding")
                 or k.endswith(".text_projection")]
    assert kept_keys and all(torch.equal(merged[k], a[k]) for k in kept_keys)
    assert torch.equal(merged["model.diffusion_model.out.2.weight"], b["model.diffusion_model.out.2.weight"])
    assert result.plan.counts()["copy (not merged by the block preset)"] == len(kept_keys)


def test_different_prediction_types_are_refused_unless_one_is_chosen(family, tmp_path):
    with pytest.raises(LineageError, match=r"different prediction types .*epsilon.*v\+ztsnr"):
        merge([family["child"], family["vchild"]], tmp_path / "m.safetensors", record=False)
    assert not (tmp_path / "m.safetensors").exists()
    v = merge([family["child"], family["vchild"]], tmp_path / "v.safetensors", prediction_type="v+ztsnr", record=False)
    eps = merge([family["child"], family["vchild"]], tmp_path / "e.safetensors", prediction_type="epsilon",
                record=False)
    assert detect(v.path).prediction_type == "v+ztsnr"
    assert detect(eps.path).prediction_type == "epsilon"
    with SafetensorsFile(v.path) as f:
        assert {"v_pred", "ztsnr"} <= set(f.keys()) and f.metadata["modelspec.prediction_type"] == "v"
    with SafetensorsFile(eps.path) as f:
        assert not {"v_pred", "ztsnr"} & set(f.keys()) and f.metadata["modelspec.prediction_type"] == "epsilon"


def test_markers_come_through_unchanged(family, tmp_path):
    result = merge([family["vchild"], family["vchild"]], tmp_path / "m.safetensors", alpha=0.5, record=False)
    merged, _ = _tensors(result.path)
    original, _ = _tensors(family["vchild"])
    for marker in ("v_pred", "ztsnr"):
        assert torch.equal(merged[marker], original[marker]) and merged[marker].dtype == original[marker].dtype


def _without(src, dst, drop=(), reshape=None):
    """A copy of `src` without the keys `drop` and with `reshape` key -> new shape (zeros)."""
    with SafetensorsFile(src) as f:
        plan = {k: (i.dtype, reshape[k] if reshape and k in reshape else i.shape) for k, i in f.tensors.items()
                if k not in drop}
        with SafetensorsWriter(dst, plan) as w:
            for k, (_dtype, shape) in plan.items():
                replaced = reshape and k in reshape
                w.write(k, torch.zeros(shape, dtype=f.tensors[k].torch_dtype) if replaced else f.read(k))
    return str(dst)


def test_missing_keys_and_shape_disagreements(trio, tmp_path):
    missing = "model.diffusion_model.out.2.bias"
    odd = "model.diffusion_model.out.0.weight"
    other = _without(trio["x"], tmp_path / "other.safetensors", drop=[missing], reshape={odd: (3,)})
    with pytest.raises(LineageError) as e:
        merge([trio["base"], other], tmp_path / "m.safetensors", record=False)
    assert missing in str(e.value) and odd in str(e.value) and "lacks 1" in str(e.value)
    assert not (tmp_path / "m.safetensors").exists()

    first = merge([trio["base"], other], tmp_path / "first.safetensors", mismatch="first", record=False)
    dropped = merge([trio["base"], other], tmp_path / "drop.safetensors", mismatch="drop", record=False)
    a, _ = _tensors(trio["base"])
    merged_first, _ = _tensors(first.path)
    merged_drop, _ = _tensors(dropped.path)
    assert torch.equal(merged_first[missing], a[missing]) and torch.equal(merged_first[odd], a[odd])
    assert missing not in merged_drop and odd not in merged_drop and len(merged_drop) == len(a) - 2


def test_nonfinite_inputs_are_reported_with_the_key_or_fail(trio, tmp_path):
    key = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    tensors, _ = _tensors(trio["x"])
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[5] = float("nan")
    broken = tmp_path / "nan.safetensors"
    save_file(tensors, broken)
    result = merge([trio["base"], broken], tmp_path / "m.safetensors", record=False)
    assert result.nonfinite == [(str(broken), key)]
    with pytest.raises(LineageError, match=f"{key}.*NaN or Inf"):
        merge([trio["base"], broken], tmp_path / "f.safetensors", record=False, fail_on_nonfinite=True)
    assert not (tmp_path / "f.safetensors").exists()


def test_same_recipe_same_bytes_including_random_methods(trio, tmp_path):
    inputs = [trio["base"], trio["x"], trio["y"]]
    one = merge(inputs, tmp_path / "a.safetensors", method="dare_ties", params={"density": 0.3}, seed=5,
                record=False, workers=1)
    two = merge(inputs, tmp_path / "b.safetensors", method="dare_ties", params={"density": 0.3}, seed=5,
                record=False, workers=3)
    other_seed = merge(inputs, tmp_path / "c.safetensors", method="dare_ties", params={"density": 0.3}, seed=6,
                       record=False)
    assert one.autov3 == two.autov3 == hash_file(two.path).autov3
    assert other_seed.autov3 != one.autov3


def test_output_dtypes(trio, tmp_path):
    for dtype, stored in (("bf16", "BF16"), ("fp32", "F32")):
        result = merge([trio["base"], trio["x"]], tmp_path / f"{dtype}.safetensors", dtype=dtype, record=False)
        with SafetensorsFile(result.path) as f:
            assert f.tensors["model.diffusion_model.out.2.weight"].dtype == stored
            assert f.tensors[POSITION_IDS].dtype == "I64"


def test_output_equal_to_an_input_is_refused(trio):
    with pytest.raises(LineageError, match="one of the inputs"):
        merge([trio["base"], trio["x"]], trio["x"], record=False)


def test_a_failing_write_leaves_nothing_and_inputs_intact(small_pair, tmp_path, monkeypatch):
    import errno
    import os

    before = [hash_file(p).sha256 for p in (small_pair["base"], small_pair["x"])]
    real_pwrite, calls = os.pwrite, []

    def full_disk(fd, data, offset):
        calls.append(offset)
        if len(calls) > 2:  # the third 16 MiB block of a ~60 MB output: midway
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", full_disk)
    with pytest.raises(LineageError, match="No space left"):
        merge([small_pair["base"], small_pair["x"]], tmp_path / "m.safetensors", record=False)
    monkeypatch.undo()
    assert len(calls) > 2
    assert os.listdir(tmp_path) == []  # neither the destination nor a partial file
    assert [hash_file(p).sha256 for p in (small_pair["base"], small_pair["x"])] == before


def test_metadata_carries_the_record_modelspec_and_a1111_ancestry(trio, tmp_path):
    first = merge([trio["base"], trio["x"]], tmp_path / "first.safetensors", alpha=0.4, record=False)
    second = merge([first.path, trio["y"]], tmp_path / "second.safetensors", alpha=0.5, record=False)
    _, meta = _tensors(second.path)
    record = json.loads(meta["lineage.record"])
    hashes = {p: hash_file(p).autov3 for p in (trio["base"], trio["x"], trio["y"], first.path)}
    assert record["method"] == "weighted_sum" and record["params"] == {"alpha": 0.5}
    assert [(i["path"], i["autov3"]) for i in record["inputs"]] == [("first.safetensors", hashes[first.path]),
                                                                    ("y.safetensors", hashes[trio["y"]])]
    assert record["weights"] == [0.5, 0.5] and record["library"].startswith("lineage ")
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    assert meta["modelspec.merged_from"] == "first, y"
    assert meta["modelspec.hash_sha256"] == "0x" + hash_file(second.path).autov3 == "0x" + second.autov3
    # A1111's keys name the inputs as A1111's merger does: by the sha256 of the whole file
    sha256 = {p: hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in hashes}
    recipe = json.loads(meta["sd_merge_recipe"])
    assert recipe["interp_method"] == "Weighted sum" and recipe["multiplier"] == 0.5
    assert recipe["primary_model_hash"] == sha256[first.path] and recipe["secondary_model_hash"] == sha256[trio["y"]]
    ancestry = json.loads(meta["sd_merge_models"])  # the first merge's own inputs are folded in
    assert set(ancestry) == {sha256[trio["base"]], sha256[trio["x"]], sha256[first.path], sha256[trio["y"]]}
    assert ancestry[sha256[first.path]]["sd_merge_recipe"]["secondary_model_hash"] == sha256[trio["x"]]
    assert ancestry[sha256[trio["y"]]]["name"] == "y.safetensors"
    assert ancestry[sha256[trio["y"]]]["legacy_hash"] == hash_file(trio["y"]).autov1
    assert Recipe.from_dict(record).inputs[0] == Input("first.safetensors", hashes[first.path], "first")


def test_merges_are_recorded_with_weighted_edges(trio, tmp_path, isolated_registry):
    from lineage.graph.registry import Registry

    result = merge([trio["base"], trio["x"]], tmp_path / "m.safetensors", alpha=0.25)
    with Registry(isolated_registry) as reg:
        graph = reg.user_graph()
    parents = {p: graph.edges[p, result.node] for p in graph.predecessors(result.node)}
    assert result.node == result.autov3
    assert {p: e["weight"] for p, e in parents.items()} == {hash_file(trio["base"]).autov3: 0.75,
                                                            hash_file(trio["x"]).autov3: 0.25}
    assert all(e["relation"] == "merge" for e in parents.values())
    # an input the registry has seen is not hashed again
    again = merge([trio["base"], trio["x"]], tmp_path / "m2.safetensors", alpha=0.25)
    assert again.autov3 == result.autov3


def test_a_changed_input_is_caught(trio, tmp_path):
    recipe = build_recipe([trio["base"], trio["x"]])
    wrong = Recipe(recipe.method, (Input(trio["base"], "0" * 64), recipe.inputs[1]))
    with pytest.raises(LineageError, match="is not the expected input"):
        merge(wrong, tmp_path / "m.safetensors", record=False)
    assert not (tmp_path / "m.safetensors").exists()


def test_dry_run_plan(trio):
    p = plan(build_recipe([trio["base"], trio["x"], trio["y"]], method="ties", params={"density": 0.2}))
    summary = p.summary()
    assert summary["steps"] == {"ties": 2513, "pass (pass-through)": 2}
    with SafetensorsFile(trio["base"]) as f:
        data_bytes = sum(info.end - info.begin for info in f.tensors.values())
    assert summary["output_bytes"] == sum(s.nbytes for s in p.steps) == data_bytes  # all the base's tensors
    assert summary["memory_estimate_bytes"] > 0
    assert "2513  ties" in p.describe()


KILLED_MERGE = """
import sys, time
from lineage.io.safetensors import SafetensorsWriter
from lineage.merge.api import merge

slow_write = SafetensorsWriter.write
def write(self, name, tensor):  # slow the merge down so it is surely killed midway
    if self._written == 100:
        print("writing", flush=True)  # the test kills us from here on
    time.sleep(0.01)
    slow_write(self, name, tensor)
SafetensorsWriter.write = write
merge(sys.argv[1:3], sys.argv[3], record=False, progress=False)
"""


def test_a_killed_merge_leaves_nothing_at_the_destination(trio, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    before = [hash_file(p).sha256 for p in (trio["base"], trio["x"])]
    out = tmp_path / "out" / "m.safetensors"
    out.parent.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", KILLED_MERGE, trio["base"], trio["x"], str(out)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "writing\n"  # 100 tensors are in the output file
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    # On Linux the output was an anonymous file (O_TMPFILE) until complete: the kill leaves no trace.
    assert os.listdir(out.parent) == []
    assert [hash_file(p).sha256 for p in (trio["base"], trio["x"])] == before


def test_recording_a_merge_reads_no_file_again(trio, tmp_path, monkeypatch):
    """The output's AutoV3 comes from the write stream, the inputs' from the run's own hashing."""
    import lineage.graph.recording as recording
    from lineage.graph.registry import Registry

    registry = tmp_path / "reg.sqlite"
    hashed = []
    real_hash_file = recording.hash_file
    monkeypatch.setattr(recording, "hash_file", lambda p: hashed.append(str(p)) or real_hash_file(p))
    out = merge([trio["base"], trio["x"]], tmp_path / "m.safetensors", alpha=0.5, registry=registry)
    assert hashed == []  # neither the output nor the inputs (new to this registry) are read again
    assert out.node == out.autov3 == hash_file(out.path).autov3
    with Registry(registry) as reg:
        assert reg.node(out.node)["hashes"] == {"autov3": out.autov3}
        assert set(reg.user_graph().predecessors(out.node)) == {hash_file(p).autov3 for p in (trio["base"], trio["x"])}


def test_a1111_keys_are_read_back_as_whole_file_hashes_of_the_recorded_inputs(trio, tmp_path):
    """A reader that knows only A1111's convention (64 hex digits = the whole file's sha256) finds the
    inputs: scanning the merge stripped of our own record links it to the input files' nodes."""
    from lineage.graph.recording import scan_file
    from lineage.graph.registry import Registry

    registry = tmp_path / "reg.sqlite"
    merged = merge([trio["base"], trio["x"]], tmp_path / "m.safetensors", alpha=0.3, registry=registry)
    tensors, meta = _tensors(merged.path)
    a1111_only = {k: v for k, v in meta.items() if k.startswith("sd_merge_")}
    save_file(tensors, tmp_path / "a1111.safetensors", metadata=a1111_only)
    with Registry(registry) as reg:
        node = scan_file(tmp_path / "a1111.safetensors", reg)
        parents = reg.graph().pred[node]
        assert set(parents) == {hash_file(trio["base"]).autov3, hash_file(trio["x"]).autov3}
        assert [parents[hash_file(p).autov3]["weight"] for p in (trio["base"], trio["x"])] == [0.7, 0.3]


def test_known_input_hashes_come_from_one_registry_lookup(trio, tmp_path, monkeypatch):
    from lineage.graph.registry import Registry

    registry = tmp_path / "reg.sqlite"
    merge([trio["base"], trio["x"]], tmp_path / "first.safetensors", registry=registry)  # the registry sees the inputs
    lookups = []
    real_known_file = Registry.known_file
    monkeypatch.setattr(Registry, "known_file", lambda self, p: lookups.append(str(p)) or real_known_file(self, p))
    hashed = []
    monkeypatch.setattr("lineage.engine.inputs.InputFile.data_autov3", lambda self, stop=None: hashed.append(self.path))
    again = merge([trio["base"], trio["x"]], tmp_path / "again.safetensors", alpha=0.2, registry=registry)
    assert lookups == [trio["base"], trio["x"]] and hashed == []  # looked up once, not hashed, not looked up again
    assert again.recipe.inputs[0].autov3 == hash_file(trio["base"]).autov3
    # the whole-file sha256 that A1111's keys need was kept from the first merge's hashing pass too
    _, meta = _tensors(again.path)
    assert json.loads(meta["sd_merge_recipe"])["primary_model_hash"] == hash_file(trio["base"]).sha256


LARGE_KEY = "model.diffusion_model.lineage_test_large.weight"  # an extra key: 600,000 entries


@pytest.fixture(scope="module")
def trio_with_a_large_tensor(trio, tmp_path_factory):
    """The trio plus one 600,000-entry tensor each: above the statistics' sample size and spanning
    three engine chunks (the small checkpoints' largest tensors have 294,912 entries)."""
    d = tmp_path_factory.mktemp("trio_large")
    g = torch.Generator().manual_seed(3)
    base_large = torch.randn(600, 1000, generator=g)
    paths = {}
    for n, name in enumerate(("base", "x", "y")):
        tensors, metadata = _tensors(trio[name])
        tensors[LARGE_KEY] = (base_large + (0.1 * torch.randn(600, 1000, generator=g) if n else 0)).half()
        paths[name] = str(d / f"{name}.safetensors")
        save_file(tensors, paths[name], metadata)
    return paths


@pytest.mark.parametrize("method, params", [("ties", {"density": 0.2}),
                                            ("ties", {"density": 0.5, "weights": [1.0, 2.0], "alpha": 0.8}),
                                            ("breadcrumbs", {"density": 0.8, "gamma": 0.05})])
def test_chunked_methods_with_statistics_equal_the_whole_tensor_method(trio_with_a_large_tensor, tmp_path,
                                                                       method, params):
    """The engine runs breadcrumbs chunk by chunk, and TIES through its compiled loop over the stored
    tensors, after computing their thresholds from the ranking entries; the output must be
    bit-identical to the method on whole fp32 tensors."""
    paths = [trio_with_a_large_tensor[n] for n in ("base", "x", "y")]
    assert is_elementwise(get_method(method))
    out = merge(paths, tmp_path / "m.safetensors", method=method, params=params, record=False)
    merged, _ = _tensors(out.path)
    inputs = [_tensors(p)[0] for p in paths]
    assert merged[LARGE_KEY].numel() > max(CHUNK_ELEMENTS, SAMPLE_SIZE)
    compared = 0
    for key, value in merged.items():
        if is_pass_through(key) or not value.is_floating_point() or value.numel() == 0:
            continue
        whole = get_method(method).fn(*(i[key].float() for i in inputs), **params).half()
        assert torch.equal(value, whole), key
        compared += 1
    assert compared == len(merged) - 2


def test_a_merge_whose_recording_fails_still_succeeds_and_says_how_to_record_it(lmerge, trio, tmp_path, monkeypatch,
                                                                                isolated_registry):
    from lineage.graph.registry import Registry

    # A model merged with itself is the same tensors: the registry refuses it as its own parent.
    same = tmp_path / "same.safetensors"
    code, stdout, stderr = lmerge("merge", trio["x"], trio["x"], "-o", same)
    assert code == 0 and same.exists() and f"wrote {same}" in stdout
    assert "was written but not recorded in the registry" in stderr and "cannot descend from itself" in stderr
    assert stderr.count("\n") == 1

    # A transient failure: the command the warning gives records the merge later, with its parents.
    import lineage.graph.recording as recording

    def locked(*args, **kwargs):
        raise LineageError("database is locked", isolated_registry)

    out = tmp_path / "m.safetensors"
    with monkeypatch.context() as patched:
        patched.setattr(recording, "record", locked)
        code, stdout, stderr = lmerge("merge", trio["base"], trio["x"], "-o", out, "--json")
    assert code == 0 and json.loads(stdout)["record_error"].endswith("database is locked")
    hint = stderr.split("record it later with `")[1].split("`")[0]
    code, _, stderr = lmerge(*hint.split()[1:])
    assert code == 0, stderr
    autov3 = hash_file(out).autov3
    with Registry(isolated_registry) as reg:
        parents = set(reg.user_graph().predecessors(autov3))
    assert parents == {hash_file(trio["base"]).autov3, hash_file(trio["x"]).autov3}


def _with_markers(src, dst, markers):
    tensors, metadata = _tensors(src)
    for m in ("v_pred", "ztsnr"):
        tensors.pop(m, None)
    tensors.update({m: torch.empty(0) for m in markers})
    save_file(tensors, dst, metadata)
    return str(dst)


def test_epsilon_with_zero_terminal_snr_is_never_written(lmerge, trio, tmp_path):
    """Loaders read `ztsnr` only with `v_pred`: a file carrying `ztsnr` alone would load as plain epsilon."""
    from lineage.sdxl.synthetic import write_base

    a = _with_markers(trio["base"], tmp_path / "a.safetensors", ["ztsnr"])
    b = _with_markers(trio["x"], tmp_path / "b.safetensors", ["ztsnr"])
    assert detect(a).prediction_type == "epsilon+ztsnr"  # still read as what it is
    out = tmp_path / "m.safetensors"
    for args in ((a, b), (trio["base"], trio["x"], "--prediction-type", "epsilon+ztsnr")):
        code, _, stderr = lmerge("merge", *args, "-o", out)
        assert code == 1 and "will not write prediction type 'epsilon+ztsnr'" in stderr and "v_pred" in stderr
        assert stderr.count("\n") == 1 and not out.exists()
    merged = merge([a, b], out, prediction_type="v+ztsnr", record=False)  # a choice loaders read
    assert detect(merged.path).prediction_type == "v+ztsnr"
    with pytest.raises(LineageError, match="unknown prediction type 'epsilon\\+ztsnr'"):
        write_base(tmp_path / "g.safetensors", prediction_type="epsilon+ztsnr")
    code, stdout, _ = lmerge("generate", "--help")
    assert "v+ztsnr" in stdout and "epsilon+ztsnr" not in stdout


def test_published_metadata_and_saved_recipes_carry_no_local_paths(lmerge, trio, tmp_path, monkeypatch):
    import os
    import shutil

    work = tmp_path / "work"
    (work / "recipes").mkdir(parents=True)
    out = work / "m.safetensors"
    recipe = work / "recipes" / "r.toml"
    code, _, stderr = lmerge("merge", trio["base"], trio["x"], "-o", out, "--alpha", "0.3", "--save-recipe", recipe,
                             "--no-record")
    assert code == 0, stderr
    with SafetensorsFile(out) as f:
        header = out.read_bytes()[8:f.data_start].decode()
    folders = {os.path.dirname(trio["base"]), str(tmp_path)}
    assert not any(folder in header for folder in folders)
    record = json.loads(json.loads(header.rstrip())["__metadata__"]["lineage.record"])
    assert [i["path"] for i in record["inputs"]] == ["base.safetensors", "x.safetensors"]
    text = recipe.read_text()
    assert not any(folder in text for folder in folders)
    relative = os.path.relpath(trio["base"], recipe.parent)
    assert f'path = "{relative}"' in text
    # The saved recipe works from anywhere: its paths are relative to the recipe file.
    monkeypatch.chdir(tmp_path)
    code, _, stderr = lmerge("merge", "--recipe", recipe, "-o", work / "again.safetensors", "--no-record")
    assert code == 0, stderr
    assert hash_file(work / "again.safetensors").autov3 == hash_file(out).autov3
    # reproduce finds the inputs next to the merged file (the registry has never seen them).
    moved = tmp_path / "moved"
    moved.mkdir()
    for path in (out, trio["base"], trio["x"]):
        shutil.copy(path, moved)
    code, stdout, stderr = lmerge("reproduce", moved / "m.safetensors")
    assert code == 0, stderr
    assert f"input {moved / 'base.safetensors'}" in stdout and "matches" in stdout


def test_statistics_get_each_inputs_whole_flat_tensor_as_stored(trio, tmp_path, monkeypatch):
    """The contract exact thresholds build on: `statistics([flat input 0, flat input 1, ...], params)`."""
    from lineage.merge import methods

    seen = []

    def statistics(inputs, params):
        seen.append([(x.dtype, tuple(x.shape)) for x in inputs])
        return [float(x.float().abs().max()) for x in inputs]

    def scaled(a, b, *, statistics=None):
        return b * (statistics[0] / max(statistics[1], 1e-30)) if statistics else b

    monkeypatch.setitem(methods.METHODS, "scaled", methods.MergeMethod(
        "scaled", scaled, needs_base=False, min_models=2, max_models=2, random=False, elementwise=True,
        statistics=statistics))
    merged, _ = _tensors(merge([trio["base"], trio["x"]], tmp_path / "m.safetensors", method="scaled",
                               record=False).path)
    a, _ = _tensors(trio["base"])
    b, _ = _tensors(trio["x"])
    merged_keys = [k for k in a if not is_pass_through(k)]
    assert len(seen) == len(merged_keys)
    assert all(len(call) == 2 and call[0] == call[1] and call[0][0] == torch.float16 for call in seen)
    assert sorted(call[0][1] for call in seen) == sorted((a[k].numel(),) for k in merged_keys)
    key = "model.diffusion_model.out.2.weight"
    scale = a[key].float().abs().max() / b[key].float().abs().max()
    assert torch.equal(merged[key], (b[key].float() * scale).half())


@pytest.mark.parametrize("method", ["weighted_sum", "slerp"])  # chunked, and whole fp32 tensors
def test_inputs_stored_as_fp32_are_read_straight_into_the_fp32_buffers(trio, tmp_path, method):
    paths = []
    for name in ("base", "x"):
        tensors, metadata = _tensors(trio[name])
        paths.append(str(tmp_path / f"{name}32.safetensors"))
        save_file({k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}, paths[-1], metadata)
    merged, _ = _tensors(merge(paths, tmp_path / "m.safetensors", method=method, alpha=0.3, dtype="fp32",
                               record=False).path)
    a, _ = _tensors(paths[0])
    b, _ = _tensors(paths[1])
    for key in ("model.diffusion_model.out.2.weight", "conditioner.embedders.1.model.token_embedding.weight"):
        assert torch.equal(merged[key], get_method(method).fn(a[key], b[key], alpha=0.3)), key


# (fp16 into fp16 runs through the same loop in test_chunked_methods_with_statistics_equal_the_whole_tensor_method)
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


@pytest.mark.parametrize("stored, out_dtype", [((BF16, BF16, BF16), "bf16"), ((FP32, FP32, FP32), "fp16"),
                                               ((FP16, FP16, BF16), "fp16"), ((BF16, FP32, FP16), "bf16")])
def test_ties_runs_its_compiled_loop_on_the_stored_tensors(trio_with_a_large_tensor, tmp_path, monkeypatch,
                                                           stored, out_dtype):
    """On the CPU, TIES goes from the stored inputs (fp16, bf16 or fp32, a dtype per file: an fp16 and a
    bf16 fine-tune are merged too) straight into the output dtype in one compiled loop
    (methods.MergeMethod.stored_loop): bit-identical to the method on whole fp32 tensors rounded to that
    dtype, with a NaN in the base and ±Inf in a model listed as such."""
    import dataclasses

    from lineage.io.safetensors import DTYPES as TORCH_DTYPES
    from lineage.merge import methods
    from lineage.merge.recipe import DTYPES

    paths = []
    for name, dtype in zip(("base", "x", "y"), stored, strict=True):
        tensors, metadata = _tensors(trio_with_a_large_tensor[name])
        tensors = {k: v.to(dtype) if v.is_floating_point() and v.numel() else v for k, v in tensors.items()}
        large = tensors[LARGE_KEY].view(-1)
        if name == "base":
            large[17] = float("nan")
        if name == "y":
            large[100_001], large[400_003] = float("inf"), float("-inf")
        paths.append(str(tmp_path / f"{name}.safetensors"))
        save_file(tensors, paths[-1], metadata)
    ties = methods.METHODS["ties"]
    calls = []

    def counted(out, inputs, params):
        calls.append([t.dtype for t in (out, *inputs)])
        return ties.stored_loop(out, inputs, params)

    monkeypatch.setitem(methods.METHODS, "ties", dataclasses.replace(ties, stored_loop=counted))
    params = {"density": 0.3, "weights": [1.0, 2.0], "alpha": 0.8}
    result = merge(paths, tmp_path / "m.safetensors", method="ties", params=params, dtype=out_dtype, record=False)
    assert result.nonfinite == [(paths[0], LARGE_KEY), (paths[2], LARGE_KEY)]
    merged, _ = _tensors(result.path)
    inputs = [_tensors(p)[0] for p in paths]
    want_dtype = TORCH_DTYPES[DTYPES[out_dtype]]
    assert len(calls) == sum(step.action == "merge" for step in result.plan.steps)
    assert all(dtypes == [want_dtype, *stored] for dtypes in calls)
    for key in (LARGE_KEY, "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"):
        whole = ties.fn(*(i[key].float() for i in inputs), **params).to(want_dtype)
        assert merged[key].dtype == want_dtype
        assert torch.equal(merged[key].view(torch.uint8), whole.view(torch.uint8)), key  # NaN bits too
