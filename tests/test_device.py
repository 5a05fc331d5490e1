"""`--device`: where a run computes (lineage/engine/device.py), carried by every JobContext; merge jobs move the
pieces they compute to it. This machine has no GPU: a stand-in for the device transfer shows the merge arithmetic
goes through it, and `--device cuda` is the one-line error a user without CUDA gets."""
from __future__ import annotations

import pytest
import torch

import lineage
from lineage.engine import executor, jobs
from lineage.engine.device import compute_device
from lineage.errors import LineageError
from lineage.io.safetensors import SafetensorsFile

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")


def test_the_cpu_is_the_default_device():
    assert compute_device(None) == compute_device("cpu") == torch.device("cpu")


@needs_no_cuda
@pytest.mark.parametrize("name, message", [("cuda", "--device cuda: no CUDA device is available"),
                                           ("cuda:1", "--device cuda:1: no CUDA device is available"),
                                           ("mps", "--device mps: only cpu and cuda are supported"),
                                           ("gpu!", r"--device gpu!: not a device \(cpu, cuda or cuda:N\)")])
def test_devices_that_are_not_here_are_clear_errors(name, message):
    with pytest.raises(LineageError, match=message):
        compute_device(name)


@needs_no_cuda
def test_merge_on_cuda_without_cuda_is_one_line_and_writes_nothing(lmerge, trio, tmp_path):
    out = tmp_path / "m.safetensors"
    code, stdout, stderr = lmerge("merge", trio["base"], trio["x"], "-o", out, "--device", "cuda", "--no-record")
    assert code != 0
    assert stderr.strip().splitlines() == [stderr.strip()] and "no CUDA device is available" in stderr
    assert not out.exists()


def tensors(path) -> dict[str, torch.Tensor]:
    with SafetensorsFile(path) as f:
        return dict(f.items())


@pytest.mark.parametrize("method, options", [("weighted_sum", {"alpha": 0.25}),  # in pieces
                                             ("geometric_median", {})])  # whole tensors
def test_merge_computes_on_what_the_context_moves_to_the_device(monkeypatch, trio, tmp_path, method, options):
    """A stand-in transfer that also shifts every value by 1: the merged tensors come out shifted by 1
    (both methods give back x + 1 when every input is), the copied ones are untouched."""
    paths = [trio["base"], trio["x"]] + ([trio["y"]] if method == "geometric_median" else [])
    reference = lineage.merge(paths, tmp_path / "cpu.safetensors", method=method, record=False, progress=False,
                              **options)
    moved = []

    def shifted_transfer(ctx, tensor):
        moved.append(tensor.numel())
        return tensor + 1.0

    monkeypatch.setattr(executor.JobContext, "to_device", shifted_transfer)
    lineage.merge(paths, tmp_path / "device.safetensors", method=method, record=False, progress=False, device="cpu",
                  **options)
    merged_keys = [step.key for step in reference.plan.steps if step.action == "merge"]
    expected, got = tensors(reference.path), tensors(tmp_path / "device.safetensors")
    assert merged_keys and sum(moved) == len(paths) * sum(expected[k].numel() for k in merged_keys)
    for key, value in expected.items():
        if key in merged_keys:
            assert torch.allclose(got[key].float(), value.float() + 1.0, atol=2e-3, rtol=1e-3), key
        else:
            assert torch.equal(got[key], value), key


def test_the_executor_hands_every_job_the_run_device(tmp_path):
    seen = []

    def compute(ctx: executor.JobContext) -> None:
        seen.append(ctx.device)
        ctx.outputs[0].fill_(1.0)

    planned = [jobs.Job((), (jobs.Output(f"t{i}", "F32", (2,)),), compute) for i in range(3)]
    executor.run_jobs([], planned, tmp_path / "o.safetensors", progress=False, device=torch.device("meta"))
    executor.run_jobs([], planned, tmp_path / "p.safetensors", progress=False)
    assert seen == [torch.device("meta")] * 3 + [torch.device("cpu")] * 3
