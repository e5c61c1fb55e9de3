"""Several processes (a TPU pod slice, a multi-host GPU job): starting them (`initialize`),
checking on every host what a run will read before any stage (`preflight`), and waiting for
each other through files in <workdir>/.multihost/<token>/, never inside a device collective
(`barrier`, `Session.wait`): every process rewrites a heartbeat file every HEARTBEAT_S seconds,
and a barrier is one arrival file per process. docs/scale-out.md ("Hosts") tells the steps.
"""

import dataclasses
import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
from jax.experimental import multihost_utils
import numpy as np

from dwa_jax import errors, files

SYNC_DIR = ".multihost"
HEARTBEAT_S = 5.0
POLL_S = 0.5
MESSAGE_BYTES = 2048
MODES = ("auto", "on", "off")


class StartError(RuntimeError):
  """The processes cannot be started as asked."""


class PreflightError(errors.InputError):
  """A process lacks an input or does not share the work directory."""


class ProcessLost(TimeoutError):
  """A process another one waits for stopped, or did not arrive in time."""


# ----------------------------------------------------------------------------- start

def launcher_counts(environ) -> dict[str, int]:
  """Process counts that launchers put in the environment: {'SLURM': 4, ...}."""
  counts = {}
  for name in ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"):
    value = environ.get(name, "").strip()
    if value.isdigit():
      counts["SLURM"] = int(value)
      break
  value = environ.get("OMPI_COMM_WORLD_SIZE", "").strip()
  if value.isdigit():
    counts["Open MPI"] = int(value)
  hosts = [h for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
  if hosts:
    counts["Cloud TPU"] = len(hosts)
  return counts


def initialize(coordinator_address=None, num_processes=None, process_id=None, mode="auto",
               environ=None) -> str | None:
  """Starts JAX's multi-process runtime before any computation: from the flags when
  `coordinator_address` is given; else `mode` 'on' lets JAX detect the cluster, 'auto' does so
  when the launchers' environment says there are several processes (and refuses to guess when
  two launchers disagree), 'off' never (a Cloud TPU pod slice joins its hosts through the TPU
  runtime even so). Returns what started it ('flags', the launchers' names, 'jax') or None."""
  environ = os.environ if environ is None else environ
  if mode not in MODES:
    raise StartError(f"--distributed must be one of {', '.join(MODES)}, got {mode!r}")
  several = {name: n for name, n in launcher_counts(environ).items() if n > 1}
  described = ", ".join(f"{name} {n}" for name, n in several.items())
  if coordinator_address:
    if mode == "off":
      raise StartError("--distributed=off contradicts --coordinator_address; drop one of them")
    if num_processes and any(n != num_processes for n in several.values()):
      raise StartError(f"--num_processes={num_processes}, but the environment says "
                       f"{described} processes; make them agree")
    _start(coordinator_address, num_processes, process_id)
    return "flags"
  if mode == "off":
    return None
  if len(set(several.values())) > 1:
    raise StartError(f"the environment names different process counts ({described}); pass "
                     "--coordinator_address, --num_processes and --process_id, or "
                     "--distributed=off for a single-process run")
  if mode == "auto" and not several:
    return None
  _start()
  expected = next(iter(several.values()), None)
  if expected is not None and jax.process_count() != expected:
    raise StartError(f"the environment says {described} processes, but JAX started "
                     f"{jax.process_count()}; pass --coordinator_address, --num_processes and "
                     "--process_id")
  return ", ".join(several) or "jax"


def _start(*args) -> None:
  try:
    jax.distributed.initialize(*args)
  except Exception as e:  # pylint: disable=broad-except
    first = str(e).splitlines()[0] if str(e) else ""
    raise StartError(f"jax.distributed.initialize() failed: {type(e).__name__}: {first}; pass "
                     "--coordinator_address, --num_processes and --process_id, or "
                     "--distributed=off for a single-process run") from None


# ----------------------------------------------------------------------------- waiting

@dataclasses.dataclass
class Session:
  """The processes of one run, waiting for each other through files in `root`
  (<workdir>/.multihost/<token>)."""
  root: Any
  process: int
  count: int
  barrier_timeout_s: float
  stale_after_s: float
  _barriers: int = 0
  _stop: threading.Event = dataclasses.field(default_factory=threading.Event)
  _thread: threading.Thread | None = None

  def heartbeat_path(self, process: int):
    return self.root / f"heartbeat.p{process}"

  def start_heartbeat(self) -> None:
    host = socket.gethostname()

    def beat():
      n = 0
      while True:
        try:
          files.write_json(self.heartbeat_path(self.process), {"host": host, "beat": n})
        except OSError:
          pass  # a full or flaky disk: the others notice the silence
        n += 1
        if self._stop.wait(HEARTBEAT_S):
          return
    self._thread = threading.Thread(target=beat, name="dwa_jax heartbeat", daemon=True)
    self._thread.start()

  def stop(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=HEARTBEAT_S + 1)

  def _beat(self, process: int):
    try:
      return self.heartbeat_path(process).read_text()
    except (OSError, ValueError):
      return None

  def host(self, process: int) -> str:
    try:
      return json.loads(self._beat(process))["host"]
    except (ValueError, KeyError, TypeError):
      return "unknown host"

  def wait(self, missing: Callable[[], set[int]], what: str, timeout_s: float | None = None):
    """Polls until `missing()` (the processes not there yet) is empty. Ends with ProcessLost
    when one of them has not changed its heartbeat for stale_after_s, or after timeout_s
    (default barrier_timeout_s)."""
    timeout_s = self.barrier_timeout_s if timeout_s is None else timeout_s
    started = time.monotonic()
    seen = {}  # process -> (its heartbeat as last read, when that reading first appeared here)
    while True:
      absent = missing()
      if not absent:
        return
      now = time.monotonic()
      for p in sorted(absent):
        beat = self._beat(p)
        if p not in seen or seen[p][0] != beat:
          seen[p] = (beat, now)
        elif now - seen[p][1] > self.stale_after_s:
          raise ProcessLost(
              f"process {p} ({self.host(p)}) stopped: its heartbeat in {self.root} has not "
              f"changed for {now - seen[p][1]:.0f} s (multihost.stale_after_s) while "
              f"process {self.process} waited for {what}; see that process's log, then rerun "
              "the command on every host to resume")
      if now - started > timeout_s:
        raise ProcessLost(
            f"process {self.process} waited {timeout_s:.0f} s (multihost.barrier_timeout_s) "
            f"for {what} from {', '.join(f'process {p}' for p in sorted(absent))}; rerun the "
            "command on every host to resume")
      time.sleep(POLL_S)

  def barrier(self, name: str) -> None:
    """Every process arrives at barrier `name` (the same names, in the same order)."""
    self._barriers += 1
    index = self._barriers
    arrival = lambda p: self.root / f"barrier_{index:06d}.p{p}"
    files.write_bytes(arrival(self.process), name.encode())

    def missing():
      absent = set()
      for p in range(self.count):
        try:
          text = arrival(p).read_text()
        except (OSError, ValueError):
          absent.add(p)
          continue
        if text != name:
          raise ProcessLost(f"process {p} reached barrier {text!r} where process {self.process}"
                            f" reached {name!r}: the processes run different programs")
      return absent
    self.wait(missing, f"barrier {name!r}")


_SESSION: Session | None = None


def session() -> Session | None:
  """The current run's Session (None with one process, or outside a run)."""
  return _SESSION


def barrier(name: str) -> None:
  """Waits until every process reaches `name`: through the run's files once preflight has
  started a Session, otherwise (library use) through a device collective. Nothing to wait for
  with one process."""
  if jax.process_count() == 1:
    return
  if _SESSION is not None:
    _SESSION.barrier(name)
  else:
    multihost_utils.sync_global_devices(name)


# ----------------------------------------------------------------------------- preflight

def _agree(message: str) -> None:
  """Raises, on every process, the first process's problem (and how many more there are):
  every process's `message` ('' for ok) through one device all-gather, made while every
  process is known to be alive (the start of a run)."""
  encoded = message.encode()[:MESSAGE_BYTES]
  buffer = np.zeros(MESSAGE_BYTES, np.uint8)  # NUL-padded
  buffer[:len(encoded)] = np.frombuffer(encoded, np.uint8)
  gathered = np.asarray(multihost_utils.process_allgather(buffer)).reshape(-1, MESSAGE_BYTES)
  messages = (row.tobytes().rstrip(b"\0").decode(errors="replace") for row in gathered)
  problems = [m for m in messages if m]
  if problems:
    others = len(problems) - 1
    more = f" ({others} more process{'es' if others > 1 else ''} failed too)" if others else ""
    raise PreflightError(f"{problems[0]}{more}")


def _problem(check: Callable[[], None]) -> str:
  try:
    check()
  except (ValueError, OSError) as e:
    return str(e)
  return ""


def _label(process: int) -> str:
  return f"process {process} on host {socket.gethostname()}: "


def preflight(workdir, check_inputs: Callable[[], None], *, barrier_timeout_s: float,
              stale_after_s: float) -> Session | None:
  """Before any stage: every process reads back the token process 0 writes into
  <workdir>/.multihost/ (a host that sees another directory cannot), then runs `check_inputs`,
  which raises (ValueError / OSError) what it lacks, process 0 first (it may prepare tfds data).
  A problem on one host ends every host with the same line (`_agree`). With several processes,
  returns the run's Session (its heartbeat started): call `end` when the run ends."""
  global _SESSION
  process, count = jax.process_index(), jax.process_count()
  if count == 1:
    check_inputs()
    return None
  workdir = files.as_path(workdir)
  run_file = workdir / SYNC_DIR / "run.json"
  token, problem = None, ""
  if process == 0:
    token = secrets.token_hex(8)
    try:
      files.remove_tree(workdir / SYNC_DIR)  # the waits of earlier runs
      (workdir / SYNC_DIR / token).mkdir(parents=True, exist_ok=True)
      files.write_json(run_file, {"token": token, "processes": count})
    except OSError as e:
      problem = _label(process) + f"cannot write {run_file}: {errors.describe_error(e)}"
  multihost_utils.sync_global_devices("dwa_jax preflight: workdir token")
  if process != 0 and not problem:
    try:
      token = json.loads(run_file.read_text())["token"]
    except (OSError, ValueError, KeyError) as e:
      problem = (_label(process) + f"workdir {os.fspath(workdir)!r} is not the directory "
                 f"process 0 sees: the token process 0 has just written is not at {run_file} "
                 f"({type(e).__name__}); every host needs the same workdir, on a shared file "
                 "system (gs://, NFS)")
  _agree(problem)
  _SESSION = Session(workdir / SYNC_DIR / token, process, count, barrier_timeout_s,
                     stale_after_s)
  _SESSION.start_heartbeat()
  try:
    ready = _SESSION.root / "inputs_checked.p0"
    if process != 0:
      _SESSION.wait(lambda: set() if ready.exists() else {0}, "process 0 to check the inputs")
    problem = _problem(check_inputs)
    if process == 0:
      files.write_bytes(ready, b"")
    _agree(_label(process) + problem if problem else "")
  except BaseException:
    end()
    raise
  return _SESSION


def end() -> None:
  """Stops the run's heartbeat (the Session's files stay for the next run's process 0 to
  remove: another process may still be reading them)."""
  global _SESSION
  if _SESSION is not None:
    _SESSION.stop()
    _SESSION = None
