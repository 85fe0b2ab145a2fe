"""Run the operator: ``python -m kubeforge.controller [--namespace NS ...] [--leader-elect]``.

With ``--leader-elect`` (the chart's default, two replicas) only the holder of a
coordination.k8s.io/v1 Lease runs kopf; the others stand by, answering liveness probes
only, and take the Lease over when the holder stops renewing it. A leader that cannot
renew within ``--renew-deadline`` exits at once (its pod restarts as a standby), which is
before any standby can see the Lease expire (``--lease-duration``), so two never act at
once. A leader stopped gracefully (SIGTERM) releases the Lease for an immediate handover.
kopf's own peering is not used: peers of equal priority, as replicas are, both keep acting.

The images of the pods it renders are kubeforge.render.images' defaults, overridden from the
environment: ``KUBEFORGE_IMAGE_REGISTRY`` (a mirror for all) and ``KUBEFORGE_IMAGE_<NAME>_<FIELD>``
(see ``images.from_env``); a bad value stops the operator at startup.

``--log-format json`` (default: ``KUBEFORGE_LOG_FORMAT``, else text; the chart's ``logFormat``) writes kopf's
JSON log lines, one object per line with the object's namespace and name, instead of kopf's text format.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
import urllib.parse
from collections.abc import Coroutine
from typing import Any

import kopf
from aiohttp import web

import kubeforge.controller.handlers  # noqa: F401  (registers the handlers)
from kubeforge.controller.kube import Kube, LeaseLock
from kubeforge.render import images
from kubeforge.runtime.contract import ENV_LOG_FORMAT

log = logging.getLogger("kubeforge.leader")
LOG_FORMATS = {"text": kopf.LogFormat.FULL, "json": kopf.LogFormat.JSON}


def _env_log_format() -> str:
    value = os.environ.get(ENV_LOG_FORMAT, "").strip().lower()
    return value if value in LOG_FORMATS else "text"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubeforge.controller")
    parser.add_argument("-n", "--namespace", action="append", default=[], help="watch only these (repeatable)")
    parser.add_argument("--liveness", default=None, help="e.g. http://0.0.0.0:8080/healthz")
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default=_env_log_format(),
        help=f"text, or json: one JSON object per line (default: ${ENV_LOG_FORMAT}, else text)",
    )
    election = parser.add_argument_group("leader election (one active replica)")
    election.add_argument("--leader-elect", action="store_true", help="act only while holding the Lease")
    election.add_argument("--lease-name", default="kubeforge-operator")
    election.add_argument("--lease-namespace", default=os.environ.get("POD_NAMESPACE") or "default")
    election.add_argument("--lease-duration", type=float, default=15.0, help="seconds a standby waits out")
    election.add_argument("--renew-deadline", type=float, default=10.0, help="seconds the leader may fail to renew")
    election.add_argument("--retry-period", type=float, default=2.0, help="seconds between Lease attempts")
    args = parser.parse_args(argv)
    if args.leader_elect and not args.renew_deadline + 2 * args.retry_period < args.lease_duration:
        parser.error("--renew-deadline + 2 x --retry-period must be shorter than --lease-duration")
    try:  # the workload images: the chart's `images` and `imageRegistry` values, as KUBEFORGE_IMAGE_* variables
        images.configure(images.from_env(os.environ))
    except ValueError as err:
        parser.error(str(err))
    # kopf's own formats: text with [namespace/name] prefixes, or JSON with the object's reference
    kopf.configure(verbose=args.verbose, log_format=LOG_FORMATS[args.log_format], log_refkey="object")
    logging.getLogger("kubeforge.images").info(
        "images: %s", ", ".join(f"{k}={v}" for k, v in vars(images.configured()).items())
    )
    return asyncio.run(run(args))


async def run(args: argparse.Namespace) -> int:
    def operator() -> Coroutine[Any, Any, None]:
        return kopf.operator(
            standalone=True,
            clusterwide=not args.namespace,
            namespaces=args.namespace,
            liveness_endpoint=args.liveness,
        )

    if not args.leader_elect:
        await operator()
        return 0
    # Lease requests time out within a retry period, so a hung one cannot outlast the renew deadline.
    kube = Kube(timeout=args.retry_period)
    lock = LeaseLock(kube, args.lease_namespace, args.lease_name, kube.identity, args.lease_duration)
    health = await _standby_liveness(args.liveness)
    log.info("standing by for lease %s/%s as %s", lock.namespace, lock.name, lock.identity)
    while not await asyncio.to_thread(lock.try_acquire_or_renew):
        await asyncio.sleep(args.retry_period)
    if health is not None:
        await health.cleanup()  # kopf serves liveness from here on, on the same port
    log.info("became the leader: lease %s/%s held by %s", lock.namespace, lock.name, lock.identity)
    acting = asyncio.create_task(operator())
    leading = asyncio.create_task(_keep_leading(lock, args.renew_deadline, args.retry_period))
    done, _ = await asyncio.wait({acting, leading}, return_when=asyncio.FIRST_COMPLETED)
    if leading in done:
        log.error("lost lease %s/%s (holder now %s): exiting before anyone else may act",
                  lock.namespace, lock.name, lock.holder())  # fmt: skip
        logging.shutdown()
        os._exit(1)  # no graceful stop: a handler thread must not write once the lease may be another's
    leading.cancel()
    await asyncio.to_thread(lock.release)
    log.info("released lease %s/%s", lock.namespace, lock.name)
    acting.result()
    return 0


async def _keep_leading(lock: LeaseLock, renew_deadline: float, retry_period: float) -> None:
    """Renew every retry period; return once renewing failed for the renew deadline or another holds it."""
    renewed = time.monotonic()
    while True:
        await asyncio.sleep(retry_period)
        if await asyncio.to_thread(lock.try_acquire_or_renew):
            renewed = time.monotonic()
        elif lock.holder() not in (None, lock.identity) or time.monotonic() - renewed > renew_deadline:
            return


async def _standby_liveness(endpoint: str | None) -> web.AppRunner | None:
    """A standby is alive too: answer the liveness probe until kopf takes the endpoint over."""
    if not endpoint:
        return None
    url = urllib.parse.urlparse(endpoint)

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"standby": True})

    app = web.Application()
    app.router.add_get(url.path or "/", healthz)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, url.hostname, url.port or 80).start()
    return runner


if __name__ == "__main__":
    sys.exit(main())
