"""One Ray actor per device, placed by the plan: a placement group with one bundle per node.

Every call to the group waits on all workers with a deadline and turns the first failure into a
typed error naming the rank, its node and what it was doing, so a dead worker or a hung collective
stops the run within seconds instead of hanging it.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Sequence
from typing import Any

from farm.controller.decisions import WorkerFault
from farm.errors import FarmError, StartupFailure, StartupTimeout, WorkerFailure
from farm.plan import Plan
from farm.runtime.worker import Worker, WorkerSpec, heartbeat_path
from farm.topology import AcceleratorSpec, Farm


class WorkerFailed(WorkerFailure):
    def __init__(self, message: str, fault: WorkerFault) -> None:
        super().__init__(message)
        self.fault = fault


class StartupFailed(StartupFailure):
    """A worker failed while starting; ``fault`` names it (None: no single worker is to blame)."""

    def __init__(self, message: str, fault: WorkerFault | None = None) -> None:
        super().__init__(message)
        self.fault = fault


class StartupTimedOut(StartupTimeout):
    """The workers did not come up in time; ``fault`` names the first late one, if any."""

    def __init__(self, message: str, fault: WorkerFault | None = None) -> None:
        super().__init__(message)
        self.fault = fault


NODE_DEATH_WAIT_S = 3.0
"""How long a worker's death is checked against its node's before it counts as a process death: on
a private emulated cluster the GCS declares a dead raylet's node dead within about 1.5 s."""


def _bundle(spec: AcceleratorSpec, devices: int, node_resources: dict[str, float]) -> dict[str, float]:
    bundle: dict[str, float] = {spec.ray_resource: float(devices)}
    # Pin the bundle to its farm node: emulated nodes carry a resource naming them.
    bundle.update({k: 0.001 for k in node_resources if k != spec.ray_resource})
    return bundle


def actor_name(rank: int, node: str) -> str:
    """What the Ray dashboard and `ray list actors` show for a worker."""
    return f"farm-rank-{rank}@{node}"


_groups_started = 0
"""Worker groups this driver has started: each gets its own Ray namespace, ``farm-<pid>-a<n>``, so
the actor names of a group rebuilt after a failure never meet those of the group it replaces, whose
actors Ray may still be tearing down (``ray.kill`` returns before the names are free)."""


def unplaceable(
    bundles: Sequence[dict[str, float]], nodes: Sequence[dict[str, Any]], *, spread: bool
) -> list[int]:
    """Indices of the bundles that no alive node of ``nodes`` (``ray.nodes()``) could ever hold, by
    its total resources; with ``spread`` each bundle needs a node of its own."""
    totals = [n.get("Resources", {}) for n in nodes if n.get("Alive")]
    fits = [
        [i for i, total in enumerate(totals) if all(total.get(k, 0.0) >= v for k, v in b.items())]
        for b in bundles
    ]
    taken: set[int] = set()
    missing = []
    for index in sorted(range(len(bundles)), key=lambda i: len(fits[i])):  # scarcest first
        free = [i for i in fits[index] if i not in taken] if spread else fits[index]
        if not free:
            missing.append(index)
        elif spread:
            taken.add(free[0])
    return sorted(missing)


def ray_start_command(resources: dict[str, float], *, address: str) -> str:
    """The `ray start` that adds a node carrying ``resources`` to the cluster at ``address``."""
    flags = [f"--address={address}"]
    custom = dict(resources)
    if "GPU" in custom:
        flags.append(f"--num-gpus={int(custom.pop('GPU'))}")
    if "CPU" in custom:
        flags.append(f"--num-cpus={int(custom.pop('CPU'))}")
    if custom:
        text = json.dumps({k: int(v) if float(v).is_integer() else v for k, v in custom.items()})
        flags.append(f"--resources='{text}'")
    return "ray start " + " ".join(flags)


def _actor_resources(spec: AcceleratorSpec) -> dict[str, Any]:
    if spec.ray_resource == "GPU":
        return {"num_cpus": 0, "num_gpus": 1}
    if spec.ray_resource == "CPU":
        return {"num_cpus": 1}
    return {"num_cpus": 0, "resources": {spec.ray_resource: 1}}


