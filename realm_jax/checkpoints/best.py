"""The best fine-tuning checkpoint by dev exact match: its records, its protection from orbax's clean-up, and
which checkpoint evaluation, `launch/ask.py` and `launch/convert.py` load.

After each dev evaluation at step N (whose checkpoint is saved first), process 0 writes
`<workdir>/dev_eval/step_<N>.json` once: {step, dev_exact_match, dev_questions, answer_text, dev_fingerprint,
best_step, best_dev_exact_match}, the best being the highest dev EM so far, ties to the later step (it has trained
on more questions; small dev splits tie often).  No file is ever rewritten (object-store rule, WORKSPACE.md), so
the newest record holds the run's best.  A run starts only where every record is at or before its latest
checkpoint and the newest was measured on the same dev set (`resume_record`).  Orbax keeps the newest
`keep_checkpoints` and, through `KeepSteps`, the best one.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Callable, Sequence
from typing import Any

import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from realm_jax import storage
from realm_jax.checkpoints.train_dir import TRAIN_DIR, read_only_checkpoints
from realm_jax.errors import InputError

DEV_EVAL_DIR = "dev_eval"


@dataclasses.dataclass(frozen=True)
class DevSet:
  """What a dev exact match is measured on: the question count, the answer string mode (`answer_text`) and
  `fingerprint`, the sha256 of the sorted question texts and the answer mode."""

  questions: int
  answer_text: str
  fingerprint: str

  @classmethod
  def of(cls, questions: Sequence[str], answer_text: str) -> DevSet:
    """The dev set of these question texts (any order), answered as `answer_text`."""
    key = json.dumps({"questions": sorted(questions), "answer_text": answer_text}, ensure_ascii=False)
    return cls(len(questions), answer_text, storage.sha256(key.encode()))


@dataclasses.dataclass(frozen=True)
class DevRecord:
  """One dev evaluation and the best one up to it."""

  step: int
  dev_exact_match: float
  dev_questions: int
  answer_text: str
  dev_fingerprint: str
  best_step: int
  best_dev_exact_match: float

  @classmethod
  def first(cls, step: int, exact_match: float, dev: DevSet) -> DevRecord:
    """The record of a run's first evaluation: the best so far."""
    return cls(step, exact_match, dev.questions, dev.answer_text, dev.fingerprint, step, exact_match)

  @property
  def dev_set(self) -> DevSet:
    return DevSet(self.dev_questions, self.answer_text, self.dev_fingerprint)

  def after(self, step: int, exact_match: float) -> DevRecord:
    """The record of a later evaluation on the same dev set: it becomes the best unless it scores lower."""
    better = exact_match >= self.best_dev_exact_match
    return dataclasses.replace(self, step=step, dev_exact_match=exact_match,
                               best_step=step if better else self.best_step,
                               best_dev_exact_match=exact_match if better else self.best_dev_exact_match)


_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    name: (int, float) if hint is float else (hint,) for name, hint in typing.get_type_hints(DevRecord).items()}


def record_path(workdir: storage.PathLike, step: int) -> epath.Path:
  """Where the dev record of step `step` lives: `<workdir>/dev_eval/step_<step>.json`."""
  return storage.as_path(workdir) / DEV_EVAL_DIR / f"step_{step}.json"


def write_record(workdir: storage.PathLike, record: DevRecord) -> None:
  """Writes `record` to `record_path(workdir, record.step)` in one write (a reader sees all of it or nothing)."""
  storage.write_json_once(record_path(workdir, record.step), dataclasses.asdict(record))


def read_record(path: storage.PathLike) -> DevRecord:
  """The dev record in `path`; a file that is not one raises InputError naming the file and the field."""
  try:
    value: Any = json.loads(storage.read_bytes(path))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise InputError(f"{path}: not a JSON dev record ({e})") from None
  if not isinstance(value, dict):
    raise InputError(f"{path}: a dev record must be a JSON object, got {type(value).__name__}")
  for name, types in _FIELD_TYPES.items():
    if name not in value:
      raise InputError(f"{path}: missing field {name!r}")
    if isinstance(value[name], bool) or not isinstance(value[name], types):
      raise InputError(f"{path}: field {name!r} must be {' or '.join(t.__name__ for t in types)}, "
                       f"got {value[name]!r}")
  unknown = sorted(set(value) - set(_FIELD_TYPES))
  if unknown:
    raise InputError(f"{path}: unknown field {unknown[0]!r}")
  return DevRecord(**value)


