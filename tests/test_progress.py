"""Live progress: the sweep's line (dit_jax/sweep/progress.py), fed by the metrics.jsonl the
members write, and a single run's bar (dit_jax/training/progress_bar.py); both off on a non-TTY."""
import io
import json
import time

from dit_jax.sweep import members as members_lib
from dit_jax.sweep import progress
from dit_jax.training import progress_bar


class Tty(io.StringIO):
  def isatty(self):
    return True


def _write_steps(path, steps, partial_tail=False):
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w") as f:
    for s in steps:
      f.write(json.dumps(dict(step=s, loss=0.5, steps_per_sec=3.0)) + "\n")
    f.write(json.dumps(dict(step=steps[-1], fid_digits_cnn=12.0)) + "\n")  # an evaluation row
    if partial_tail:
      f.write('{"step": 99')  # a line being written


def test_last_step_reads_the_last_training_row(tmp_path):
  path = tmp_path / "metrics.jsonl"
  assert progress.last_step(path) == 0  # not written yet
  _write_steps(path, list(range(50, 1001, 50)), partial_tail=True)
  assert progress.last_step(path) == 1000
  assert progress.last_step(path, tail_bytes=200) == 1000  # only the tail is read


def test_sweep_line_counts_steps_members_and_a_cost_weighted_eta(tmp_path):
  members = [members_lib.Member("big", "DiT-B/2", "ddpm", 0, 1000),
             members_lib.Member("small", "DiT-S/8", "ddpm", 0, 1000),
             members_lib.Member("mid", "DiT-S/4", "ddpm", 0, 500)]
  cost = {"big": 8.0, "small": 1.0, "mid": 1.0}
  tty = Tty()
  live = progress.Live(members, lambda run: tmp_path / run, cost, stream=tty)
  live.t0 = time.time() - 100  # 100 s elapsed
  _write_steps(tmp_path / "big" / "metrics.jsonl", [250, 500])
  live.poll(["big", "small"], force=True)
  assert live.bar.n == 500  # small has logged nothing yet
  assert live.done_fraction() == 0.5 * 8 / 10
  assert abs(live.eta_s() - 100 * 0.6 / 0.4) < 2  # by cost, not by steps (which would say 400 s)
  live.finished("big")
  _write_steps(tmp_path / "small" / "metrics.jsonl", [100])
  live.poll(["small"])  # right after a member finished: reads at once
  assert live.bar.n == 1100 and "members 1/3" in tty.getvalue() and "ETA" in tty.getvalue()
  live.close()


def test_sweep_line_is_off_on_a_non_tty(tmp_path):
  out = io.StringIO()
  live = progress.Live([members_lib.Member("a", "DiT-S/8", "ddpm", 0, 10)], lambda r: tmp_path,
                       {"a": 1.0}, stream=out)
  live.poll(["a"], force=True)
  live.finished("a")
  live.close()
  assert not live.enabled and out.getvalue() == ""
  assert not progress.Live([], lambda r: tmp_path, {}, stream=Tty(), enabled=False).enabled


def test_single_run_bar_shows_loss_and_steps_per_second():
  tty = Tty()
  assert progress_bar.wanted(tty) and not progress_bar.wanted(io.StringIO())
  w = progress_bar.ProgressWriter(400, start=100, stream=tty)
  w.write_scalars(125, dict(loss=0.25, steps_per_sec=7.5))
  w.write_scalars(125, dict(fid_digits_cnn=30.0))  # evaluation: no move
  assert w.bar.n == 125
  w.flush()
  assert "loss=0.25" in tty.getvalue() and "steps/s=7.5" in tty.getvalue()
  w.close()
