"""The demo `make demo` runs: a small generated SDXL family, inspected and hashed.

    python examples/demo.py [OUTPUT_DIR]     (default: ./demo-output)
"""
import sys
from pathlib import Path

import lineage
from lineage.inspection import format_report

out = Path(sys.argv[1] if len(sys.argv) > 1 else "demo-output")
out.mkdir(parents=True, exist_ok=True)

# A base, an epsilon fine-tune of it, and a v-prediction fine-tune of that (real SDXL key names,
# reduced widths: each file is ~60 MB and takes about a second to write).
base = lineage.write_base(out / "base.safetensors", seed=0)
child = lineage.write_child(base, out / "child.safetensors", seed=1)
vpred = lineage.write_child(child, out / "child-vpred.safetensors", seed=2, prediction_type="v+ztsnr")

for path in (base, child, vpred):
    print(format_report(lineage.inspect(path, with_hashes=True)))
    print()
