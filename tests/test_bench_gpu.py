"""tools/bench_gpu.py, the prepared device check, end to end on the CPU in its --smoke mode (tiny
shapes), so a device window is not spent debugging it."""
import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_bench_gpu_smoke_writes_the_table(tmp_path):
  env = dict(os.environ, OUT=str(tmp_path), PYTHONPATH=str(ROOT))
  out = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_gpu.py"), "--smoke"],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
  table = (tmp_path / "bench_gpu.md").read_text()
  runs = json.loads((tmp_path / "bench_gpu.json").read_text())["runs"]
  # One row per implementation choice of the default matrix, each measured (no error on the CPU:
  # 'auto' resolves to dit_jax's own attention here).
  choices = {(r["attention"], r["dense_dot"], r["remat"]) for r in runs}
  assert choices == {("own", "off", "off"), ("xla", "off", "off"), ("own", "on", "off"),
                     ("own", "off", "on")} and len(runs) == 4
  assert all("error" not in r and r["step_ms"] > 0 and r["compile_s"] > 0 for r in runs), runs
  assert table.count("\n| DiT-") == len(runs) and "| compile_s |" in table
