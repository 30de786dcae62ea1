"""The actor pipeline (issue 13): sources prefetched, encoding and writing overlapped with sampling.

Without Ray: the worker runs in this process with the stand-in sampler, instrumented to log
when each unit's sources load and when each batch samples. The driver's side (which unit an
actor is told comes next) is tested on :class:`UnitQueue` alone.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

import engine.generate.worker as worker
import engine.shards as shards
from engine.generate.config import PlanConfig, SamplerConfig
from engine.generate.distributor import UnitQueue
from engine.generate.plan import WorkUnit, build_plan
from engine.generate.worker import ShardGenerator, part_path
from engine.manifest import read_manifest
from gen_fixtures import CLASS_NAMES, StandInSampler, make_real_set


@pytest.fixture(scope="module")
def units(tmp_path_factory) -> list[WorkUnit]:
    """Four units of 5 samples (2 batches of 3 + 2) over a small real set."""
    real = make_real_set(tmp_path_factory.mktemp("real"), n_train=6, n_val=2)
    plan = build_plan(PlanConfig(w=[2.0], lambdas=[0.5, 1.0], samples_per_source=2, samples_per_shard=5, seed=3), real)
    return [u for u in plan.units if len(u.items) == 5][:4]


class LoggingSampler(StandInSampler):
    """The stand-in that appends ``("sample", first seed, start, end)`` to a shared log."""

    def __init__(self, log: list[tuple], delay: float) -> None:
        super().__init__(delay)
        self.log = log

    def sample(self, images, scribbles, class_names, w, lam, seeds, colours=None):  # noqa: ANN001 (Protocol shape)
        start = time.perf_counter()
        out = super().sample(images, scribbles, class_names, w, lam, seeds)
        self.log.append(("sample", seeds[0], start, time.perf_counter()))
        return out


def _generator(out: Path, log: list[tuple] | None = None, delay: float = 0.0, **kw) -> ShardGenerator:
    sampler = StandInSampler(delay) if log is None else LoggingSampler(log, delay)
    return ShardGenerator("unused", str(out), CLASS_NAMES, SamplerConfig(batch_size=3),
                          factory=lambda *_: sampler, **kw)


def _slow_loads(gen: ShardGenerator, log: list[tuple], seconds: float) -> None:
    """Make ``gen``'s source reads take ``seconds`` and log ``("load", first key, start, end)``."""
    load = gen._load

    def slow(unit: WorkUnit):
        start = time.perf_counter()
        time.sleep(seconds)
        out = load(unit)
        log.append(("load", unit.keys[0], start, time.perf_counter()))
        return out

    gen._load = slow


def test_next_units_sources_load_while_this_unit_samples(units, tmp_path: Path) -> None:
    log: list[tuple] = []
    gen = _generator(tmp_path, log, delay=0.05)  # 2 batches: ~0.25 s of sampling per unit
    _slow_loads(gen, log, 0.2)
    first, second = units[0], units[1]
    gen.run(first, next_unit=second)
    loads = [e for e in log if e[0] == "load"]
    assert [e[1] for e in loads] == [first.keys[0], second.keys[0]]
    own = [e for e in log if e[0] == "sample" and e[1] in {it.seed for it in first.items}]
    assert loads[1][2] < own[-1][3], "the next unit's read must start before this unit's sampling ends"
    # ... and its first batch was sampled before its own run was even called
    assert [e for e in log if e[0] == "sample" and e[1] == second.items[0].seed]
    before = len(log)
    gen.run(second)
    assert [e[0] for e in log[before:]] == ["sample"], "the run reads nothing and samples only its last batch"
    assert len(list(shards.read_shard(tmp_path / second.shard))) == 5


def test_a_wrong_hint_costs_work_not_correctness(units, tmp_path: Path) -> None:
    gen = _generator(tmp_path)
    gen.run(units[0], next_unit=units[1])  # the driver gave units[1] to another actor
    result = gen.run(units[2])
    assert result.samples == 5
    assert [s.key for s in shards.read_shard(tmp_path / units[2].shard)] == units[2].keys
    assert not (tmp_path / units[1].shard).exists()


