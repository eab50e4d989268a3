"""A long-lived ClientApp process for one SuperNode started with ``--isolation process``.

flwr 1.42 runs every ClientApp message in a fresh process: in ``subprocess`` isolation the
SuperNode's ``flower-superexec`` polls its Runtime API (``AcquireTask``, every
``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` s, default 1) and starts one ``flwr-clientapp --token T``
per message (``SubprocessExecutor.launch``), which pulls that one task, runs it and exits
(``flwr.supernode.runtime.run_clientapp.run_clientapp`` ends in ``flwr_exit``). Nothing in 1.42
keeps a ClientApp process alive: the warm executor pools are Kubernetes-only and not for
ClientApps (docs/flower.md §3.2). So each message paid Python's start-up, the imports of flwr
and torch, and building the node's data again.

In ``process`` isolation the SuperNode launches nothing and waits for an outside process to
acquire its tasks. This worker is that process, for fisherguard's deployment: it imports flwr,
torch and the ClientApp once, then loops ``AcquireTask`` and runs each task *in this process*
with flwr's own steps of ``run_clientapp`` (``pull_task_input``, ``install_from_fab``, the
FAB's ClientApp loaded by ``get_load_client_app_fn``, ``push_message``, ``push_task_output``,
a task heartbeat), so the ClientApp's per-process cache (``client_app.node_for``) serves every
later message of a run. A ClientApp exception becomes the same error reply ``flwr-clientapp``
sends; the worker keeps serving. It exits when the SuperNode (``--parent-pid``) is gone.

    python -m fisherguard.engine.flower.clientapp_worker --runtime-api-address 127.0.0.1:PORT \
        [--parent-pid PID] [--poll SECONDS]
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from fisherguard.engine.flower import require_flwr

POLL_S = 0.05  # seconds between AcquireTask calls while idle (a local HTTP call)


def available() -> bool:
    """Whether the installed flwr has the ``run_clientapp`` steps this worker reuses (they are
    flwr internals, read on 1.42); the launcher falls back to flwr's per-message processes if not."""
    try:
        from flwr.clientapp.utils import get_load_client_app_fn  # noqa: F401
        from flwr.proto.runtime_pb2 import AcquireTaskRequest  # noqa: F401
        from flwr.supercore.heartbeat import (HeartbeatSender,  # noqa: F401
                                              make_task_heartbeat_fn_http)
        from flwr.supercore.runtime import RuntimeHttpClient  # noqa: F401
        from flwr.supernode.runtime.run_clientapp import (pull_task_input,  # noqa: F401
                                                          push_message, push_task_output)
    except ImportError:
        return False
    return True


def _task_client(address: str, token: str) -> tuple[Any, Any]:
    """The Runtime API client of one task (``run_clientapp``'s), and its retry invoker."""
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supercore.runtime.tracing import RuntimeTracingInterceptor

    invoker = make_simple_http_retry_invoker()
    client = RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None,
        interceptors=[RuntimeTracingInterceptor(),
                      RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                      RuntimeTokenHttpInterceptor(token)],
        retry_invoker=invoker)
    return client, invoker


def run_task(address: str, token: str) -> bool:
    """One task, as ``flwr-clientapp --token`` runs it, in this process; True when it completed."""
    from logging import ERROR

    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.cli.install import install_from_fab
    from flwr.clientapp.client_app import LoadClientAppError
    from flwr.clientapp.utils import get_load_client_app_fn
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore import log
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supernode.runtime.run_clientapp import (pull_task_input, push_message,
                                                      push_task_output)

    client, invoker = _task_client(address, token)
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    message = context = reply = None
    status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
    try:
        heartbeat.start()
        message, context, run, fab = pull_task_input(client)
        install_from_fab(fab.content, skip_prompt=True)  # returns at once when installed
        load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
        client_app = load(run.fab_id, run.fab_version, fab.hash_str)  # sys.modules: imported once
        reply = client_app(message=message, context=context)
        status, details = SubStatus.COMPLETED, ""
    except Exception as ex:  # noqa: BLE001 - flwr-clientapp's own handling: an error reply
        code, reason = ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{type(ex)}:<'{ex}'>"
        if isinstance(ex, LoadClientAppError):
            code = ErrorCode.LOAD_CLIENT_APP_EXCEPTION
            reason = "An exception was raised when attempting to load `ClientApp`"
        log(ERROR, "ClientApp raised an exception", exc_info=ex)
        details = reason
        if message is not None:
            reply = Message(Error(code=code, reason=reason), reply_to=message)
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
        except Exception as ex:  # noqa: BLE001
            log(ERROR, "Failed to push reply message", exc_info=ex)
        invoker.max_tries = 1  # as run_clientapp's exit handler: do not block on the final status
        push_task_output(client=client, context=context, sub_status=status, details=details)
        if heartbeat.is_running:
            heartbeat.stop()
        client.close()
    return status == SubStatus.COMPLETED


def serve(address: str, poll: float = POLL_S) -> None:
    """Acquire and run this SuperNode's ClientApp tasks until the process is stopped."""
    import httpx
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    acquirer = RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
        retry_invoker=make_simple_http_retry_invoker())
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value])
    try:
        while True:
            try:
                res = acquirer.AcquireTask(request)
            except httpx.HTTPError:  # the SuperNode is not listening yet
                time.sleep(max(poll, 0.2))
                continue
            if res.HasField("task") and res.token:
                run_task(address, res.token)
            else:
                time.sleep(poll)
    finally:
        acquirer.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runtime-api-address", required=True,
                    help="the SuperNode's Runtime API (its --host:--port), plain HTTP")
    ap.add_argument("--parent-pid", type=int, help="exit when this process (the SuperNode) ends")
    ap.add_argument("--poll", type=float, default=POLL_S, help="seconds between idle polls")
    args = ap.parse_args(argv)
    require_flwr()
    from flwr.supercore.app_utils import start_parent_process_monitor

    if args.parent_pid is not None:
        start_parent_process_monitor(args.parent_pid)  # SIGINT to us when the SuperNode is gone
    import fisherguard.engine.flower.client_app  # noqa: F401 - torch and the app, before any task

    try:
        serve(args.runtime_api_address, args.poll)
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
