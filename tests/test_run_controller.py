"""One tab's run lifecycle (``RunController``, ``ModelPool``), driven without Gradio."""

import dataclasses
from pathlib import Path
import stat
import threading
import time

import numpy as np
import pytest
import torch

from autoencoder_concat_predictor_world_model import AutoencoderConcatPredictorWorldModel
from checkpoints import CheckpointError, RefusedFiles, checkpoint_summaries
from conftest import TINY, FakeSession
from model_pool import ModelPool
from run_controller import RunBusyError, RunController, in_compute_thread
from run_history import RunSnapshots
from toroidal_dot_robot import ToroidalDotRobot



_REFUSED_FILES: dict = {}  # one RefusedFiles per checkpoint folder, as the app shares one among its tabs


def controller(tmp_path, **kwargs) -> RunController:
    kwargs.setdefault("refused_files", _REFUSED_FILES.setdefault(tmp_path, RefusedFiles()))
    c = RunController(checkpoint_path=tmp_path / "autoencoder.pth", config=TINY, device="cpu", **kwargs)
    c.load_session(FakeSession(n=12))
    return c


def run(c: RunController, n: int) -> list[dict]:
    return [m for m in c.run(n) if m is not None]


def test_a_run_yields_its_start_then_every_iteration_and_finishes_with_a_save_and_attention(tmp_path):
    c = controller(tmp_path)
    assert c.status().state == "idle" and c.status().model_step is None and not c.has_model
    events = list(c.run(5))
    assert events[0] is None and [m["iteration"] for m in events[1:]] == [1, 2, 3, 4, 5]
    status = c.status()
    assert (status.state, status.done, status.total, status.model_iteration) == ("done", 5, 5, 5)
    assert c.origin.kind == "fresh" and c.saved.ok and c.saved.iteration == 5
    assert (tmp_path / "autoencoder.pth").is_file()
    assert c.attention is not None and c.attention_at == (5, status.model_step)
    assert c.start_frame == 5 and len(c.history) == 5  # the next run continues from the run's position


def test_a_second_controller_resumes_from_the_saved_checkpoint(tmp_path):
    first = controller(tmp_path)
    run(first, 4)
    second = controller(tmp_path)
    run(second, 1)
    assert second.origin.kind == "loaded" and second.origin.step == first.status().model_step
    assert second.status().model_iteration == 5


def test_a_run_without_a_session_or_while_another_runs_is_refused(tmp_path):
    bare = RunController(checkpoint_path=tmp_path / "x.pth", config=TINY, device="cpu")
    with pytest.raises(ValueError, match="no session"):
        next(bare.run(1))
    c = controller(tmp_path, run_lock_wait_s=0.1)
    first = c.run(3)
    next(first)  # started: holds the run lock
    with pytest.raises(RunBusyError):
        next(c.run(1))
    assert len(list(first)) == 3


def refusing_tabs(tmp_path, damaged: bytes, n: int = 2) -> list:
    """``n`` controllers that refused the same damaged checkpoint, each with a started run of 2."""
    (tmp_path / "autoencoder.pth").write_bytes(damaged)
    runs = []
    for _ in range(n):
        c = controller(tmp_path)
        events = c.run(2)
        assert next(events) is None and c.origin.kind == "refused"
        runs.append((c, events))
    return runs


