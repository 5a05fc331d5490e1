"""The streaming executor: runs jobs that read tensors from safetensors inputs and write one safetensors
output, in bounded memory, knowing nothing of SDXL or of merging (planners such as merge/planner.py
decide the jobs).

- jobs.py: what a job is (its sources, its outputs, its compute function);
- executor.py: running jobs on worker threads, writing their outputs in order, hashing;
- inputs.py: reading the inputs with pread and noticing when one changes under a run;
- budget.py: the buffer sizes and the memory estimate;
- device.py: the device a run computes on (`--device`);
- allocator.py, seeding.py: keeping freed memory during a run; per-tensor seeds.
"""
