"""What the command-line entry points (nl.export, nl.evaluate, nl.generate; data_prep's scripts) share.

A user mistake (a missing directory or file, a bad step, a device that is not there, a path that
cannot be written) ends in one line `error: ...` on stderr and exit status 1, as train.py does;
argparse's own errors exit 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class UsageError(ValueError):
    """A command-line input the command cannot use; the message says what to pass instead."""


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """Turn the project's user-error exceptions raised inside the block into `error: ...`, exit 1."""
    from nl.checkpoint import CheckpointError
    from nl.config import ConfigError
    from nl.data.shards import DataError

    try:
        yield
    except (UsageError, ConfigError, CheckpointError, DataError) as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # a path that cannot be read or written (missing, permissions, disk full)
        sys.exit(f"error: {describe_os_error(e)}")


def describe_os_error(e: OSError) -> str:
    """One line for an OSError: 'PATH: reason: check ...' (the errno text, not a traceback)."""
    where = f"{e.filename}: " if e.filename else ""
    return f"{where}{e.strerror or e}: check the path, its permissions and the free space"


def parse_device(name: str) -> torch.device:
    """`--device` value -> torch.device; UsageError for a malformed name or an absent CUDA device."""
    import torch  # here, not at the top: the data_prep scripts use this module without torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device: pass cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name} but no CUDA device is visible: pass --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name} but only {torch.cuda.device_count()} CUDA device(s) are visible")
    return device
