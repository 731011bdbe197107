"""A sweep's held-out report: each variant's held-out MLM loss at every evaluated step, with its standard error
over queries, as a markdown table (`report.md`) and a PNG plot (`heldout_loss.png`) in the sweep's root; and the
ablation table (Table 2 at small scale) of final held-out losses, paired differences and zero-shot recalls."""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence

from realm_jax import storage
from realm_jax.eval import realm_mlm

Curve = list[tuple[int, float, float]]  # (step, held-out loss, standard error)
PLOT = "heldout_loss.png"
REPORT = "report.md"


def _pyplot():
  """matplotlib's pyplot on the Agg backend (no display)."""
  import matplotlib

  matplotlib.use("Agg")
  from matplotlib import pyplot

  return pyplot


def _png(plt, figure) -> bytes:
  """`figure` laid out and saved as PNG bytes, then closed."""
  figure.tight_layout()
  out = io.BytesIO()
  figure.savefig(out, format="png")
  plt.close(figure)
  return out.getvalue()


def held_out_curve(workdir: storage.PathLike) -> Curve:
  """(step, loss, standard error) of every held-out evaluation of the run in `workdir`."""
  return [(step, *realm_mlm.held_out_loss(realm_mlm.load_eval(workdir, step)))
          for step in realm_mlm.eval_steps(workdir)]


def loss_table(curves: Mapping[str, Curve]) -> str:
  """Markdown: one row per variant, one column per evaluated step, `loss ± s.e.`."""
  steps = sorted({step for curve in curves.values() for step, _, _ in curve})
  lines = ["| variant | " + " | ".join(f"step {s}" for s in steps) + " |", "|---|" + "---|" * len(steps)]
  for name, curve in curves.items():
    at = {step: f"{loss:.3f} ± {error:.3f}" for step, loss, error in curve}
    lines.append(f"| {name} | " + " | ".join(at.get(s, "–") for s in steps) + " |")
  return "\n".join(lines) + "\n"


def plot_curves(curves: Mapping[str, Curve], title: str) -> bytes:
  """PNG bytes: held-out loss against step per variant, error bars of one standard error over queries."""
  plt = _pyplot()
  figure, axes = plt.subplots(figsize=(7, 4.5), dpi=120)
  for name, curve in curves.items():
    steps, losses, errors = zip(*curve, strict=True)
    axes.errorbar(steps, losses, yerr=errors, marker="o", capsize=3, label=name)
  axes.set_xlabel("training step")
  axes.set_ylabel("held-out MLM loss (nats per masked token)")
  axes.set_title(title, fontsize=9)
  axes.grid(alpha=0.3)
  axes.legend(fontsize=8)
  return _png(plt, figure)


def write_report(root: storage.PathLike, names: Sequence[str], summary_lines: Sequence[str]) -> list[str]:
  """Writes `report.md` (the loss table, then `summary_lines`) and `heldout_loss.png` for the variants with
  held-out evaluations; returns the paths written (none when no variant has any)."""
  root = storage.as_path(root)
  curves = {name: curve for name in names if (curve := held_out_curve(root / name))}
  if not curves:
    return []
  title = f"{root.name}: held-out MLM loss ± 1 s.e. over queries"
  report = (f"# {root.name}\n\nHeld-out MLM loss ± standard error over queries (`<variant>/eval/mlm_step_<N>.json`):"
            f"\n\n{loss_table(curves)}\n![held-out loss]({PLOT})\n\n```\n" + "\n".join(summary_lines) + "\n```\n")
  (root / REPORT).write_text(report)
  (root / PLOT).write_bytes(plot_curves(curves, title))
  return [str(root / REPORT), str(root / PLOT)]


def recall_at(results_json: storage.PathLike, dataset: str, k: int = 5) -> float | None:
  """The "realm-jax" answer-recall@k of `dataset` in an evaluate.py results.json (None when absent)."""
  path = storage.as_path(results_json)
  if not path.exists():
    return None
  rows = json.loads(path.read_text())
  return next((r[f"recall@{k}"] for r in rows if r["dataset"] == dataset and r["system"] == "realm-jax"), None)


def ablation_table(root: storage.PathLike, names: Sequence[str], baseline: str, dataset: str = "nq_open_dev",
                   recall_dir: str = "recall") -> tuple[str, bytes | None]:
  """Table 2 at small scale from a sweep root: per variant its final held-out loss ± s.e., minus the baseline's
  (paired over queries) ± s.e., and the zero-shot answer-recall@5 of its pre-trained retriever on `dataset`
  (`<root>/<recall_dir>/<variant>/eval_retrieval/results.json`, written by evaluate.py --pretrained_run); with
  a PNG bar chart of the recalls (None when no variant has one)."""
  root = storage.as_path(root)
  reference = realm_mlm.load_eval(root / baseline)
  lines = [f"| variant | step | held-out loss ± s.e. | minus {baseline} ± s.e. | better on | {dataset} R@5 |",
           "|---|---|---|---|---|---|"]
  recalls = {}
  for name in names:
    evaluation = realm_mlm.load_eval(root / name)
    loss, error = realm_mlm.held_out_loss(evaluation)
    if name == baseline:
      diff, better = "–", "–"
    else:
      d = realm_mlm.paired_difference(evaluation, reference)
      diff, better = f"{d['loss_difference']:+.3f} ± {d['standard_error']:.3f}", f"{d['queries_better']:.0%}"
    recall = recall_at(root / recall_dir / name / "eval_retrieval" / "results.json", dataset)
    if recall is not None:
      recalls[name] = recall
    lines.append(f"| {name} | {evaluation['step']} | {loss:.3f} ± {error:.3f} | {diff} | {better} | "
                 + ("–" if recall is None else f"{recall:.1f}") + " |")
  return "\n".join(lines) + "\n", (plot_recalls(recalls, f"{dataset}: answer-recall@5 of each pre-trained retriever")
                                   if recalls else None)


def plot_recalls(recalls: Mapping[str, float], title: str) -> bytes:
  """PNG bytes: one bar per variant."""
  plt = _pyplot()
  figure, axes = plt.subplots(figsize=(7, 4), dpi=120)
  axes.bar(list(recalls), list(recalls.values()))
  axes.set_ylabel("answer-recall@5 (%)")
  axes.set_title(title, fontsize=9)
  axes.tick_params(axis="x", labelrotation=30, labelsize=8)
  return _png(plt, figure)
