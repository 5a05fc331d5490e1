"""Read a checkpoint tensor by tensor, detect its layout and compute its identity hashes.

    python examples/inspect_a_checkpoint.py [WORK_DIR]
"""
import sys
import tempfile
from pathlib import Path

import lineage

work = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())
work.mkdir(parents=True, exist_ok=True)
# a generated UNet-only checkpoint in bf16: real SDXL key names, the UNet's widths / 80
path = lineage.write_base(work / "unet-only.safetensors", size="tiny", components=["unet"], dtype="BF16")

found = lineage.detect(path)
print(f"{path}: {found.format} ({found.variant}), {found.architecture}, {found.prediction_type}")

with lineage.SafetensorsFile(path) as f:  # nothing is loaded until asked for
    biggest = max(f.tensors.values(), key=lambda t: t.nbytes)
    weight = f.read(biggest.name)
    print(f"largest tensor {biggest.name} {list(weight.shape)} {weight.dtype}, "
          f"mean |w| {weight.float().abs().mean():.4f}")

hashes = lineage.hash_file(path)
print(f"AutoV2 [{hashes.autov2}]  AutoV3 {hashes.autov3[:12]}  CRC32 {hashes.crc32}")
