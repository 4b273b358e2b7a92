"""experiments/summary.py: the verdict rules and the generated "paper vs ours" table in the README."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: experiments/
from experiments import summary  # noqa: E402

NAN = float("nan")


def test_verdicts():
  assert summary.better(0.02, 0.01, 0.03) == "yes"
  assert summary.better(0.02, -0.01, 0.05) == "not resolved"
  assert summary.better(-0.02, -0.03, -0.01).startswith("no")
  assert summary.better(0.02, NAN, NAN).startswith("not resolved")
  assert summary.same(0.001, -0.005, 0.007) == "yes"
  assert summary.same(0.001, -0.02, 0.02) == "not resolved"
  assert summary.same(0.05, 0.02, 0.08) == "no"


def _main_json(diffs):
  pairs = ("repopt-repvgg", "repopt-vgg", "repvgg-vgg")
  return {"config": {"seeds": [0, 1, 2]}, "train_s_per_epoch": {"repopt": 50.0, "repvgg": 120.0, "vgg": 48.0},
          "diffs": [{"pair": p, "mean": m, "low": lo, "high": hi} for p, (m, lo, hi) in zip(pairs, diffs)],
          "results": {"repopt": [{"wall_s": 60, "cpu_s": 120}]}, "search": {"wall_s": 600, "cpu_s": 900}}


def test_table_and_readme_markers(tmp_path):
  res = tmp_path / "results"
  res.mkdir()
  (res / "main_comparison.json").write_text(json.dumps(
      _main_json([(0.001, -0.004, 0.006), (0.15, 0.12, 0.18), (0.14, 0.11, 0.17)])))
  text = summary.table(str(res))
  lines = [l for l in text.splitlines() if l.startswith("| RepOpt")]
  assert "| RepOpt-VGG matches RepVGG's accuracy | 78.48 vs 78.42 (+0.06) | +0.10 pts [-0.40, +0.60], 3 seeds | yes |" \
      in text
  assert any("beats the plain VGG" in l and "| yes |" in l for l in lines)
  assert any("trains faster" in l and "2.40x" in l for l in lines)

  readme = tmp_path / "README.md"
  readme.write_text(f"# title\n\nintro\n\n{summary.BEGIN}\nold table\n{summary.END}\n\n{summary.TIMES_BEGIN}\n"
                    f"{summary.TIMES_END}\n\nrest stays\n")
  summary.write(str(readme), text, summary.times(str(res)))
  out = readme.read_text()
  assert out.startswith("# title\n\nintro\n\n") and out.endswith("rest stays\n") and "old table" not in out
  assert text.strip() in out and "| main_comparison | 1 | 1 | 2 |" in out
  bad = tmp_path / "other.md"
  bad.write_text("no markers")
  with pytest.raises(ValueError, match="other.md"):
    summary.write(str(bad), text)


def test_the_committed_readme_holds_the_generated_table():
  """experiments/README.md's table is what summary.py makes of the committed reports (regenerate: summary.py)."""
  here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")
  with open(os.path.join(here, "README.md")) as f:
    readme = f.read()
  assert summary.table(os.path.join(here, "results")).strip() in readme
