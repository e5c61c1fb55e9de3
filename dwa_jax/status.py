"""Status lines: one line for each thing a stage did (a teacher saved, a set written, ...), on
stdout through the `dwa_jax` logger, which an application can silence or redirect."""

import logging
import sys

import jax

LOGGER = logging.getLogger("dwa_jax")


class _Stdout(logging.StreamHandler):
  """Writes to whatever sys.stdout is at the time (a notebook or a test may replace it)."""

  @property
  def stream(self):
    return sys.stdout

  @stream.setter
  def stream(self, value):
    del value


if not LOGGER.handlers:
  _handler = _Stdout()
  _handler.setFormatter(logging.Formatter("%(message)s"))
  LOGGER.addHandler(_handler)
  LOGGER.setLevel(logging.INFO)
  LOGGER.propagate = False  # absl's root handler would print it again, with a prefix


def say(message: str) -> None:
  """One status line. The stages say what all processes share from process 0 only, and what
  concerns one process's own batches from that process, prefixed with its index."""
  if jax.process_count() > 1 and jax.process_index() > 0:
    message = f"[process {jax.process_index()}] {message}"
  LOGGER.info(message)