def record_steps(workdir: storage.PathLike) -> list[int]:
  """The steps with a dev record in `<workdir>/dev_eval`, ascending."""
  folder = storage.as_path(workdir) / DEV_EVAL_DIR
  if not folder.exists():
    return []
  return sorted(int(p.stem[len("step_"):]) for p in folder.glob("step_*.json") if p.stem[len("step_"):].isdigit())


def newest_record(workdir: storage.PathLike) -> DevRecord | None:
  """The newest dev record; None when there is none."""
  steps = record_steps(workdir)
  return read_record(record_path(workdir, steps[-1])) if steps else None


def resume_record(workdir: storage.PathLike, latest_checkpoint: int | None, dev: DevSet | None) -> DevRecord | None:
  """The newest dev record a run starting at checkpoint `latest_checkpoint` (None: a fresh run) continues from,
  evaluating on `dev` (None: no dev evaluation).  Refused with one line: records with no checkpoint or newer than
  the latest (left by an earlier run in this workdir), or a newest record measured on another dev set."""
  folder = storage.as_path(workdir) / DEV_EVAL_DIR
  steps = record_steps(workdir)
  stale = [s for s in steps if latest_checkpoint is None or s > latest_checkpoint]
  if stale:
    after = ("no checkpoint" if latest_checkpoint is None
             else f"the latest checkpoint {latest_checkpoint}")
    raise InputError(f"{folder}: dev records of steps {stale} but {after} in {storage.as_path(workdir) / TRAIN_DIR}"
                     ": stale records of an earlier run; start in a new workdir (or remove the stale records)")
  if not steps:
    return None
  path = record_path(workdir, steps[-1])
  record = read_record(path)
  if dev is None:
    raise InputError(f"{path}: the run was evaluated on {record.dev_questions} dev questions, this start has no dev "
                     "set: give the same FinetuneRecipe dev split, or start in a new workdir")
  was = record.dev_set
  differs = [f"{name} {getattr(was, attr)!r} -> {getattr(dev, attr)!r}"
             for name, attr in (("dev_questions", "questions"), ("answer_text", "answer_text"),
                                ("dev_fingerprint", "fingerprint")) if getattr(was, attr) != getattr(dev, attr)]
  if differs:
    raise InputError(f"{path}: the dev set differs from the recorded one ({', '.join(differs)}): the best step "
                     "would compare exact matches on different dev sets; give the recorded dev split and "
                     "answer_text, or start in a new workdir")
  return record


def choose_checkpoint(workdir: storage.PathLike, step: int | None = None) -> tuple[int, str]:
  """(step, why): `step` when given (it must be saved), else the best checkpoint by dev EM when one is recorded
  and still saved, else the newest."""
  workdir = storage.as_path(workdir)
  steps = read_only_checkpoints(workdir / TRAIN_DIR).all_steps()
  if not steps:
    raise FileNotFoundError(f"{workdir / TRAIN_DIR}: no fine-tuning checkpoint")
  if step is not None:
    if step not in steps:
      raise InputError(f"{workdir / TRAIN_DIR}: no checkpoint of step {step}; saved: {sorted(steps)}")
    return step, "the step asked for"
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


def log_choice(workdir: storage.PathLike, step: int | None = None) -> int:
  """`choose_checkpoint`'s step, logged with its reason."""
  step, why = choose_checkpoint(workdir, step)
  logging.info("loading fine-tuning checkpoint step %d of %s: %s", step, storage.as_path(workdir) / TRAIN_DIR, why)
  return step


@dataclasses.dataclass
class KeepSteps:
  """Orbax preservation policy: keeps every checkpoint whose step `keep(step)` is true (e.g. the best so far)."""

  keep: Callable[[int], bool]

  def should_preserve(self, checkpoints: Sequence[ocp.checkpoint_managers.PolicyCheckpointInfo], *,
                      context: ocp.checkpoint_managers.PreservationContext) -> list[bool]:
    """For each of `checkpoints`, whether orbax must keep it (`context` is not needed)."""
    del context
    return [self.keep(c.step) for c in checkpoints]


def keep_newest_and(keep_checkpoints: int, keep: Callable[[int], bool]) -> ocp.checkpoint_managers.PreservationPolicy:
  """The newest `keep_checkpoints` and those `keep` names."""
  return ocp.checkpoint_managers.AnyPreservationPolicy(
      [ocp.checkpoint_managers.LatestN(keep_checkpoints), KeepSteps(keep)])
