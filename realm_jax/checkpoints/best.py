"""The best fine-tuning checkpoint by dev exact match: its records, its protection from orbax's clean-up, and
which checkpoint evaluation and `launch/ask.py` load.

After each dev evaluation at step N (whose checkpoint is saved first), process 0 writes
`<workdir>/dev_eval/step_<N>.json` once: {step, dev_exact_match, dev_questions, answer_text, best_step,
best_dev_exact_match}, the best being the highest dev EM so far, ties to the earlier step.  No file is ever
rewritten (object-store rule, WORKSPACE.md), so the newest record holds the run's best; a resumed run continues
from the newest record at or before its checkpoint.  Orbax keeps the newest `keep_checkpoints` and, through
`KeepSteps`, the best one.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence

import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from realm_jax import storage
from realm_jax.checkpoints.train_dir import TRAIN_DIR, read_only_checkpoints

DEV_EVAL_DIR = "dev_eval"


@dataclasses.dataclass(frozen=True)
class DevRecord:
  """One dev evaluation and the best one up to it."""

  step: int
  dev_exact_match: float
  dev_questions: int
  answer_text: str
  best_step: int
  best_dev_exact_match: float

  def after(self, step: int, exact_match: float, questions: int, answer_text: str) -> DevRecord:
    """The record of a later evaluation: its best is this one's unless strictly beaten."""
    better = exact_match > self.best_dev_exact_match
    return DevRecord(step, exact_match, questions, answer_text, step if better else self.best_step,
                     exact_match if better else self.best_dev_exact_match)


def record_path(workdir: storage.PathLike, step: int) -> epath.Path:
  return storage.as_path(workdir) / DEV_EVAL_DIR / f"step_{step}.json"


def write_record(workdir: storage.PathLike, record: DevRecord) -> None:
  storage.write_json_once(record_path(workdir, record.step), dataclasses.asdict(record))


def newest_record(workdir: storage.PathLike, up_to: int | None = None) -> DevRecord | None:
  """The newest dev record (at or before step `up_to` when given); None when there is none."""
  folder = storage.as_path(workdir) / DEV_EVAL_DIR
  steps = sorted(int(p.stem[len("step_"):]) for p in folder.glob("step_*.json")
                 if p.stem[len("step_"):].isdigit()) if folder.exists() else []
  steps = [s for s in steps if up_to is None or s <= up_to]
  if not steps:
    return None
  path = record_path(workdir, steps[-1])
  return DevRecord(**json.loads(storage.read_bytes(path)))


def choose_checkpoint(workdir: storage.PathLike) -> tuple[int, str]:
  """(step, why): the best checkpoint by dev EM when one is recorded and still saved, else the newest."""
  workdir = storage.as_path(workdir)
  steps = read_only_checkpoints(workdir / TRAIN_DIR).all_steps()
  if not steps:
    raise FileNotFoundError(f"{workdir / TRAIN_DIR}: no fine-tuning checkpoint")
  newest = max(steps)
  record = newest_record(workdir)
  if record is None:
    return newest, f"the newest checkpoint (no dev evaluation recorded in {workdir / DEV_EVAL_DIR})"
  if record.best_step not in steps:
    return newest, (f"the newest checkpoint: the recorded best step {record.best_step} "
                    f"({record_path(workdir, record.step)}) has no checkpoint left")
  return record.best_step, (f"the best dev exact match, {record.best_dev_exact_match:.2f}% of "
                            f"{record.dev_questions} dev questions, of the evaluations up to step {record.step} "
                            f"({record_path(workdir, record.step)})")


def log_choice(workdir: storage.PathLike) -> int:
  """`choose_checkpoint`'s step, logged with its reason."""
  step, why = choose_checkpoint(workdir)
  logging.info("loading fine-tuning checkpoint step %d of %s: %s", step, storage.as_path(workdir) / TRAIN_DIR, why)
  return step


@dataclasses.dataclass
class KeepSteps:
  """Orbax preservation policy: keeps every checkpoint whose step `keep(step)` is true (e.g. the best so far)."""

  keep: Callable[[int], bool]

  def should_preserve(self, checkpoints: Sequence, *, context) -> list[bool]:
    del context
    return [self.keep(c.step) for c in checkpoints]


def keep_newest_and(keep_checkpoints: int, keep: Callable[[int], bool]) -> ocp.checkpoint_managers.PreservationPolicy:
  """The newest `keep_checkpoints` and those `keep` names."""
  return ocp.checkpoint_managers.AnyPreservationPolicy(
      [ocp.checkpoint_managers.LatestN(keep_checkpoints), KeepSteps(keep)])