def test_two_tabs_finishing_at_once_set_a_refused_checkpoint_aside_once_and_never_lose_it(tmp_path):
    damaged = b"not a checkpoint" * 64
    runs = refusing_tabs(tmp_path, damaged)
    barrier = threading.Barrier(len(runs))

    def finish(events):
        barrier.wait()
        list(events)

    threads = [threading.Thread(target=finish, args=(events,)) for _, events in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    kept = list(tmp_path.glob("autoencoder.refused-*.pth"))
    assert len(kept) == 1 and kept[0].read_bytes() == damaged  # the refused file, once, byte for byte
    assert sorted(c.saved.set_aside is None for c, _ in runs) == [False, True]
    reader = controller(tmp_path)
    run(reader, 1)
    assert reader.origin.kind == "loaded"  # what sits at the path is a valid checkpoint


def test_a_tab_that_refused_a_file_leaves_another_tabs_fresh_save_where_it_is(tmp_path):
    damaged = b"damaged"
    (first, first_run), (second, second_run) = refusing_tabs(tmp_path, damaged)
    list(first_run)  # sets the damaged file aside and saves its own model
    assert first.saved.set_aside is not None
    list(second_run)  # the file it refused is gone: it must not move the first tab's save
    assert second.saved.ok and second.saved.set_aside is None and "left alone" in second.saved.reason
    kept = list(tmp_path.glob("autoencoder.refused-*.pth"))
    assert len(kept) == 1 and kept[0].read_bytes() == damaged


def test_a_tab_saving_over_a_file_another_tab_refused_sets_it_aside_first(tmp_path):
    holder = controller(tmp_path)
    run(holder, 2)  # has its model: it will not read the file again
    damaged = b"damaged later"
    (tmp_path / "autoencoder.pth").write_bytes(damaged)
    refuser = controller(tmp_path)
    events = refuser.run(1)
    assert next(events) is None and refuser.origin.kind == "refused"
    run(holder, 1)  # refused by the other tab: kept before this save replaces it
    kept = list(tmp_path.glob("autoencoder.refused-*.pth"))
    assert len(kept) == 1 and kept[0].read_bytes() == damaged and holder.saved.set_aside == kept[0].name
    list(events)
    assert refuser.saved.ok and refuser.saved.set_aside is None and "left alone" in refuser.saved.reason
    assert len(list(tmp_path.glob("autoencoder.refused-*.pth"))) == 1


def test_a_released_controller_neither_saves_nor_builds_a_model_again(tmp_path):
    c = controller(tmp_path)
    events = c.run(50)
    next(events), next(events)
    c.release()  # the tab closed mid-run
    rest = list(events)
    assert len(rest) <= 1 and c.saved is None and not (tmp_path / "autoencoder.pth").exists()
    deadline = time.monotonic() + 5
    while c.has_model and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not c.has_model and c.world_model() is None


def test_a_start_frame_set_during_a_run_outlives_the_run(tmp_path):
    c = controller(tmp_path)
    for metrics in c.run(4):
        if metrics is not None and metrics["iteration"] == 2:
            c.set_start_frame(9)  # the slider moved while the run goes
    assert c.start_frame == 9
    run(c, 1)
    assert c.world_model().robot.index == 10  # the second run replayed from frame 9


def test_a_stop_sent_just_before_the_run_starts_stops_that_run(tmp_path):
    c = controller(tmp_path, stop_grace_s=2.0)
    answer = []
    stopper = threading.Thread(target=lambda: answer.append(c.stop(wait_s=10)))
    stopper.start()
    time.sleep(0.2)  # the Stop is handled first: nothing is running yet
    metrics = run(c, 50)
    stopper.join(10)
    assert metrics == [] and answer == ["stopped"]
    status = c.status()
    assert (status.state, status.done, status.total) == ("stopped", 0, 50)
    assert len(run(c, 2)) == 2  # that stop is used up: the next run goes


def test_a_stop_is_taken_by_a_run_whose_model_is_slow_to_build(tmp_path, monkeypatch):
    c = controller(tmp_path, stop_grace_s=0.5)
    create = RunController._create
    monkeypatch.setattr(RunController, "_create", lambda self: (time.sleep(1.5), create(self))[1])
    runner = threading.Thread(target=lambda: run(c, 20))
    runner.start()
    time.sleep(0.1)  # the run holds its lock while its model is built (longer than the grace)
    assert c.stop(wait_s=30) == "stopped"
    runner.join(30)
    assert c.status().done == 0


def test_a_stop_with_nothing_running_answers_idle_and_a_later_run_goes(tmp_path):
    c = controller(tmp_path, stop_grace_s=0.2)
    assert c.stop(wait_s=1) == "idle"
    time.sleep(0.3)
    assert len(run(c, 2)) == 2


def test_a_run_stopped_at_zero_reports_the_loaded_models_step_and_saves_nothing(tmp_path):
    run(controller(tmp_path), 6)
    saved = (tmp_path / "autoencoder.pth").stat().st_mtime_ns
    c = controller(tmp_path, stop_grace_s=5.0)
    stopper = threading.Thread(target=c.stop, kwargs={"wait_s": 30})
    stopper.start()  # pressed just before Run: the run honours it
    time.sleep(0.1)
    assert run(c, 10) == []
    stopper.join(30)
    status = c.status()
    assert status.done == 0 and status.model_step == c.origin.step > 0 and status.model_iteration == 6
    assert c.saved is None and (tmp_path / "autoencoder.pth").stat().st_mtime_ns == saved  # another tab's newer save stays


def test_a_cancelled_run_is_finished_by_stop(tmp_path):
    c = controller(tmp_path)
    events = c.run(50)
    next(events), next(events)
    events.close()  # what Gradio does to a cancelled generator
    assert c.saved is None and c.status().state == "stopped"  # not "done": it did 1 of 50
    assert c.stop(wait_s=5) == "stopped"
    assert c.saved.ok and c.saved.iteration == 1 and c.status().state == "stopped"


def test_an_unreadable_frame_ends_the_run_keeping_the_iterations_done(tmp_path):
    c = RunController(checkpoint_path=tmp_path / "a.pth", config=TINY, device="cpu")
    c.load_session(FakeSession(n=12, broken_from=3))
    metrics = run(c, 10)
    status = c.status()
    assert len(metrics) == 3 and status.state == "stopped" and "frame_000003.png" in status.problem
    assert c.saved.ok and c.saved.iteration == 3


def test_a_parked_model_reloads_at_its_next_use_and_continues_exactly(tmp_path):
    folder = tmp_path / "parked"
    folder.mkdir()
    parked, kept = controller(tmp_path / "a"), controller(tmp_path / "b")
    for c in (parked, kept):
        run(c, 4)
    assert parked.park(folder) and parked.is_parked and parked.status().model_iteration == 4
    assert len(list(folder.iterdir())) == 1
    assert parked.attention is not None  # recaptured from the reloaded model
    assert not parked.is_parked and not list(folder.iterdir())
    np.testing.assert_array_equal(parked.attention.weights, kept.attention.weights)
    assert parked.park(folder)
    after_park, straight = run(parked, 3), run(kept, 3)
    assert [m["prediction_error"] for m in after_park] == [m["prediction_error"] for m in straight]
    assert [m["training_loss"] for m in after_park] == [m["training_loss"] for m in straight]


class _RunsCode:
    """Unpickling this touches a file: what a planted park file would try to run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_planted_park_file_runs_no_code_when_the_tab_reloads(tmp_path):
    folder = tmp_path / "parked"
    folder.mkdir()
    c = controller(tmp_path / "a")
    run(c, 3)
    assert c.park(folder)
    (park_file,) = folder.iterdir()
    marker = tmp_path / "ran"
    torch.save({"model": _RunsCode(marker)}, park_file)  # another account swaps the file
    assert c.world_model() is not None  # reloading refuses the file
    assert not marker.exists(), "the park file ran code"
    assert "could not be reloaded" in c.status().problem


def test_the_pool_parks_idle_and_least_recently_used_models_and_release_deletes_the_file(tmp_path):
    pool = ModelPool(idle_s=3600, max_resident=1, sweep_s=3600)
    try:
        a = controller(tmp_path / "a", pool=pool)
        b = controller(tmp_path / "b", pool=pool)
        run(a, 3)
        run(b, 3)  # b's model makes two: a (least recently used) is parked
        assert a.is_parked and not b.is_parked and pool.resident() == [b]
        assert a.status().model_iteration == 3
        run(a, 1)  # a's next use reloads it and parks b
        assert not a.is_parked and b.is_parked and a.status().model_iteration == 4
        assert pool.sweep(now=time.monotonic() + 7200) == 1 and a.is_parked
        files = list(pool.folder.iterdir())
        assert len(files) == 2
        a.release()
        b.release()
        deadline = time.monotonic() + 5
        while list(pool.folder.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not list(pool.folder.iterdir()) and not a.has_model
    finally:
        pool.close()
    assert not pool.folder.exists()


def test_the_cap_skips_a_running_model_and_parks_the_next_and_a_cancelled_run_is_finished_then_parked(tmp_path):
    pool = ModelPool(idle_s=3600, max_resident=1, sweep_s=3600)
    try:
        busy, idle, new = (controller(tmp_path / name, pool=pool) for name in ("busy", "idle", "new"))
        running = busy.run(50)
        next(running), next(running)  # busy is the least recently used, and running
        run(idle, 2)
        run(new, 2)  # over the cap: busy cannot be parked, so idle is
        assert idle.is_parked and not busy.is_parked
        running.close()  # busy's run is cancelled: its finish is pending
        assert busy.saved is None
        assert pool.sweep(now=time.monotonic() + 7200) == 2  # finished (saved), then parked; new parked too
        assert busy.is_parked and busy.saved.ok and busy.status().state == "stopped"
    finally:
        pool.close()


def test_a_failed_park_keeps_the_model_and_a_failed_reload_makes_a_new_one(tmp_path):
    c = controller(tmp_path)
    run(c, 3)
    assert not c.park(tmp_path / "no_such_folder") and not c.is_parked  # nothing raised, still in memory
    folder = tmp_path / "parked"
    folder.mkdir()
    assert c.park(folder)
    next(folder.iterdir()).write_bytes(b"garbage")
    assert c.world_model() is not None and "could not be reloaded" in c.status().problem
    assert not list(folder.iterdir()) and c.status().model_iteration in (0, 3)


def test_training_masks_follow_mask_ratio_and_prediction_masks_the_whole_slot(tmp_path):
    cfg = dataclasses.replace(TINY, mask_ratio=0.25, replay_batch_size=1)
    wm = AutoencoderConcatPredictorWorldModel(ToroidalDotRobot(seed=1), device="cpu", config=cfg)
    wm.run(4)
    slot = int(wm.patch_mask.sum())
    assert int(wm.last_training_mask.sum()) == round(0.25 * slot)
    assert bool((wm.last_training_mask <= wm.patch_mask).all())  # only slot patches are masked
    masks = wm._training_mask(3)
    assert masks.shape == (3, wm.patch_mask.numel()) and not torch.equal(masks[0], masks[1])
    assert wm.last_prediction is not None  # predicted with the whole slot masked
    full = AutoencoderConcatPredictorWorldModel(ToroidalDotRobot(seed=1), device="cpu", config=TINY)
    assert full._training_mask(3) is full.patch_mask


# -----------------------------------------------------------------------------
# run history: what the page showed at each iteration, bounded


def _views(i: int, size: int = 32, noisy: bool = False) -> dict:
    rng = np.random.default_rng(i)
    frame = rng.integers(0, 256, (size, size, 3), dtype=np.uint8) if noisy else np.full((size, size, 3), i % 256, np.uint8)
    return {"current": frame, "predicted": frame[::-1].copy(), "error": None, "error_mse": 0.1 * i}


def test_run_history_stays_within_its_snapshot_bound_and_evenly_spread():
    history = RunSnapshots(max_snapshots=500)
    for i in range(1, 2001):
        if history.wants(i):
            history.add({"iteration": i, "prediction_error": i / 1000}, _views(i))
        assert len(history) <= 500
    kept = history.iterations
    assert 250 <= len(kept) <= 500 and kept[0] == 1
    assert len(set(np.diff(kept))) == 1 and history.stride == np.diff(kept)[0] == 4  # even spacing, first kept
    snap = history.nearest(1001)
    assert snap.iteration == 1001 and snap.metrics["prediction_error"] == 1.001 and snap.error is None
    np.testing.assert_array_equal(snap.current, _views(1001)["current"])  # lossless round trip
    np.testing.assert_array_equal(snap.predicted, _views(1001)["predicted"])
    assert history.nearest(1002).iteration == 1001 and history.nearest(10**6).iteration == kept[-1]


def test_run_history_stays_within_its_byte_bound():
    history = RunSnapshots(max_snapshots=500, max_bytes=200_000)  # noise does not compress: ~6 kB a snapshot
    for i in range(1, 301):
        history.add({"iteration": i}, _views(i, noisy=True)) if history.wants(i) else None
        assert history.nbytes <= 200_000
    assert len(history) >= 16 and len(set(np.diff(history.iterations))) == 1
    with pytest.raises(ValueError):
        RunSnapshots(max_snapshots=1)


def test_a_run_keeps_snapshots_of_what_the_page_showed(tmp_path):
    c = RunController(checkpoint_path=tmp_path / "autoencoder.pth", config=TINY, device="cpu", history_snapshots=8)
    c.load_session(FakeSession(n=40))
    for _ in c.run(30):
        pass
    kept = c.snapshots.iterations
    assert len(kept) <= 8 and kept[0] == 1 and len(set(np.diff(kept))) == 1
    snap = c.snapshots.nearest(kept[-1])
    np.testing.assert_array_equal(snap.current, c.session.frame(snap.iteration - 1))  # iteration i observes frame i-1
    assert snap.metrics == c.history[snap.iteration - 1] and snap.predicted is not None and snap.error is not None
    first = c.snapshots.nearest(1)  # one frame seen: nothing predicted or scored yet
    assert first.iteration == 1 and first.predicted is None and first.error is None and first.current is not None


# -----------------------------------------------------------------------------
# named checkpoints, reset, the shared checkpoint replaced by another tab


def _trained(tmp_path, iterations=4, **kwargs) -> RunController:
    c = controller(tmp_path, **kwargs)
    for _ in c.run(iterations):
        pass
    return c


def test_a_named_checkpoint_is_saved_once_listed_and_loaded_into_another_tab(tmp_path):
    a = _trained(tmp_path, 6)
    saved = a.save_named("after-six")
    assert saved.path == tmp_path / "after-six.pth" and saved.step == a.world_model().step
    assert stat.S_IMODE(saved.path.stat().st_mode) == 0o600  # named checkpoints are the server user's alone too
    before = saved.path.read_bytes()
    with pytest.raises(CheckpointError, match="a checkpoint named after-six already exists"):
        a.save_named("after-six")  # never replaced
    assert saved.path.read_bytes() == before
    listed = {s.name: s for s in checkpoint_summaries(tmp_path)}
    assert set(listed) == {"after-six", "autoencoder"}
    assert (listed["after-six"].step, listed["after-six"].iteration, listed["after-six"].session) == (4, 6, "fake")
    b = _trained(tmp_path, 3)  # another tab, the same checkpoint folder
    origin = b.load_named("after-six")
    wm = b.world_model()
    assert (origin.kind, wm.step, wm.iteration) == ("loaded", 4, 6) and b.history == [] and len(b.snapshots) == 0
    for name, value in wm.model.state_dict().items():
        torch.testing.assert_close(value, a.world_model().model.state_dict()[name], rtol=0, atol=0)
    assert b.prediction_views()["predicted"] is None  # the old model's views are gone
    assert [m["iteration"] for m in b.run(2) if m is not None] == [7, 8]  # and it trains on from there


@pytest.mark.parametrize("name, problem", [("../escape", "Invalid checkpoint name"), ("", "Invalid checkpoint name"),
                                           ("a/b", "Invalid checkpoint name"), ("autoencoder", "shared checkpoint"),
                                           (".hidden", "Invalid checkpoint name"), (None, "Invalid checkpoint name")])
def test_bad_checkpoint_names_are_refused(tmp_path, name, problem):
    c = _trained(tmp_path, 3)
    with pytest.raises(ValueError, match=problem):
        c.save_named(name)
    with pytest.raises(ValueError, match=problem):
        c.load_named(name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["autoencoder.pth"]


def test_a_link_planted_under_a_checkpoint_name_cannot_lead_out(tmp_path):
    outside = tmp_path / "outside.pth"
    c = _trained(tmp_path / "ckpt", 3)
    (tmp_path / "ckpt" / "planted.pth").symlink_to(outside)
    with pytest.raises(ValueError, match="leads outside its folder"):
        c.save_named("planted")
    assert not outside.exists()


def test_loading_a_damaged_or_foreign_named_checkpoint_leaves_the_model_untouched(tmp_path):
    c = _trained(tmp_path, 4)
    (tmp_path / "damaged.pth").write_bytes(b"not a checkpoint")
    other = dataclasses.replace(TINY, decoder_depth=1)
    foreign = RunController(checkpoint_path=tmp_path / "f" / "autoencoder.pth", config=other, device="cpu")
    foreign.load_session(FakeSession(n=12))
    for _ in foreign.run(3):
        pass
    foreign.world_model().save_checkpoint(tmp_path / "foreign.pth")
    state = {k: v.clone() for k, v in c.world_model().model.state_dict().items()}
    history = list(c.history)
    for name, match in (("damaged", "not a readable checkpoint"), ("foreign", "another architecture"),
                        ("missing", "no checkpoint named missing")):
        with pytest.raises(CheckpointError, match=match):
            c.load_named(name)
    for k, v in c.world_model().model.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)
    assert c.history == history and c.world_model().step == 2


def test_reset_gives_a_fresh_model_and_deletes_nothing(tmp_path):
    c = _trained(tmp_path, 5)
    c.save_named("keep")
    files = sorted(p.name for p in tmp_path.iterdir())
    c.reset_model()
    wm = c.world_model()
    assert (wm.step, wm.iteration, c.origin.kind) == (0, 0, "reset") and c.history == [] and len(c.snapshots) == 0
    assert c.status().state == "idle" and c.attention is None
    assert sorted(p.name for p in tmp_path.iterdir()) == files  # nothing deleted
    fresh = AutoencoderConcatPredictorWorldModel(None, device="cpu", config=TINY).model.state_dict()
    for k, v in wm.model.state_dict().items():  # the weights any new tab starts from
        torch.testing.assert_close(v, fresh[k], rtol=0, atol=0)
    assert [m["iteration"] for m in c.run(2) if m is not None] == [1, 2]
    assert c.saved.ok and c.saved.step == 0  # its first run saves to the shared checkpoint as usual


def test_reset_and_load_wait_for_a_run(tmp_path):
    c = _trained(tmp_path, 3, run_lock_wait_s=0.1)
    c.save_named("x")
    run = c.run(3)
    next(run)
    with pytest.raises(RunBusyError):
        c.reset_model()
    with pytest.raises(RunBusyError):
        c.load_named("x")
    list(run)
    c.reset_model()


def test_the_tab_learns_when_another_tab_saved_the_shared_checkpoint(tmp_path):
    a = _trained(tmp_path, 3)
    assert not a.shared_checkpoint_replaced()
    b = controller(tmp_path)
    for _ in b.run(2):
        pass
    assert a.shared_checkpoint_replaced() and not b.shared_checkpoint_replaced()
    for _ in a.run(1):
        pass
    assert not a.shared_checkpoint_replaced() and b.shared_checkpoint_replaced()


def test_a_streamed_run_trains_while_its_consumer_is_busy(tmp_path):
    """The page samples a run; a consumer that does not ask for anything never holds the training back."""
    c = controller(tmp_path)
    c.load_session(FakeSession(n=40))
    samples = c.stream(c.run(12), every_s=0.05)
    assert next(samples) is None  # the model is ready; the consumer now draws and asks for nothing
    deadline = time.monotonic() + 300
    while c.running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert c.status().done == 12, "the run waited for its consumer"
    rest = list(samples)  # then the consumer catches up: the latest state, not every step
    assert rest[-1]["iteration"] == 12 and len(rest) < 12
    assert c.saved.ok and c.saved.iteration == 12 and c.attention is not None


def _iteration_span(tmp_path, sleep_s: float, n: int = 16) -> float:
    """Seconds from the first to the last iteration of a streamed run whose consumer sleeps
    ``sleep_s`` after every sample it gets."""
    c = controller(tmp_path)
    c.load_session(FakeSession(n=40))
    samples = c.stream(c.run(n), every_s=0.01)
    next(samples)
    stamps = []
    c.world_model().training_callback = lambda metrics: stamps.append(time.monotonic())
    for _ in samples:
        if c.running:
            time.sleep(sleep_s)
    assert c.status().done == n
    return stamps[-1] - stamps[0]


def test_a_sleeping_consumer_does_not_slow_a_streamed_run(tmp_path):
    """Iterations per second with a consumer that sleeps 0.5 s per sample stay those of one that
    never sleeps, within noise (the better of two alternating tries each)."""
    spans = {0.0: [], 0.5: []}
    for k in range(2):
        for sleep_s in spans:
            spans[sleep_s].append(_iteration_span(tmp_path / f"{sleep_s}-{k}", sleep_s))
    awake, asleep = min(spans[0.0]), min(spans[0.5])
    # waiting for the consumer would add about 0.5 s per iteration, 7.5 s over the 15 gaps
    assert asleep < 1.5 * awake + 2.0, spans


def test_a_streamed_run_computes_with_the_controller_s_threads_and_leaves_the_caller_s_count_alone(tmp_path):
    """The page's threads compute with one torch thread and a run's worker with ``threads``: the count
    is set per thread, so the run neither takes the page's count nor leaves its own behind, and a
    thread started during the run still gets the process's count (only the worker keeps a team of
    OpenMP workers: two such teams on two cores slow each other's parallel regions down)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        c = controller(tmp_path, threads=2)
        seen, later = [], []
        c.iteration_hook = lambda controller, metrics: seen.append(torch.get_num_threads())
        samples = c.stream(c.run(4), every_s=0.01)
        next(samples)
        probe = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
        probe.start()
        probe.join()
        list(samples)
        assert seen == [2, 2, 2, 2]  # every iteration of the run, in its worker
        assert torch.get_num_threads() == 1 and later == [1]
    finally:
        torch.set_num_threads(before)


def test_a_run_in_the_worker_takes_exactly_the_main_thread_s_path_with_the_real_model(tmp_path):
    """The page's Run (the controller's worker thread) and the bare loop in the main thread compute the
    same iterations bit for bit, so a seed's run in the page is the run a script gets. MKL's sgemm
    depends on the thread's memory unless ``$MKL_CBWR`` asks for STRICT (``reproducible_mkl``, which
    conftest calls as the app's and the trainer's main do): without it these parted at iteration 27."""
    from config import AutoencoderConcatPredictorWorldModelConfig
    from toroidal_action_selectors import make_selector

    cfg, iterations = AutoencoderConcatPredictorWorldModelConfig(), 32

    def robot():
        return ToroidalDotRobot(img_size=cfg.frame_size[0], seed=11, move_pixels=27, dot_radius=5)

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        bare = AutoencoderConcatPredictorWorldModel(robot(), action_selector=make_selector("random", 11),
                                                    device="cpu", config=cfg)
        in_main = [bare.run_one_iteration()["prediction_error"] for _ in range(iterations)]
        torch.set_num_threads(1)  # as the server's threads
        c = RunController(tmp_path / "autoencoder.pth", config=cfg, device="cpu", threads=2)
        list(c.stream(c.run_live(iterations, robot(), make_selector("random", 11)), 0.5))
        in_worker = [h["prediction_error"] for h in c.history]
    finally:
        torch.set_num_threads(before)
    parted = next((i for i, (a, b) in enumerate(zip(in_main, in_worker)) if a != b), None)
    assert len(in_worker) == iterations and parted is None, f"parted at iteration {parted}"


def test_a_batched_analysis_computes_in_a_thread_of_its_own_with_the_controller_s_threads(tmp_path):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert in_compute_thread(3, torch.get_num_threads) == 3 and torch.get_num_threads() == 1
        assert in_compute_thread(None, threading.get_ident) == threading.get_ident()  # None: right here
        with pytest.raises(ValueError, match="bad frame"):  # its error is raised in the caller's thread
            in_compute_thread(2, lambda: (_ for _ in ()).throw(ValueError("bad frame")))
        c = controller(tmp_path, threads=2)
        run(c, 3)
        evaluation = c.evaluate(FakeSession(n=12))
        assert torch.get_num_threads() == 1
        direct = RunController(checkpoint_path=tmp_path / "autoencoder.pth", config=TINY, device="cpu")
        assert np.allclose(evaluation.mse, direct.evaluate(FakeSession(n=12)).mse)  # the same answer
    finally:
        torch.set_num_threads(before)


def test_closing_a_streamed_run_stops_it_and_the_worker_still_finishes_it(tmp_path):
    c = controller(tmp_path)
    c.load_session(FakeSession(n=400))
    samples = c.stream(c.run(300), every_s=0.02)
    next(samples)
    next(samples)
    samples.close()  # the client went away
    assert c.stop(30) == "stopped"
    status = c.status()
    assert status.state == "stopped" and 0 < status.done < 300
    assert c.saved.ok and c.saved.iteration == status.model_iteration


def test_a_streamed_run_refuses_like_a_run(tmp_path):
    bare = RunController(checkpoint_path=tmp_path / "x.pth", config=TINY, device="cpu")
    with pytest.raises(ValueError, match="no session"):
        next(bare.stream(bare.run(1), 0.1))


def test_the_next_run_waits_until_a_streamed_run_s_end_has_been_read(tmp_path):
    """What a page shows of a run's end is that run's: a second run queued behind it starts only
    once the stream's consumer has read the end."""
    c = controller(tmp_path, run_lock_wait_s=60)
    samples = c.stream(c.run(3), every_s=0.01)
    next(samples)
    deadline = time.monotonic() + 120
    while not c.streamed_run_ended and time.monotonic() < deadline:
        time.sleep(0.01)
    second = threading.Thread(target=lambda: [None for _ in c.run(1)])
    second.start()
    time.sleep(0.3)
    assert c.status().done == 3 and c.status().total == 3  # the second run has not taken over
    *_, last = samples  # the consumer reads the end, then lets go
    assert last["iteration"] == 3
    second.join(120)
    assert c.status().total == 1 and c.status().done == 1
