"""The 1F1B schedule, its transfers under blocking send/recv, and real pipeline steps over gloo.

The schedule tests are pure. The simulator plays every stage's program against its neighbours with
rendezvous semantics (a send completes only when the matching receive is posted, and vice versa),
the strictest a transport can be, so a program it finishes cannot deadlock on gloo or NCCL.
The integration tests split a tiny transformer across 1, 2 and 3 processes and compare the loss and
every gradient with the same model run whole in one process.
"""

from __future__ import annotations

import copy
import gc
import json
import socket
import weakref
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from farm.runtime.pipeline import (
    Action,
    Instruction,
    PipelineStage,
    Transfer,
    one_f_one_b,
    run_pipeline_step,
    stage_program,
)

SHAPES = [(p, m) for p in range(1, 7) for m in range(1, 10)]


# -- schedule ---------------------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(("stages", "micro"), SHAPES)
def test_each_micro_batch_runs_forward_then_backward_once(stages: int, micro: int) -> None:
    for stage in range(stages):
        actions = one_f_one_b(stage=stage, stages=stages, micro_batches=micro)
        assert Counter(actions) == Counter(Action(k, i) for k in ("fwd", "bwd") for i in range(micro))
        pos = {a: n for n, a in enumerate(actions)}
        assert all(pos[Action("fwd", i)] < pos[Action("bwd", i)] for i in range(micro))
        # Micro-batches leave every stage in order, so the FIFO links deliver them in order too.
        assert [a.micro for a in actions if a.kind == "fwd"] == list(range(micro))
        assert [a.micro for a in actions if a.kind == "bwd"] == list(range(micro))


@pytest.mark.unit
@pytest.mark.parametrize(("stages", "micro"), SHAPES)
def test_in_flight_forwards_are_bounded_by_stages_left(stages: int, micro: int) -> None:
    for stage in range(stages):
        live, peak = 0, 0
        for a in one_f_one_b(stage=stage, stages=stages, micro_batches=micro):
            live += 1 if a.kind == "fwd" else -1
            peak = max(peak, live)
        # The whole point of 1F1B: memory for p - s micro-batches, not m as in GPipe.
        assert peak == min(stages - stage, micro)


@pytest.mark.unit
def test_warm_up_steady_and_cool_down_of_a_first_stage() -> None:
    got = [f"{a.kind[0]}{a.micro}" for a in one_f_one_b(stage=0, stages=4, micro_batches=6)]
    assert got == ["f0", "f1", "f2", "f3", "b0", "f4", "b1", "f5", "b2", "b3", "b4", "b5"]


@pytest.mark.unit
@pytest.mark.parametrize(("stage", "stages", "micro"), [(3, 3, 4), (-1, 2, 4), (0, 0, 1), (0, 2, 0)])
def test_impossible_positions_are_refused(stage: int, stages: int, micro: int) -> None:
    with pytest.raises(ValueError):
        one_f_one_b(stage=stage, stages=stages, micro_batches=micro)


@pytest.mark.unit
def test_stage_ranks_must_match_its_position() -> None:
    with pytest.raises(ValueError, match="prev_rank"):
        PipelineStage(stage=0, stages=2, prev_rank=1, next_rank=1, act_shape=(1, 2, 3))
    with pytest.raises(ValueError, match="next_rank"):
        PipelineStage(stage=1, stages=2, prev_rank=0, next_rank=2, act_shape=(1, 2, 3))


# -- transfers under blocking send/recv ---------------------------------------------------------------


class Deadlock(Exception):
    pass


@dataclass(frozen=True)
class Link:
    src: int
    dst: int
    index: int
    """The k-th message on the src -> dst link: links are FIFO, so the k-th send meets the k-th recv."""


def _links(stage: int, program: list[Instruction]) -> list[list[tuple[Link, Transfer]]]:
    seen: Counter[tuple[int, int, str]] = Counter()
    groups: list[list[tuple[Link, Transfer]]] = []
    for step in program:
        if isinstance(step, Action):
            groups.append([])
            continue
        group = []
        for t in step:
            peer = stage + t.peer_offset
            src, dst = (stage, peer) if t.op == "send" else (peer, stage)
            group.append((Link(src, dst, seen[(src, dst, t.op)]), t))
            seen[(src, dst, t.op)] += 1
        groups.append(group)
    return groups


