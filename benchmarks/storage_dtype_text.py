"""Text suite (default settings): SyMerge with τ stored in float32 vs bfloat16; one report per storage dtype.

    python benchmarks/storage_dtype_text.py [OUT_DIR]     (default docs/text/storage-bf16; ~8 min with experts cached)
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from symerge.suites.text import TextSuiteConfig, run_text_suite


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/text/storage-bf16")
    out.mkdir(parents=True, exist_ok=True)
    for storage in ("float32", "bfloat16"):
        base = TextSuiteConfig()
        cfg = base.model_copy(update={"methods": ["individual", "symerge"],
                                      "adapt": base.adapt.model_copy(update={"storage_dtype": storage})})
        with tempfile.TemporaryDirectory() as tmp:
            run_text_suite(cfg, Path(tmp) / "run", progress=False)
            shutil.copy(Path(tmp) / "run" / "report.json", out / f"report-{storage}.json")


if __name__ == "__main__":
    main()