def _frozen_clock(monkeypatch) -> None:
    """Timings are the only bytes that differ between two runs: stop the clock the worker sees."""
    clock = SimpleNamespace(perf_counter=lambda: 0.0)
    monkeypatch.setattr(worker, "time", clock)
    monkeypatch.setattr(shards, "time", clock)


@pytest.fixture
def torch_threads():
    """A CPU actor pins torch's thread count; give this test process its own back."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 3], ids=["one-encoder", "three-encoders"])
def test_pipelined_output_is_byte_identical_to_a_serial_run(units, tmp_path: Path, monkeypatch, threads: int,
                                                            torch_threads) -> None:
    """Pipelined, and with a batch's images encoded on several threads: the bytes of a serial run."""
    _frozen_clock(monkeypatch)
    serial, piped = tmp_path / "serial", tmp_path / "piped"
    gen = _generator(serial, write_ahead=0)
    for unit in units:
        gen.run(unit)
    encoded_on: dict[str, str] = {}  # key -> the thread that encoded it
    encode = shards.encode_sample

    def logged(sample, image_format):  # noqa: ANN001
        encoded_on[sample.key] = threading.current_thread().name
        return encode(sample, image_format)

    monkeypatch.setattr(shards, "encode_sample", logged)
    gen = _generator(piped, write_ahead=2, num_threads=threads)
    for unit, hint in zip(units, units[1:] + [None]):
        gen.run(unit, next_unit=hint)
    for unit in units:
        assert (piped / unit.shard).read_bytes() == (serial / unit.shard).read_bytes()
        (a, a_info), (b, b_info) = read_manifest(part_path(piped, unit.shard)), read_manifest(part_path(serial, unit.shard))
        assert a.to_pylist() == b.to_pylist() and a_info.extra == b_info.extra
    assert sorted(p.name for p in piped.rglob("*")) == sorted(p.name for p in serial.rglob("*"))
    # one CPU stays with the sampler: 3 CPUs give 2 encoder threads, 1 CPU the writer thread alone;
    # the last unit (no next one to sample ahead) encodes its last batch on the tail encoders
    tail = set(units[-1].keys[3:])  # batches of 3: its second batch
    usual = {n for k, n in encoded_on.items() if k not in tail}
    assert 1 <= len(usual) <= max(1, threads - 1)
    assert all(n.startswith("png-encoder" if threads > 2 else "shard-writer") for n in usual)
    assert all(encoded_on[k].startswith("png-tail-encoder") for k in tail)


def test_the_first_units_sources_load_while_the_model_loads(units, tmp_path: Path, monkeypatch) -> None:
    """``first_unit`` (the driver's hint at actor start) is read in the loader thread during the
    model load, so the first run reads nothing."""
    log: list[str] = []
    loading = threading.Event()

    def slow_model(*_):
        assert loading.wait(5), "the first unit's read must start before the model has loaded"
        time.sleep(0.3)  # a model load; the read finishes meanwhile
        log.append("model loaded")
        return StandInSampler()

    load = ShardGenerator._load

    def logged_load(self, unit):
        loading.set()
        out = load(self, unit)
        log.append(f"load {unit.keys[0]}")
        return out

    monkeypatch.setattr(ShardGenerator, "_load", logged_load)
    gen = ShardGenerator("unused", str(tmp_path), CLASS_NAMES, SamplerConfig(batch_size=3), factory=slow_model,
                         first_unit=units[0])
    assert log == [f"load {units[0].keys[0]}", "model loaded"]
    result = gen.run(units[0])
    assert log == [f"load {units[0].keys[0]}", "model loaded"]  # the run read nothing more
    assert result.samples == 5 and [s.key for s in shards.read_shard(tmp_path / units[0].shard)] == units[0].keys


