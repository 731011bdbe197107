r"""Table 2 at small scale from a finished sweep (scripts/table2.sh runs it): each variant's final held-out MLM
loss, its paired difference to the baseline and the zero-shot answer-recall@5 of its pre-trained retriever;
writes <root>/table2.md and <root>/recall_at_5.png.

  python tools/ablation_table.py --root=workdir/table2 --baseline=baseline --variants=baseline,random_tokens,...
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from realm_jax import storage  # noqa: E402
from realm_jax.eval import sweep_report  # noqa: E402

_ROOT = flags.DEFINE_string("root", None, "The sweep's --workdir_root.", required=True)
_BASELINE = flags.DEFINE_string("baseline", None, "The variant the others are compared with.", required=True)
_VARIANTS = flags.DEFINE_list("variants", None, "The variants, in table order.", required=True)


def main(argv):
  del argv
  root = storage.as_path(_ROOT.value)
  table, plot = sweep_report.ablation_table(root, _VARIANTS.value, _BASELINE.value)
  (root / "table2.md").write_text(table)
  print(table, end="")
  if plot is not None:
    (root / "recall_at_5.png").write_bytes(plot)
    print(f"wrote {root / 'table2.md'} and {root / 'recall_at_5.png'}")


if __name__ == "__main__":
  app.run(main)
