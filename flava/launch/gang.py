"""``python -m flava.launch.gang <torchrun arguments>``: torchrun, exiting with its failed worker's exit code.

torchrun exits 1 whatever its workers exited with, so a Job's ``podFailurePolicy`` cannot tell a config error
(``flava.exitcodes.NON_RETRYABLE``: fail the Job, retrying cannot help) from a crash or a preemption. This entry
point runs torchrun's own launcher (``torch.distributed.run``, same arguments) and exits with:

- the root-cause worker's exit code (the first to fail; 128 + N for a worker killed by signal N);
- ``PREEMPTED`` (143) when the agent itself was sent SIGTERM (the pod is being deleted or preempted; the
  trainer saves a checkpoint on SIGTERM and exits the same way);
- 0 when every worker succeeded.

It also writes a one-line summary to the container's termination message file (``/dev/termination-log``, when
it exists), which the launcher reads back from the pod's status when the Job fails.
"""
from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Sequence

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run

from flava.exitcodes import PREEMPTED

TERMINATION_LOG = Path("/dev/termination-log")  # the kubelet's default terminationMessagePath


def exit_code(failure_exitcode: int) -> int:
    """A worker's exit code as a shell reports it: a negative code (killed by signal N) becomes 128 + N."""
    if failure_exitcode < 0:
        return 128 + -failure_exitcode
    return failure_exitcode or 1  # a recorded failure with code 0 (error file only) is still a failure


def _note(message: str, path: Path = TERMINATION_LOG) -> None:
    print(message, file=sys.stderr, flush=True)
    if path.parent.is_dir() and path.exists():
        path.write_text(message[-4000:])  # the kubelet keeps at most 4096 bytes


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        run(args)
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        code = exit_code(failure.exitcode)
        detail = failure.message if isinstance(failure.message, str) else failure.message.get("message", "")
        _note(f"flava.launch.gang: rank {rank} (local rank {failure.local_rank}) failed first with exit code "
              f"{code}; {str(detail).strip()[:3000]}")
        return code
    except SignalException as err:
        code = PREEMPTED if err.sigval == signal.SIGTERM else 128 + int(err.sigval)
        _note(f"flava.launch.gang: torchrun got {signal.Signals(err.sigval).name}; exit {code}")
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
