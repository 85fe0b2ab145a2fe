"""What every runtime entry point (train, quantize) does around its work, written once.

Parse ``--config``/``--termination-log``, read the contract, run the work, and turn the
outcome into an exit code and a termination message: a user error (bad data or config,
a missing source, a failed quality gate) exits EXIT_USER_ERROR so the Job fails at once;
anything else exits EXIT_INFRASTRUCTURE so it may be retried.
"""

from __future__ import annotations

import argparse
import logging
import os
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubeforge.runtime import data, fetch, logs
from kubeforge.runtime.contract import (
    ENV_CONFIG,
    EXIT_INFRASTRUCTURE,
    EXIT_OK,
    EXIT_USER_ERROR,
    TERMINATION_MESSAGE_PATH,
    ContractError,
    termination_message,
)

log = logging.getLogger("kubeforge")


class UserError(ValueError):
    """A problem with the job's inputs: retrying cannot help."""


USER_ERRORS = (UserError, data.DataError, fetch.SourceMissing, ContractError)


def main(
    prog: str,
    argv: list[str] | None,
    load: Callable[[str | None], Any],
    work: Callable[[Any], dict[str, Any]],
    *,
    rank: int = 0,
    cleanup: Callable[[], None] | None = None,
) -> int:
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--config", default=os.environ.get(ENV_CONFIG), help="the contract JSON")
    parser.add_argument(
        "--termination-log", default=os.environ.get("KUBEFORGE_TERMINATION_LOG", TERMINATION_MESSAGE_PATH)
    )
    args = parser.parse_args(argv)
    logs.configure(  # KUBEFORGE_LOG_FORMAT=json: one JSON object per line
        logging.INFO if rank == 0 else logging.WARNING, f"%(asctime)s rank{rank} %(levelname)s %(message)s", rank=rank
    )
    logging.getLogger("torchao").setLevel(logging.ERROR)  # its optional CUDA kernels do not load on a CPU
    try:
        summary = work(load(args.config))
        return finish(rank, args.termination_log, EXIT_OK, summary)
    except USER_ERRORS as err:
        log.error("%s", err)
        return finish(rank, args.termination_log, EXIT_USER_ERROR, {"status": "failed", "error": str(err)})
    except Exception as err:  # anything else is the infrastructure's (OOM, NCCL, a lost peer)
        traceback.print_exc()
        error = f"{type(err).__name__}: {err}"
        return finish(rank, args.termination_log, EXIT_INFRASTRUCTURE, {"status": "failed", "error": error[:1000]})
    finally:
        if cleanup is not None:
            cleanup()


def finish(rank: int, path: str, code: int, summary: dict[str, Any]) -> int:
    """Rank 0 leaves the summary in the termination message (and on stdout)."""
    if rank == 0:
        message = termination_message(summary)
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(message)
        except OSError:
            pass
        print(f"kubeforge: {message}", flush=True)
    return code