class WorkerGroup:
    def __init__(self, *, farm: Farm, plan: Plan, run_dir: str, startup_timeout_s: float) -> None:
        import ray
        from ray.util.placement_group import placement_group

        self.plan, self.run_dir = plan, run_dir
        nodes = list(dict.fromkeys(r.node for r in plan.ranks))
        by_id = {n.id: n for n in farm.nodes}
        self.node_of = {r.rank: r.node for r in plan.ranks}
        specs = {n: farm.accelerator(by_id[n].pool) for n in nodes}
        bundles = [
            _bundle(
                specs[n],
                sum(1 for r in plan.ranks if r.node == n),
                farm.node_resources(by_id[n]) if farm.emulate == "cpu" else {},
            )
            for n in nodes
        ]
        strategy = "PACK" if farm.emulate == "cpu" else "STRICT_SPREAD"
        _check_resources(farm, self.node_of, nodes, bundles, spread=strategy == "STRICT_SPREAD")
        global _groups_started
        self.namespace = f"farm-{os.getpid()}-a{_groups_started}"
        _groups_started += 1
        self.pg = placement_group(bundles, strategy=strategy, name=self.namespace)
        deadline = time.monotonic() + startup_timeout_s
        while not ray.wait([self.pg.ready()], timeout=min(1.0, max(0.0, deadline - time.monotonic())))[0]:
            # A node that leaves while the group waits for it (a second loss during a recovery)
            # can never hold its bundle: say so now rather than at the start-up timeout.
            missing = unplaceable(bundles, ray.nodes(), spread=strategy == "STRICT_SPREAD")
            if missing:
                ray.util.remove_placement_group(self.pg)
                gone = nodes[missing[0]]
                raise StartupFailed(
                    f"starting workers: node {gone} left the cluster before its workers could start",
                    _node_lost(self.node_of, gone, "its node was lost before its workers started"),
                )
            if time.monotonic() >= deadline:
                ray.util.remove_placement_group(self.pg)
                raise StartupTimedOut(
                    f"the farm's devices were not available within run.startup_timeout_s={startup_timeout_s}: "
                    f"Ray could not place {bundles} (cluster resources: {ray.cluster_resources()}). Check that "
                    "the cluster has the nodes the topology describes"
                )
        # Which Ray node holds each farm node's bundle: a start-up call watches these, because an
        # actor whose bundle's node died waits for it to be placed again and never fails.
        placed = ray.util.placement_group_table(self.pg).get("bundles_to_node_id", {})
        self._bundle_nodes = {nodes[int(i)]: node_id for i, node_id in placed.items()}
        self.actors: list[Any] = []
        try:
            self._start_actors(farm, plan, run_dir, specs, nodes, startup_timeout_s)
        except BaseException:
            # A group that fails to start (a node lost meanwhile, a timeout) frees its devices at
            # once: the recovery's next attempt must be able to place its own group on them.
            self._release()
            raise

    def _start_actors(self, farm: Farm, plan: Plan, run_dir: str, specs: dict[str, AcceleratorSpec],
                      nodes: list[str], startup_timeout_s: float) -> None:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        world = plan.world_size
        threads = max(1, (os.cpu_count() or 1) // world) if farm.emulate == "cpu" else 4
        actor_cls = ray.remote(max_restarts=0, max_task_retries=0)(Worker)
        for r in sorted(plan.ranks, key=lambda r: r.rank):
            spec = specs[r.node]
            wspec = WorkerSpec(
                rank=r.rank,
                world_size=world,
                torch_device=spec.torch_device,
                backend=spec.backend,
                ds_accelerator=spec.ds_accelerator,
                run_dir=run_dir,
                threads=threads,
                torch_module=spec.torch_module,
            )
            strategy_obj = PlacementGroupSchedulingStrategy(
                placement_group=self.pg, placement_group_bundle_index=nodes.index(r.node)
            )
            # No runtime_env: an actor with one of its own cannot take a worker process that Ray
            # started ahead for the job, and waits for a new one (1.4 s more for two actors here).
            # The worker sets its environment itself, before it imports DeepSpeed.
            self.actors.append(
                actor_cls.options(
                    scheduling_strategy=strategy_obj,
                    name=actor_name(r.rank, r.node),
                    namespace=self.namespace,
                    **_actor_resources(spec),
                ).remote(wspec)
            )
        self.infos = self.call("info", timeout=startup_timeout_s, what="starting workers", startup=True)

    def call(
        self,
        method: str,
        *args: Any,
        timeout: float,
        what: str,
        ranks: Sequence[int] | None = None,
        startup: bool = False,
        **kwargs: Any,
    ) -> list[Any]:
        """Call ``method`` on the workers (all, or ``ranks``) and return their results in rank order."""
        chosen = range(len(self.actors)) if ranks is None else ranks
        refs = {getattr(self.actors[r], method).remote(*args, **kwargs): r for r in chosen}
        return self._gather(refs, timeout=timeout, what=what, startup=startup)

    def _gather(self, refs: dict[Any, int], *, timeout: float, what: str, startup: bool) -> list[Any]:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        results: dict[int, Any] = {}
        pending = list(refs)
        deadline = time.monotonic() + timeout
        while pending:
            left = max(0.0, deadline - time.monotonic())
            ready, pending = ray.wait(pending, num_returns=1, timeout=min(left, 1.0) if startup else left)
            if not ready and startup and left > 1.0:
                gone = self._lost_node()
                if gone is None:
                    continue
                raise StartupFailed(f"{what}: node {gone} was lost while its workers started",
                                    _node_lost(self.node_of, gone, "its node was lost while starting"))
            if not ready:
                late = sorted(refs[p] for p in pending)
                frozen = self._frozen(late)
                blamed = (frozen or late)[0]
                why = (
                    f"rank(s) {frozen} stopped (no heartbeat); {_ranks(late)} waited on them"
                    if frozen
                    else f"{_ranks(late)} gave no answer (a hung collective or a stalled node)"
                )
                fault = WorkerFault(
                    rank=blamed,
                    node=self.node_of[blamed],
                    kind="timeout",
                    detail=f"no answer within {timeout:.0f}s" + (", no heartbeat" if frozen else ""),
                )
                error = StartupTimedOut if startup else WorkerFailed
                raise self._error(
                    error,
                    f"{what}: {why} within {timeout:.0f}s; blamed rank {blamed} on node {fault.node}",
                    fault,
                )
            rank = refs[ready[0]]
            node = self.node_of[rank]
            try:
                results[rank] = ray.get(ready[0])
            except RayActorError as err:
                fault = self._death(rank, err)
                how = "lost with its node" if fault.loses_node else "died"
                raise self._error(
                    StartupFailed if startup else WorkerFailed,
                    f"{what}: worker rank {rank} on node {node} {how} ({fault.detail})",
                    fault,
                ) from None
            except RayTaskError as err:
                cause = err.cause
                if isinstance(cause, FarmError):
                    raise cause from None
                # A peer that died makes the others' collectives fail first: blame it, not them.
                lost = self._find_lost(pending, refs)
                if lost is not None:
                    how = "lost with its node" if lost.loses_node else "died"
                    raise self._error(
                        StartupFailed if startup else WorkerFailed,
                        f"{what}: worker rank {lost.rank} on node {lost.node} {how} ({lost.detail})",
                        lost,
                    ) from None
                fault = WorkerFault(
                    rank=rank, node=node, kind="error", detail=f"{type(cause).__name__}: {cause}"
                )
                raise self._error(
                    StartupFailed if startup else WorkerFailed,
                    f"{what}: worker rank {rank} on node {node} failed: {fault.detail} "
                    f"(full traceback in the run directory's logs/rank-{rank:05d}.log)",
                    fault,
                ) from None
            except GetTimeoutError:  # pragma: no cover - ray.wait said it was ready
                continue
        return [results[r] for r in sorted(results)]

    def _lost_node(self) -> str | None:
        """A farm node of this group whose Ray node is no longer alive, or None."""
        import ray

        alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
        for node, node_id in self._bundle_nodes.items():
            if node_id not in alive:
                return node
        return None

    def _frozen(self, ranks: list[int], stale_s: float = 3.0) -> list[int]:
        """Those of ``ranks`` whose heartbeat stopped: the process is stopped or frozen, not waiting.
        Heartbeats come every second; three missed ones are a stop, not a slow thread."""
        now = time.time()
        frozen = []
        for rank in ranks:
            try:
                if now - heartbeat_path(self.run_dir, rank).stat().st_mtime > stale_s:
                    frozen.append(rank)
            except OSError:
                continue
        return frozen

    def _find_lost(
        self, pending: list[Any], refs: dict[Any, int], timeout: float = 20.0
    ) -> WorkerFault | None:
        """A worker whose node Ray reports dead, or whose part of the same call ended with the
        actor's death; None if neither shows up within ``timeout``."""
        import ray
        from ray.exceptions import RayActorError

        node_ids = {rank: info["node_id"] for rank, info in enumerate(getattr(self, "infos", []))}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = {n["NodeID"] for n in ray.nodes() if not n["Alive"]}
            for rank in sorted(r for r, node_id in node_ids.items() if node_id in dead):
                return WorkerFault(
                    rank=rank, node=self.node_of[rank], kind="node_lost", detail="its node was lost"
                )
            if pending:
                ready, pending = ray.wait(pending, num_returns=1, timeout=1.0)
                for ref in ready:
                    try:
                        ray.get(ref)
                    except RayActorError as err:
                        return self._death(refs[ref], err)
                    except Exception:  # another collateral failure; keep looking
                        continue
            else:
                time.sleep(1.0)
        return None

    def _death(self, rank: int, err: BaseException) -> WorkerFault:
        """A dead worker's fault: ``node_lost`` when its node is gone too (a raylet's workers die with
        it, before the GCS has declared the node dead), else ``died``."""
        import ray

        node = self.node_of[rank]
        detail = _first_line(err)
        if "node has died" in str(err) or "node was terminated" in str(err):
            return WorkerFault(rank=rank, node=node, kind="node_lost", detail=detail)
        if "worker process has died" in str(err):  # its raylet saw the process go: the node is up
            return WorkerFault(rank=rank, node=node, kind="died", detail=detail)
        node_id = self.infos[rank]["node_id"] if rank < len(getattr(self, "infos", [])) else None
        deadline = time.monotonic() + NODE_DEATH_WAIT_S
        while node_id is not None:
            if any(n["NodeID"] == node_id and not n["Alive"] for n in ray.nodes()):
                return WorkerFault(
                    rank=rank, node=node, kind="node_lost", detail=f"its node was lost; {detail}"
                )
            if time.monotonic() >= deadline:
                break
            time.sleep(0.25)
        return WorkerFault(rank=rank, node=node, kind="died", detail=detail)

    @staticmethod
    def _error(cls: type[FarmError], message: str, fault: WorkerFault) -> FarmError:
        if issubclass(cls, WorkerFailed | StartupFailed | StartupTimedOut):
            return cls(message, fault)
        return cls(message)

    def shutdown(self, *, graceful: bool) -> None:
        if graceful:
            with contextlib.suppress(FarmError):
                self.call("shutdown", timeout=120, what="shutting down")
        self._release()

    def _release(self) -> None:
        """Kill the actors and remove the placement group (also of a node that is gone)."""
        import ray

        for actor in self.actors:
            with contextlib.suppress(Exception):  # an actor already dead with its node
                ray.kill(actor, no_restart=True)
        ray.util.remove_placement_group(self.pg)


def _node_lost(node_of: dict[int, str], node: str, detail: str) -> WorkerFault:
    """The fault of a node lost while its group starts, blamed on its first rank."""
    return WorkerFault(rank=min(r for r, n in node_of.items() if n == node), node=node, kind="node_lost",
                       detail=detail)


def _check_resources(
    farm: Farm, node_of: dict[int, str], nodes: list[str], bundles: list[dict[str, float]], *, spread: bool
) -> None:
    """Fail at once, with the `ray start` that would fix it, when the cluster can never place the
    group, instead of waiting out run.startup_timeout_s. The error names the first missing node as
    lost, so a recovery that loses another node before its group starts decides again."""
    import ray

    missing = unplaceable(bundles, ray.nodes(), spread=spread)
    if not missing:
        return
    by_id = {n.id: n for n in farm.nodes}
    address = ray.get_runtime_context().gcs_address
    commands = []
    for index in missing:
        node = by_id[nodes[index]]
        wanted = farm.node_resources(node) if farm.emulate == "cpu" else dict(bundles[index])
        commands.append(f"  node {node.id}: {ray_start_command(wanted, address=address)}")
    raise StartupFailed(
        f"the Ray cluster at {address} has no node for {len(missing)} of the topology's {len(bundles)} "
        f"node(s) ({farm.name!r} asks for {[bundles[i] for i in missing]}; the cluster has "
        f"{ray.cluster_resources()}). Add them, one `ray start` per node, on the machines that hold the "
        "devices:\n" + "\n".join(commands),
        _node_lost(node_of, nodes[missing[0]], "the cluster has no node for it"),
    )


def _first_line(err: BaseException) -> str:
    """The line of a Ray error that says why: Ray's cause ("...because its node has died") rather than
    its generic first line, when it gives one."""
    text = str(err).strip().splitlines()
    telling = [
        line.strip()
        for line in text
        if any(word in line.lower() for word in ("died", "lost", "exit", "dead"))
    ]
    causes = [line for line in telling if "died unexpectedly before finishing" not in line]
    chosen = causes or telling
    if chosen:  # its first sentence: the rest (exit type, common causes) is in logs/ray.log
        return chosen[0].split(". ")[0].rstrip(".")[:300]
    return text[0][:300] if text else type(err).__name__


def _ranks(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks}"