@pytest.mark.parametrize("hinted", [True, False], ids=["next-unit", "last-unit"])
@pytest.mark.parametrize("threads", [1, 3], ids=["one-encoder", "three-encoders"])
@pytest.mark.parametrize("failing_batch", [0, 1])
def test_a_writer_thread_failure_fails_the_unit_with_nothing_visible(units, tmp_path: Path, monkeypatch,
                                                                     failing_batch: int, threads: int, hinted: bool,
                                                                     torch_threads) -> None:
    unit = units[0]
    bad_key = unit.keys[3 * failing_batch]  # batches of 3: the first sample of that batch
    encode = shards.encode_sample
    writer_threads, failed_on = set(), []

    def failing_encode(sample, image_format):  # noqa: ANN001
        writer_threads.add(threading.current_thread().name)
        if sample.key == bad_key:
            failed_on.append(threading.current_thread().name)
            raise OSError("disk full (injected)")
        return encode(sample, image_format)

    monkeypatch.setattr(shards, "encode_sample", failing_encode)
    gen = _generator(tmp_path, delay=0.01, num_threads=threads)
    with pytest.raises(OSError, match="disk full"):
        gen.run(unit, next_unit=units[1] if hinted else None)
    encoder = "png-encoder" if threads > 2 else "shard-writer"
    on_tail = not hinted and failing_batch == 1  # a last unit's last batch: the tail encoders
    assert failed_on and failed_on[0].startswith("png-tail-encoder" if on_tail else encoder)
    assert all(name.startswith((encoder, "png-tail-encoder")) for name in writer_threads)
    assert list(tmp_path.rglob("*")) == [], "no shard, temp file or part may be left"
    monkeypatch.setattr(shards, "encode_sample", encode)
    assert gen.run(unit).samples == 5  # the writer thread is not wedged: a retry writes the whole shard


def test_sampling_ahead_failure_fails_the_next_unit_only(units, tmp_path: Path) -> None:
    gen = _generator(tmp_path)
    first, second = units[0], units[1]
    sample = gen.sampler.sample

    def fails_on_second(images, scribbles, names, w, lam, seeds, colours=None):  # noqa: ANN001
        if seeds[0] == second.items[0].seed:
            raise RuntimeError("CUDA out of memory (injected)")
        return sample(images, scribbles, names, w, lam, seeds, colours)

    gen.sampler.sample = fails_on_second
    assert gen.run(first, next_unit=second).samples == 5
    with pytest.raises(RuntimeError, match="out of memory"):
        gen.run(second)
    assert not (tmp_path / second.shard).exists()
    gen.sampler.sample = sample
    assert gen.run(second).samples == 5


def test_write_behind_bounds_the_batches_in_flight() -> None:
    from concurrent.futures import ThreadPoolExecutor

    release, running, most = threading.Event(), [], [0]

    def job() -> None:
        running.append(1)
        most[0] = max(most[0], len(running))
        release.wait(5)
        running.pop()

    queued = []
    with ThreadPoolExecutor(1) as pool, worker.WriteBehind(pool, 2) as queue:
        for _ in range(2):
            queued.append(queue.submit(job))
        blocked = threading.Thread(target=queue.submit, args=(job,))
        blocked.start()
        blocked.join(0.2)
        assert blocked.is_alive(), "a third batch must wait while two are in flight"
        release.set()
        blocked.join(5)
        queue.drain()
    assert most[0] == 1 and all(f.done() for f in queued)


def _u(i: int) -> WorkUnit:
    return WorkUnit(i, f"s{i}.tar", 2.0, 1.0, ())


