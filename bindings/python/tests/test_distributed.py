"""Sharded steps over torch.distributed (gloo on the CPU, 2 and 3 processes, uneven shards):
mulo.torch with DTensor parameters (plain ``Shard(0)`` DTensors and FSDP2's ``fully_shard``).
The ranks run in spawned processes (``_sharded_workers.py``), one spawn per world size shared
by the tests (process start-up is most of their time), under a deadline, so that a hang fails
the test instead of stalling the suite."""

from __future__ import annotations

import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import _sharded_workers as workers

pytestmark = pytest.mark.skipif(not dist.is_gloo_available(), reason="torch.distributed without gloo")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(fn, world, tmp_path, deadline=180.0):
    """Runs ``fn(rank, world, port, out)`` on ``world`` spawned processes; fails on an error in
    any rank or when they are not all done by the deadline (a hang, e.g. a collective that
    never completes: the process group's own timeout is 30 s)."""
    ctx = mp.start_processes(fn, args=(world, free_port(), str(tmp_path)), nprocs=world, join=False, start_method="spawn")
    end = time.monotonic() + deadline
    try:
        while not ctx.join(timeout=max(0.1, end - time.monotonic())):
            if time.monotonic() > end:
                raise AssertionError(f"{fn.__name__} on {world} ranks did not finish in {deadline:.0f} s (hang)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return tmp_path


def results(out, what, world):
    return [torch.load(out / f"{what}{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    return run_ranks(workers.two_ranks, 2, tmp_path_factory.mktemp("two"))


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    return run_ranks(workers.three_ranks, 3, tmp_path_factory.mktemp("three"))


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_golden_model_equals_single_process_resumes_and_skips_nan(world, request):
    res = results(request.getfixturevalue({2: "two", 3: "three"}[world]), "golden", world)
    r0 = res[0]
    print(f"{world} ranks: vs single process {max(r0['vs_ref'].values()):.2g}, "
          f"vs PyLO {max(r0['vs_pylo'].values()):.2g} of the displacement, bitwise {r0['bitwise']}, "
          f"{r0['collectives'][0]} all-reduces and {r0['bytes'][0]} bytes per step, "
          f"median step {sorted(r0['step_times'])[len(r0['step_times']) // 2] * 1e3:.1f} ms, "
          f"of which all_reduce {sorted(r0['comm_times'])[len(r0['comm_times']) // 2] * 1e3:.2f} ms; "
          f"the same all-reduces alone {r0['gloo_step'] * 1e3:.2f} ms (values per round {r0['round_values']})")
    for r in res:
        # Every tensor, every step: the sharded step equals the single-process one.
        for name, err in r["vs_ref"].items():
            assert err <= 1e-5, f"{name}: {err:.3g} of its displacement"
        for name, err in r["vs_pylo"].items():
            assert err <= 1e-4, f"{name} vs PyLO: {err:.3g}"
        # Clipping on: header (norms, non-finite counts), 2 levels of partial sums, guard.
        assert r["collectives"] == [4] * 20
        assert r["bytes"] == r0["bytes"]
        assert r["resumed_bitwise"]
        assert r["skipped"] == [r["victim"]]
        assert r["victim_unchanged"]
        assert r["second_step_report"].get("skipped", []) == []
        assert r["finite"]


def test_mismatched_shard_layouts_are_a_clear_error_not_a_hang(two):
    res = results(two, "mismatch", 2)
    for r in res:
        assert r["error"] is not None and "shard layouts differ between ranks" in r["error"], r["error"]
        assert r["unchanged"]
    assert res[0]["error"] == res[1]["error"]


def test_a_refused_sharded_step_or_load_changes_nothing_in_any_group(two):
    res = results(two, "refusals", 2)
    for r in res:
        assert len(r["results"]) == 6 * 3 + 1
        for cause, gi, err, unchanged in r["results"]:
            assert err is not None, f"{cause} in group {gi} was not refused"
            assert unchanged, f"{cause} in group {gi} changed something: {err}"
        assert r["step"] == [3, 3, 3]
        assert r["copy_error"] is not None and "DTensor" in r["copy_error"]
    errors = {(c, gi): e for c, gi, e, _ in res[0]["results"]}
    assert "param_groups[2]: lr=1e+39" in errors[("lr=1e39", 2)]
    assert "lr=True" in errors[("lr=True", 1)]
    assert "non-finite" in errors[("nan gradient on rank 0 (nonfinite='error')", 2)]
    assert "overlaps" in errors[("grad is the param", 1)]
    assert "param_groups[2], parameter `w2`, state `mom`: dtype torch.bfloat16" in errors[("load bf16 mom", 2)]


def test_strided_shards_are_staged_through_host_copies_bitwise(two):
    res = results(two, "staged", 2)
    for r in res:
        # The 2-d and 4-d tensors' shards are column-major views (the 1-d and 0-d ones cannot be).
        assert len(r["noncontiguous"]) >= 3, r["noncontiguous"]
        assert r["still_strided"] == r["noncontiguous"]  # stepped in place, not replaced
        assert r["same_params"] and r["same_state"]
        assert r["skipped"] == [r["victim"]]
        assert r["victim_unchanged"] and r["others_stepped"]


def test_fsdp2_fully_shard_trains_like_a_single_process(three):
    res = results(three, "fsdp2", 3)
    for r in res:
        assert r["losses"][-1] < 0.8 * r["losses"][0], r["losses"]  # 0.70 -> 0.52
        # FSDP2 averages the ranks' gradients (reduce-scatter): equal to the single-process
        # gradient up to rounding, which the learned optimizer carries on.
        for a, b in zip(r["losses"], r["ref_losses"]):
            assert abs(a - b) <= 1e-4 * abs(b)
        assert max(r["errs"]) <= 1e-3, r["errs"]
        # Given FSDP2's own (gathered) gradients, the single-process step is the sharded one.
        assert max(r["same_errs"]) <= 1e-5, r["same_errs"]
    print("FSDP2: losses", [f"{x:.4f}" for x in res[0]["losses"]], "worst param error vs a single process",
          f"{max(res[0]['errs']):.2g}; with FSDP2's gradients {max(res[0]['same_errs']):.2g}, bitwise {res[0]['same_bitwise']}")
    # Uneven shards: 23 rows over 3 ranks are 8, 8, 7; 5 rows are 2, 2, 1; 2 rows are 1, 1, 0.
    assert [r["local_shapes"][0][0] for r in res] == [8, 8, 7]
    assert [r["local_shapes"][2][0] for r in res] == [2, 2, 1]
    assert [r["local_shapes"][4][0] for r in res] == [1, 1, 0]
