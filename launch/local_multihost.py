r"""Runs a launcher as a multi-host JAX job on this machine: N processes x M CPU devices over jax.distributed.

  python launch/local_multihost.py --num_processes=2 --devices_per_process=4 -- \
    launch/pretrain.py --gin_file=gin/models/tiny.gin --gin_file=gin/runs/realm_pretrain_demo.gin \
    --gin_bindings="BATCH_SIZE = 8" --workdir=/tmp/r

Each process gets `--coordinator_address=127.0.0.1:<free port> --num_processes=N --process_id=i`, as
the hosts of a TPU pod do; output lines are prefixed with `[process i]`.  When one process fails the
others are stopped; the exit status is the first failure's (0 when all succeed).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

from absl import app, flags

from launch import cli

_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 2, "Processes (hosts) to start.")
_DEVICES = flags.DEFINE_integer("devices_per_process", 4, "CPU devices of each process (JAX_NUM_CPU_DEVICES).")
_PORT = flags.DEFINE_integer("port", 0, "Coordinator port on 127.0.0.1 (0: a free one).")

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _forward(stream, out, prefix: str) -> None:
  for line in stream:
    out.write(f"{prefix}{line}")
    out.flush()


def spawn(command: list[str], num_processes: int, devices_per_process: int, port: int) -> list[subprocess.Popen]:
  """Starts `command` once per process with the multi-host flags; their output is forwarded, prefixed."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": str(devices_per_process)}
  env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
  processes = []
  for i in range(num_processes):
    flags_ = [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={num_processes}", f"--process_id={i}"]
    process = subprocess.Popen([sys.executable, *command, *flags_], cwd=REPO, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for stream, out in ((process.stdout, sys.stdout), (process.stderr, sys.stderr)):
      threading.Thread(target=_forward, args=(stream, out, f"[process {i}] "), daemon=True).start()
    processes.append(process)
  return processes


def wait(processes: list[subprocess.Popen]) -> int:
  """Waits for all; on the first failure stops the others. Returns the first non-zero status, else 0."""
  status = 0
  pending = list(processes)
  while pending:
    for process in list(pending):
      try:
        code = process.wait(timeout=0.5)
      except subprocess.TimeoutExpired:
        continue
      pending.remove(process)
      if code and not status:
        status = code
        for other in pending:
          other.terminate()
  return status


def main(argv):
  command = argv[1:]
  if not command:
    raise app.UsageError("give the launcher and its flags after --, e.g. -- launch/pretrain.py --workdir=...")
  port = _PORT.value or free_port()
  sys.exit(wait(spawn(command, _NUM_PROCESSES.value, _DEVICES.value, port)))


if __name__ == "__main__":
  cli.run(main)