def simulate(programs: list[list[Instruction]], *, t_fwd: float = 1.0, t_bwd: float = 2.0) -> float:
    """Play the stages' programs with rendezvous transfers; return the time the last stage finishes."""
    links = [_links(s, prog) for s, prog in enumerate(programs)]
    pc, clock = [0] * len(programs), [0.0] * len(programs)
    posted: dict[tuple[int, Link], tuple[float, Transfer]] = {}  # (stage, link) -> (post time, what)
    done: dict[Link, float] = {}
    progress = True
    while progress:
        progress = False
        for s, prog in enumerate(programs):
            while pc[s] < len(prog):
                step = prog[pc[s]]
                if isinstance(step, Action):
                    clock[s] += t_fwd if step.kind == "fwd" else t_bwd
                    pc[s], progress = pc[s] + 1, True
                    continue
                for link, t in links[s][pc[s]]:
                    posted.setdefault((s, link), (clock[s], t))
                    peer = link.dst if link.src == s else link.src
                    if (peer, link) in posted and link not in done:
                        (t0, mine), (t1, theirs) = posted[(s, link)], posted[(peer, link)]
                        assert (mine.what, mine.micro) == (theirs.what, theirs.micro), f"{mine} met {theirs}"
                        done[link] = max(t0, t1)
                if not all(link in done for link, _ in links[s][pc[s]]):
                    break
                clock[s] = max([clock[s]] + [done[link] for link, _ in links[s][pc[s]]])
                pc[s], progress = pc[s] + 1, True
    if any(pc[s] < len(prog) for s, prog in enumerate(programs)):
        raise Deadlock(f"stages stuck at steps {pc}")
    return max(clock)


def programs(stages: int, micro: int) -> list[list[Instruction]]:
    return [stage_program(stage=s, stages=stages, micro_batches=micro) for s in range(stages)]


@pytest.mark.unit
@pytest.mark.parametrize(("stages", "micro"), SHAPES)
def test_programs_finish_under_blocking_transfers_with_the_1f1b_bubble(stages: int, micro: int) -> None:
    t_fwd, t_bwd = 1.0, 2.0
    makespan = simulate(programs(stages, micro), t_fwd=t_fwd, t_bwd=t_bwd)
    bubble = 1 - micro * (t_fwd + t_bwd) / makespan
    assert bubble == pytest.approx((stages - 1) / (micro + stages - 1))


@pytest.mark.unit
@pytest.mark.parametrize("recv_first", [True, False])
def test_posting_a_steady_state_exchange_one_transfer_at_a_time_deadlocks(recv_first: bool) -> None:
    def one_at_a_time(program: list[Instruction]) -> list[Instruction]:
        out: list[Instruction] = []
        for step in program:
            if isinstance(step, Action):
                out.append(step)
            else:
                out += [(t,) for t in sorted(step, key=lambda t: (t.op == "send") == recv_first)]
        return out

    assert simulate(programs(2, 1)) > 0
    with pytest.raises(Deadlock):
        simulate([one_at_a_time(p) for p in programs(2, 2)])


@pytest.mark.unit
def test_transfers_go_to_neighbours_only_and_ends_talk_one_way() -> None:
    first, middle, last = programs(3, 4)
    groups = [[t for step in prog if not isinstance(step, Action) for t in step] for prog in (first, middle, last)]
    assert {(t.op, t.what) for t in groups[0]} == {("send", "act"), ("recv", "grad")}
    assert {(t.op, t.what) for t in groups[2]} == {("recv", "act"), ("send", "grad")}
    assert Counter((t.op, t.what) for t in groups[1]) == {(o, w): 4 for o in ("send", "recv") for w in ("act", "grad")}
    assert {t.peer_offset for g in groups for t in g} == {-1, 1}


# -- real pipeline steps over gloo ---------------------------------------------------------------------

LAYERS, D_MODEL, HEADS, SEQ, VOCAB, MICRO_BATCH = 4, 16, 2, 8, 64, 2


