"""The prepared GPU check runs its code paths on the CPU (`--dry`): a GPU session should not be the first to find a
crash in it. Its figures mean nothing at tiny sizes; its checks (parity with the sequential loops, host reads per
round) still hold."""

import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_gpu_check_dry_run_passes(tmp_path):
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "gpu_check.py"), "--dry", "--json", str(tmp_path / "rows.json")],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    rows = (tmp_path / "rows.json").read_text()
    for check in ("parity", "syncs", "throughput", "end to end", "layers"):
        assert f'"check": "{check}"' in rows
