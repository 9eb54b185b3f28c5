"""Getting a Ray cluster for a farm: connect to one, or start a private one on 127.0.0.1.

Under CPU emulation (docs/design.md invariant 4) every node of the topology becomes a Ray node carrying
the farm's custom resources, so placement, node loss and re-planning run for real on one machine:
a one-node farm is a plain local Ray instance; a multi-node farm is one raylet per node
(``ray.cluster_utils.Cluster``). Ray's own console output is kept out of the user's terminal: what
its driver-side listener prints about dead workers and raylets goes to the run directory's
``logs/ray.log`` (:func:`route_ray_messages`).

A private emulated cluster declares a node dead within about 1.5 s of its raylet's death
(:data:`EMULATED_HEALTH_CHECK`) instead of Ray's 15-16.5 s; docs/runtime.md says what real clusters
should set.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from farm.errors import StartupFailure
from farm.topology import Farm

_QUIET_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
    "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
}

EMULATED_HEALTH_CHECK = {
    "health_check_period_ms": 500,
    "health_check_failure_threshold": 3,
    "health_check_timeout_ms": 2000,
}
"""How fast the GCS of a private emulated cluster declares a raylet dead. A killed raylet refuses the
GCS's health check at once, so a node is declared dead after period x threshold, about 1.5 s (Ray's
defaults, 3000 ms x 5 with a 10 s timeout, take 15-16.5 s). The timeout only matters for a raylet
that hangs: 2 s keeps a raylet on two cores busy with training from being declared dead by mistake."""


@dataclass
class RayHandle:
    """The cluster a run uses; `close()` stops what this process started and nothing else."""

    address: str | None
    started: bool
    cluster: Any = None

    def close(self) -> None:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        restore_ray_messages()
        if self.cluster is not None:
            self.cluster.shutdown()
            self.cluster = None


def _init_kwargs() -> dict[str, Any]:
    return {
        "include_dashboard": False,
        "log_to_driver": False,
        "logging_level": logging.ERROR,
        "configure_logging": True,
        "namespace": "farm",
    }


LOCAL = "local"
"""``run.ray_address`` value that always starts a private cluster, whatever RAY_ADDRESS says."""


def resolve_address(address: str | None, environ: Mapping[str, str]) -> tuple[str | None, str]:
    """(the cluster to join, None for a private one; where that choice came from).

    ``run.ray_address`` wins; left unset, the ``RAY_ADDRESS`` of the environment (set by
    ``ray job submit`` and by users who point their tools at a cluster) names the cluster to join.
    """
    if address == LOCAL:
        return None, f"run.ray_address={LOCAL}"
    if address is not None:
        return address, f"run.ray_address={address}"
    env = environ.get("RAY_ADDRESS", "").strip()
    if not env:
        return None, "no run.ray_address and no RAY_ADDRESS"
    if "://" in env:
        raise StartupFailure(
            f"RAY_ADDRESS={env} is a URL (a dashboard's, for `ray job submit`, or a Ray client's), not a "
            "cluster a driver joins: submit farm with `ray job submit --address "
            f"{env} -- python -m farm.launch ...`, pass run.ray_address=HOST:PORT (the GCS port, 6379 by "
            f"default), or run.ray_address={LOCAL} for a private cluster"
        )
    return env, f"RAY_ADDRESS={env}"


def connect(farm: Farm, *, address: str | None) -> RayHandle:
    """Join the cluster ``address`` (or RAY_ADDRESS) names, or start a private one shaped like ``farm``."""
    import ray

    os.environ.update({k: v for k, v in _QUIET_ENV.items() if k not in os.environ})
    if ray.is_initialized():
        return RayHandle(address=None, started=False)
    target, why = resolve_address(address, os.environ)
    if target is not None:
        _join(target, why)
        print(
            f"farm: using the Ray cluster at {ray.get_runtime_context().gcs_address} ({why}; "
            f"run.ray_address={LOCAL} starts a private one instead)",
            file=sys.stderr,
            flush=True,
        )
        return RayHandle(address=target, started=False)
    if farm.emulate != "cpu" and len(farm.nodes) > 1:
        raise StartupFailure(
            f"topology {farm.name!r} has {len(farm.nodes)} real nodes: start Ray on them (see launchers/) and "
            "pass run.ray_address=auto, or use a topology with emulate: cpu"
        )
    cpus = os.cpu_count() or 1
    if len(farm.nodes) == 1 and not farm.spares:
        resources = dict(farm.node_resources(farm.nodes[0]))
        # Ray counts GPUs itself and takes them as num_gpus, never among the custom resources.
        gpus = resources.pop("GPU", None)
        # address="local": always a new private instance, never one found in /tmp/ray by chance.
        ray.init(
            address="local",
            num_cpus=cpus,
            num_gpus=None if gpus is None else int(gpus),
            resources=resources,
            _node_ip_address="127.0.0.1",
            **_init_kwargs(),
        )
        return RayHandle(address=None, started=True)
    return _start_emulated_cluster(farm, cpus=cpus)


def _join(address: str, why: str) -> None:
    import ray
    from ray.exceptions import AuthenticationError

    if _token_refused(address):
        raise StartupFailure(
            f"{why}: the Ray cluster there uses token authentication and refused this driver's token (none "
            "or another). Give the driver the cluster's token: RAY_AUTH_MODE=token with RAY_AUTH_TOKEN=... "
            "or RAY_AUTH_TOKEN_PATH=FILE (or ~/.ray/auth_token), the token the head was started with"
        )
    try:
        ray.init(address=address, **_init_kwargs())
    except AuthenticationError as err:
        raise StartupFailure(
            f"{why}: the Ray cluster there uses token authentication and refused this driver's token "
            f"({_first_sentence(err)}). Give the driver the cluster's token: RAY_AUTH_MODE=token with "
            "RAY_AUTH_TOKEN=... or RAY_AUTH_TOKEN_PATH=FILE (or ~/.ray/auth_token), the token the head was "
            "started with"
        ) from None
    except (ConnectionError, RuntimeError, ValueError) as err:
        if _is_auth_refusal(err):
            raise StartupFailure(
                f"{why}: the Ray cluster there refused this driver (token authentication: "
                f"{_first_sentence(err)}). Set RAY_AUTH_MODE=token and the cluster's token (RAY_AUTH_TOKEN or "
                "RAY_AUTH_TOKEN_PATH) in the driver's environment"
            ) from None
        raise StartupFailure(
            f"{why}: cannot connect to a Ray cluster there ({_first_sentence(err)}); start one with "
            f"`ray start --head`, fix the address, or pass run.ray_address={LOCAL} to start a private one"
        ) from err


def _token_refused(address: str, timeout_s: float = 5.0) -> bool:
    """Whether the GCS at ``address`` refuses this driver's token, asked in one call.

    ``ray.init`` retries a refused token for about 20 s and then reports only "Failed to connect", its
    reason in C++ log lines; one gRPC call carrying the token Ray would send answers at once. Any other
    outcome (an answer, nothing listening, ``auto``) is left to ``ray.init`` and its own errors.
    """
    if ":" not in address:
        return False
    try:
        import grpc
        from ray._private.authentication.grpc_authentication_client_interceptor import (
            _get_authentication_metadata_tuple,
        )

        metadata = _get_authentication_metadata_tuple()
    except Exception:  # a Ray without token authentication: nothing to ask
        return False
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary("/ray.rpc.NodeInfoGcsService/GetClusterId")
        try:
            call(b"", timeout=timeout_s, metadata=metadata)
        except grpc.RpcError as err:
            return bool(err.code() == grpc.StatusCode.UNAUTHENTICATED)
    return False


def _is_auth_refusal(err: BaseException) -> bool:
    text = str(err).lower()
    return any(word in text for word in ("unauthenticated", "authentication", "auth token", "auth_token"))


def _first_sentence(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return (text.split(". ")[0] if text else type(err).__name__)[:300]


def _loopback_only() -> None:
    """Keep a private cluster on 127.0.0.1.

    Ray turns a loopback address into the host's own address when a driver connects
    (``resolve_ip_for_localhost``), which would miss raylets bound to 127.0.0.1. Ray's switch for
    single-host clusters makes its address lookup answer loopback instead; the variable reaches the
    processes Ray starts, and the constant this process read when it imported Ray.
    """
    import ray._private.ray_constants as constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    constants.ENABLE_RAY_CLUSTER = False


def _start_emulated_cluster(farm: Farm, *, cpus: int) -> RayHandle:
    import ray
    from ray.cluster_utils import Cluster

    _loopback_only()
    logging.getLogger("ray").setLevel(logging.WARNING)  # its notes on replaced cluster addresses

    # The head carries no farm node, so losing any farm node never takes the cluster down.
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": cpus,
            "node_ip_address": "127.0.0.1",
            "include_dashboard": False,
            "_system_config": dict(EMULATED_HEALTH_CHECK),
        },
    )
    for node in (*farm.nodes, *farm.spares):  # spares are up and idle, ready to take a lost node's place
        cluster.add_node(num_cpus=cpus, resources=farm.node_resources(node), node_ip_address="127.0.0.1")
    cluster.wait_for_nodes()
    # The driver joins as a loopback node too, or it looks for a raylet on the host's address.
    ray.init(address=cluster.address, _node_ip_address="127.0.0.1", **_init_kwargs())
    return RayHandle(address=cluster.address, started=True, cluster=cluster)


_ray_printer: Any = None
"""Ray's own printer while :func:`route_ray_messages` has replaced it."""
_ray_handlers: list[logging.Handler] | None = None
"""The handlers of Ray's logger while :func:`route_ray_messages` has replaced them."""


