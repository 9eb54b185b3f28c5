"""Ray's own text about failures goes to the run dir's log, and a dead worker's fault says why."""

from __future__ import annotations

import logging
from pathlib import Path

from farm.controller.cluster import restore_ray_messages, route_ray_messages
from farm.controller.worker_group import _first_line


def test_rays_driver_messages_and_logger_go_to_the_log_until_restored(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    import ray._private.worker as ray_worker

    restore_ray_messages()  # a controller run earlier in this process may have left its route in place
    original = ray_worker.print_to_stdstream
    log = tmp_path / "logs" / "ray.log"
    route_ray_messages(log)
    try:
        # What Ray's error listener thread does with a raylet's death notice.
        ray_worker.print_to_stdstream({"lines": ["Raylet is terminated.", "[state-dump] x"], "pid": "raylet",
                                       "is_err": False}, ignore_prefix=False)
        logging.getLogger("ray._private.worker").error("Unhandled error: a peer's collective failed")
    finally:
        restore_ray_messages()
    assert ray_worker.print_to_stdstream is original
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    text = log.read_text()
    assert "(raylet) Raylet is terminated." in text and "(raylet) [state-dump] x" in text
    assert "Unhandled error: a peer's collective failed" in text


def test_a_dead_workers_detail_is_rays_cause_in_one_sentence() -> None:
    node = RuntimeError("The actor died unexpectedly before finishing this task.\n\tclass_name: Worker\n"
                        "The actor died because its node has died. Node Id: 3d0f\n")
    process = RuntimeError("The actor died unexpectedly before finishing this task.\n\tpid: 7\nThe actor is "
                           "dead because its worker process has died. Worker exit type: SYSTEM_ERROR ...")
    assert _first_line(node) == "The actor died because its node has died"
    assert _first_line(process) == "The actor is dead because its worker process has died"
    assert _first_line(RuntimeError("The actor died unexpectedly before finishing this task.")) == (
        "The actor died unexpectedly before finishing this task")