class TinyBlock(nn.Module):
    """Pre-norm causal attention and GELU MLP: every kind of layer a GPT stage holds."""

    def __init__(self) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(D_MODEL), nn.LayerNorm(D_MODEL)
        self.qkv, self.proj = nn.Linear(D_MODEL, 3 * D_MODEL), nn.Linear(D_MODEL, D_MODEL)
        self.up, self.down = nn.Linear(D_MODEL, 2 * D_MODEL), nn.Linear(2 * D_MODEL, D_MODEL)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, HEADS, D_MODEL // HEADS).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, D_MODEL))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D_MODEL)
        self.blocks = nn.ModuleList(TinyBlock() for _ in range(LAYERS))
        self.norm, self.head = nn.LayerNorm(D_MODEL), nn.Linear(D_MODEL, VOCAB, bias=False)

    def part(self, x: torch.Tensor, *, layers: range, targets: torch.Tensor | None) -> torch.Tensor:
        """Blocks ``layers``, with the embedding when they start at 0 and the loss when targets are given."""
        if layers.start == 0:
            x = self.embed(x)
        for i in layers:
            x = self.blocks[i](x)
        if targets is None:
            return x
        return F.cross_entropy(self.head(self.norm(x)).view(-1, VOCAB), targets.reshape(-1))

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.part(tokens, layers=range(LAYERS), targets=targets)


@dataclass(frozen=True)
class Case:
    ranks: tuple[int, ...]
    """Global rank of each stage, in pipeline order."""
    split: tuple[int, ...]
    """Transformer blocks per stage."""
    micro: int

    @property
    def name(self) -> str:
        return f"ranks{'-'.join(map(str, self.ranks))}_split{'-'.join(map(str, self.split))}_m{self.micro}"


CASES = [
    *(Case((0, 1), (2, 2), m) for m in (1, 2, 4, 5)),
    Case((2, 0), (3, 1), 4),
    *(Case((0, 1, 2), (1, 2, 1), m) for m in (1, 2, 4, 5)),
    Case((2, 0, 1), (2, 1, 1), 5),
    Case((1,), (4,), 3),
]


def _micro_batches(case: Case) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(len(case.ranks) * 100 + case.micro)
    tokens = torch.randint(0, VOCAB, (case.micro, MICRO_BATCH, SEQ + 1), generator=g)
    return [(t[:, :-1], t[:, 1:]) for t in tokens]


def _layers(case: Case, stage: int) -> range:
    lo = sum(case.split[:stage])
    return range(lo, lo + case.split[stage])


def _stage_fn(model: TinyLM, stage: int, case: Case, live: list[weakref.ref], peak: list[int]) -> Any:
    def stage_fn(x: torch.Tensor, *, micro: int, targets: torch.Tensor | None) -> torch.Tensor:
        out = model.part(x, layers=_layers(case, stage), targets=targets)
        if targets is None:
            live.append(weakref.ref(out))
            peak[0] = max(peak[0], sum(r() is not None for r in live))
        return out

    return stage_fn


def _run_case(rank: int, case: Case) -> dict[str, Any]:
    stage = case.ranks.index(rank)
    stages = len(case.ranks)
    torch.manual_seed(0)
    model = TinyLM()
    reference = copy.deepcopy(model)
    batches = _micro_batches(case)
    ref_loss = sum(reference(x, y) for x, y in batches) / case.micro
    ref_loss.backward()

    live: list[weakref.ref] = []
    peak, calls = [0], Counter[str]()

    def backward_fn(t: torch.Tensor, grad: torch.Tensor | None) -> None:
        calls["loss" if grad is None else "output"] += 1
        torch.autograd.backward(t, grad)

    st = PipelineStage(stage=stage, stages=stages, act_shape=(MICRO_BATCH, SEQ, D_MODEL),
                       prev_rank=case.ranks[stage - 1] if stage else None,
                       next_rank=case.ranks[stage + 1] if stage < stages - 1 else None)
    losses = run_pipeline_step(stage=st, stage_fn=_stage_fn(model, stage, case, live, peak),
                               get_micro=lambda i: batches[i], micro_batches=case.micro,
                               loss_scale=1 / case.micro, backward_fn=backward_fn)
    gc.collect()
    ref = dict(reference.named_parameters())
    with_grad = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return {
        "stage": stage,
        "loss_error": abs(float(losses.mean()) - ref_loss.item()) if losses is not None else None,
        "grad_error": max((p - ref[n].grad).abs().max().item() for n, p in with_grad.items()),  # type: ignore[operator]
        "grad_scale": max(ref[n].grad.abs().max().item() for n in with_grad),  # type: ignore[union-attr]
        "params": sorted(with_grad),
        "peak_in_flight": peak[0],
        "alive_after": sum(r() is not None for r in live),
        "backward_calls": dict(calls),
    }


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    results = {}
    for case in CASES:
        if rank in case.ranks:
            results[case.name] = _run_case(rank, case)
        dist.barrier()
    dist.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))


