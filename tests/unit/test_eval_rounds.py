"""The eval stage's session plan on a GPU, where one server runs at a time: the real `plan_round` and
`run_one_at_a_time` over fake servers and in-memory results, so what is asserted is which server started how
often and which looks each scored."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from evals.scoring import SessionResult, Work
from evals.stage import EvalStage

LOOKS = (10, 20, 30, 40, 50)


@dataclass
class FakeResult:
    sequential: dict[str, Any]
    status: str = "scored"

    def model_copy(self, update: dict[str, Any]) -> FakeResult:
        return FakeResult(**({"sequential": self.sequential, "status": self.status} | update))


@dataclass
class FakeServer:
    name: str
    log: list[str]
    up: bool = False

    def start(self) -> FakeServer:
        if not self.up:
            self.log.append(f"start {self.name}")
            self.up = True
        return self

    def launch(self) -> FakeServer:
        return self.start()

    def stop(self) -> None:
        if self.up:
            self.log.append(f"stop {self.name}")
        self.up = False


@dataclass
class FakeVariant:
    name: str
    log: list[str]
    results: dict[tuple[str, str], FakeResult] = field(default_factory=dict)

    def server(self) -> FakeServer:
        return FakeServer(self.name, self.log)

    def save(self, res: FakeResult) -> None:
        self.results[(self.name, "t")] = res


def _stage(kind: str, settles: dict[str, int]) -> tuple[EvalStage, list[str], dict[tuple[str, str], FakeResult]]:
    """bf16 (the reference) and two variants on one sequential task of 5 looks; a variant in `settles`
    settles once it and the reference both have that many looks."""
    log: list[str] = []
    results: dict[tuple[str, str], FakeResult] = {}
    st = EvalStage.__new__(EvalStage)
    st.ctx = SimpleNamespace(platform=SimpleNamespace(kind=kind))
    st.reference, st.tasks = "bf16", ["t"]
    st.variants = {n: FakeVariant(n, log, results) for n in ("bf16", "fp8", "gptq-4")}
    st.preflight = dict.fromkeys(st.variants)
    st.failures, st.sessions, st.div, st.absent, st.quiet = {}, {}, None, 0, True
    st.reference_ahead = False
    st.settings = None
    st.req = SimpleNamespace(force=False)
    st.cached = lambda name, task: results.get((name, task))  # type: ignore[method-assign]
    st.spec = lambda task: SimpleNamespace(skip=None, sequential=True, looks=LOOKS)  # type: ignore[method-assign]

    def settled(name: str, task: str) -> str | None:
        mine = results[(name, task)].sequential["scored_looks"]
        theirs = results[("bf16", task)].sequential["scored_looks"]
        return "promote" if name in settles and min(mine, theirs) >= settles[name] else None

    st.settled = settled  # type: ignore[method-assign]

    def run_session(w: Work, server: Any = None, keep: bool = False) -> SessionResult:
        server = server or st.variants[w.variant].server()
        server.start()
        for task, look in w.tasks.items():
            assert look is not None
            have = results.get((w.variant, task))
            assert (have.sequential["scored_looks"] if have else 0) == look  # looks in order, none twice
            results[(w.variant, task)] = FakeResult({"scored_looks": look + 1, "looks": list(LOOKS)})
            log.append(f"score {w.variant} look {look + 1}")
        if not keep:
            server.stop()
        return SessionResult(w.variant)

    st.run_session = run_session  # type: ignore[method-assign]
    return st, log, results


def test_on_a_gpu_each_server_starts_once_and_a_variant_scores_its_looks_in_one_session():
    st, log, results = _stage("cuda", {"fp8": 2})
    st.run_local()
    starts = [e for e in log if e.startswith("start")]
    assert starts == ["start bf16", "start fp8", "start gptq-4"]  # K + 1 start-ups, the reference first
    assert all(log.count(f"stop {n}") == 1 for n in st.variants)
    assert results[("bf16", "t")].sequential["scored_looks"] == 5  # every look, at once
    assert results[("fp8", "t")].sequential["scored_looks"] == 2  # settled at look 2: no more items
    assert results[("gptq-4", "t")].sequential["scored_looks"] == 5
    # one server up at a time: every start follows the previous server's stop
    up = 0
    for e in log:
        up += e.startswith("start") - e.startswith("stop")
        assert up <= 1


def test_a_round_per_look_restarts_servers_without_the_reference_ahead():
    """What the GPU plan avoids: with the reference one look ahead (the CPU plan, where servers stay up in a
    pool), a look is a round, and one server at a time would start each variant once per look."""
    st, log, results = _stage("cuda", {"fp8": 2})
    rounds = 0
    while work := st.plan_round():
        rounds += 1
        for w in work:
            st.run_session(w)
        if rounds == 1:
            assert results[("bf16", "t")].sequential["scored_looks"] == 1  # one look, not all five
    assert rounds >= 5 and log.count("start gptq-4") == 5
    assert results[("fp8", "t")].sequential["scored_looks"] == 2