def test_unit_queue_hints_each_actor_its_next_unit_and_steals_at_the_tail() -> None:
    queue = UnitQueue([_u(i) for i in range(5)], num_actors=2)
    ran: dict[int, list[tuple[int, int | None]]] = {0: [], 1: []}

    def dispatch(actor: int) -> None:
        unit = queue.take(actor)
        hint = queue.reserve(actor)
        ran[actor].append((unit.index, hint.index if hint else None))

    dispatch(0), dispatch(0), dispatch(1)
    assert ran == {0: [(0, 1), (1, 2)], 1: [(3, 4)]}
    dispatch(1)  # its reservation first: the hint was right
    assert ran[1][-1] == (4, None) and not queue.pending
    dispatch(1)  # the queue is empty: actor 1 takes actor 0's reservation (its hint is then wrong)
    assert ran[1][-1] == (2, None) and not queue
    assert queue.take(0) is None


def test_unit_queue_returns_a_dead_actors_reservation_first() -> None:
    queue = UnitQueue([_u(i) for i in range(4)], num_actors=2)
    assert (queue.take(0).index, queue.reserve(0).index) == (0, 1)
    queue.release(0)
    queue.push_front(_u(0))  # its running unit is retried too, ahead of the reservation
    assert [queue.take(1).index, queue.reserve(1).index] == [0, 1]
    assert queue.take(0).index == 2 and [u.index if u else None for u in queue.reserved] == [None, 1]


def test_each_actor_starts_with_the_unit_reserved_for_it(monkeypatch) -> None:
    """The pool tells each actor its first unit when it is created (the most expensive first);
    the driver then gives each actor exactly that unit first."""
    ray = pytest.importorskip("ray")
    from engine.generate.distributor import Distributor, PoolShape

    created: list[dict] = []

    class Remote:
        def options(self, **_):
            return self

        def remote(self, **kwargs):
            created.append(kwargs)
            return object()

    monkeypatch.setattr(ray, "remote", lambda cls: Remote())
    units = [WorkUnit(i, f"s{i}.tar", 2.0, lam, ()) for i, lam in enumerate([0.5, 1.0, 0.5, 1.0, 0.5])]
    pool = Distributor(PoolShape("cpu", 3), {"model_dir": "m"}, units)
    assert [(kw["model_dir"], kw["first_unit"].index) for kw in created] == [("m", 1), ("m", 3), ("m", 0)]  # λ = 1 first
    load = [0, 0, 0]
    sent = pool.queue.dispatch(load, 2, [True, True, True])
    # each actor gets its own first unit, then one more each while units last: none is left idle
    assert [(a, u.index, h.index if h else None) for a, u, h in sent] == [
        (0, 1, 2), (1, 3, 4), (2, 0, None), (0, 2, None), (1, 4, None)]
    assert load == [2, 2, 1] and not pool.queue


@pytest.mark.parametrize("n_units", [2, 4])
def test_a_small_run_starts_every_actor_before_any_queues_a_second_unit(n_units: int) -> None:
    """With fewer units than actors x in-flight slots, filling actor 0 first used to give it a
    second unit (even another actor's reservation) while a later actor got none."""
    queue = UnitQueue([_u(i) for i in range(n_units)], num_actors=3)
    first = [queue.reserve(a) for a in range(3)]  # the pool reserves each actor's first unit at creation
    sent = queue.dispatch([0, 0, 0], 2, [True, True, True])
    per_actor = {a: [u.index for b, u, _ in sent if b == a] for a in range(3)}
    assert all(per_actor[a][:1] == ([first[a].index] if first[a] else []) for a in range(3))
    busy = [a for a in range(3) if per_actor[a]]
    assert len(busy) == min(3, n_units) and sum(map(len, per_actor.values())) == n_units


def test_an_idle_actor_steals_a_busy_ones_reservation_at_the_tail() -> None:
    queue = UnitQueue([_u(i) for i in range(3)], num_actors=2)
    assert [(a, u.index, h and h.index) for a, u, h in queue.dispatch([0, 0], 1, [True, True])] == [(0, 0, 1), (1, 2, None)]
    assert queue.dispatch([1, 1], 2, [False, True]) == []  # actor 1 has work in flight: it does not steal
    assert [(a, u.index) for a, u, _ in queue.dispatch([1, 0], 1, [True, True])] == [(1, 1)]  # actor 1 is idle: it does
    assert not queue