def route_ray_messages(path: Path) -> None:
    """Send what Ray's driver prints about the cluster (dead workers, raylet log dumps, nodes marked
    dead) to ``path`` instead of the console, until :meth:`RayHandle.close` shuts Ray down.

    Ray's error listener thread prints those messages through ``ray._private.worker.print_to_stdstream``
    and has no switch of its own (``log_to_driver=False`` covers only the workers' output); the
    ``ray`` logger (errors of calls nobody waited for: the collateral failures of a worker's peers)
    writes to the same file. farm's own
    line about a failure then reaches the console alone, and the log keeps Ray's detail for a
    post-mortem. The messages about a failure keep coming for a few seconds after the controller has
    stopped, hence "until Ray shuts down" rather than "while the controller runs".
    """
    global _ray_printer, _ray_handlers
    import ray._private.worker as ray_worker

    path.parent.mkdir(parents=True, exist_ok=True)

    def to_file(data: dict[str, Any], ignore_prefix: bool = False) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        source = data.get("pid", "ray")
        with open(path, "a") as log:
            for line in data.get("lines", []):
                log.write(f"{stamp} ({source}) {line}\n")

    if _ray_printer is None:
        _ray_printer = ray_worker.print_to_stdstream
    ray_worker.print_to_stdstream = to_file
    ray_logger = logging.getLogger("ray")
    if _ray_handlers is None:
        _ray_handlers = list(ray_logger.handlers)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s (%(name)s) %(levelname)s %(message)s"))
    ray_logger.handlers = [handler]


def restore_ray_messages() -> None:
    global _ray_printer, _ray_handlers
    if _ray_printer is not None:
        import ray._private.worker as ray_worker

        ray_worker.print_to_stdstream = _ray_printer
        _ray_printer = None
    if _ray_handlers is not None:
        ray_logger = logging.getLogger("ray")
        for handler in ray_logger.handlers:
            handler.close()
        ray_logger.handlers = _ray_handlers
        _ray_handlers = None