@pytest.fixture(scope="module")
def gloo_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[int, dict[str, Any]]]:
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("pipeline")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(3, port, str(out)), nprocs=3, join=True)
    by_case: dict[str, dict[int, dict[str, Any]]] = {}
    for rank in range(3):
        for name, result in json.loads(Path(out, f"rank{rank}.json").read_text()).items():
            by_case.setdefault(name, {})[rank] = result
    return by_case


def _stage_params(case: Case, stage: int) -> set[str]:
    names = {n for n, _ in TinyLM().named_parameters()}
    mine = {n for n in names if n.startswith(tuple(f"blocks.{i}." for i in _layers(case, stage)))}
    if stage == 0:
        mine |= {n for n in names if n.startswith("embed.")}
    if stage == len(case.ranks) - 1:
        mine |= {n for n in names if n.startswith(("norm.", "head."))}
    return mine


@pytest.mark.integration
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_pipeline_step_equals_the_whole_model_in_one_process(case: Case, gloo_results: dict) -> None:
    results = gloo_results[case.name]
    assert sorted(results) == sorted(case.ranks)
    for rank, r in results.items():
        stage = case.ranks.index(rank)
        assert set(r["params"]) == _stage_params(case, stage), "every parameter of the stage, and only those"
        assert r["grad_error"] < 1e-5 < 1e-3 < r["grad_scale"], "errors far below gradients that are not tiny"
        if stage == len(case.ranks) - 1:
            assert r["loss_error"] < 1e-5
            assert r["backward_calls"] == {"loss": case.micro}
        else:
            assert r["backward_calls"] == {"output": case.micro}
            assert r["peak_in_flight"] == min(len(case.ranks) - stage, case.micro)
            assert r["alive_after"] == 0, "activations are freed after their backward"



# -- one stage, no process group needed -----------------------------------------------------------------


@pytest.mark.unit
def test_one_stage_is_plain_gradient_accumulation() -> None:
    torch.manual_seed(0)
    w = torch.randn(4, 3, requires_grad=True)
    batches = [(torch.randn(2, 4), torch.randn(2, 3)) for _ in range(3)]
    asked: list[int] = []

    def get_micro(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        asked.append(i)
        return batches[i]

    def stage_fn(x: torch.Tensor, *, micro: int, targets: torch.Tensor | None) -> torch.Tensor:
        assert targets is not None
        return F.mse_loss(x @ w, targets)

    st = PipelineStage(stage=0, stages=1, prev_rank=None, next_rank=None, act_shape=(2, 3))
    losses = run_pipeline_step(stage=st, stage_fn=stage_fn, get_micro=get_micro, micro_batches=3, loss_scale=1 / 3)
    assert asked == [0, 1, 2]
    expected = [F.mse_loss(x @ w, y) for x, y in batches]
    assert losses is not None and torch.allclose(losses, torch.stack(expected).detach())
    grad = w.grad.clone()  # type: ignore[union-attr]
    w.grad = None
    (torch.stack(expected).sum() / 3).backward()
    assert torch.allclose(grad, w.grad)  # type: ignore[arg-type]


@pytest.mark.unit
def test_an_activation_of_the_wrong_shape_is_refused_before_it_is_sent() -> None:
    st = PipelineStage(stage=0, stages=2, prev_rank=None, next_rank=1, act_shape=(2, 8, 16))
    with pytest.raises(ValueError, match=r"stage 0 returned an activation of \(2, 8, 15\)"):
        run_pipeline_step(stage=st, stage_fn=lambda x, *, micro, targets: torch.zeros(2, 8, 15),
                          get_micro=lambda i: (torch.zeros(2, 8), torch.zeros(2, 8)), micro_batches=2)


@pytest.mark.unit
def test_the_last_stage_must_return_a_scalar_loss() -> None:
    st = PipelineStage(stage=0, stages=1, prev_rank=None, next_rank=None, act_shape=(2, 8, 16))
    with pytest.raises(ValueError, match="scalar loss"):
        run_pipeline_step(stage=st, stage_fn=lambda x, *, micro, targets: torch.zeros(2),
                          get_micro=lambda i: (torch.zeros(2, 8), torch.zeros(2, 8)), micro_batches=1)
