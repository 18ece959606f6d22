"""A checkpoint saved with another decoder position code (or decoder mode) than the app is set to
loads: the model takes the file's code on, predicts exactly as the model that saved it, and saves
it again; a file that differs in anything else is still refused with the model untouched. Through
the engine, a tab's ``RunController`` (shared checkpoint, named load, parking, compare, reset), the
page's handlers and the headless trainer."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

import config
import page_common
import page_outputs
import page_play
import page_sessions
import page_workflow
import train_world_model
import world_model_analysis as wa
from autoencoder_concat_predictor_world_model import AutoencoderConcatPredictorWorldModel
from checkpoints import CheckpointError, RefusedFiles, read_checkpoint, write_checkpoint
from conftest import TINY, FakeSession
from record_session import record_session
from run_controller import RunController
from toroidal_action_selectors import make_selector
from toroidal_dot_robot import ToroidalDotRobot

# TINY with the narrowest decoder the torus code allows (64 wide, heads 16 wide; TINY's is 32)
SMALL = dataclasses.replace(TINY, decoder_embed_dim=64)
CANVAS = dataclasses.replace(SMALL, decoder_position="canvas")
TORUS = dataclasses.replace(SMALL, decoder_position="torus")
CANVAS_NOTE = "(decoder position code: canvas, from the file)"


def _jitter(wm: AutoencoderConcatPredictorWorldModel, seed: int = 0) -> AutoencoderConcatPredictorWorldModel:
    """Every weight nudged by seeded noise: predictions differ per pixel and depend on the position code
    (a fresh pixel head is zero, so every model would predict the same black frame)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in wm.model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return wm


def _trained(cfg, seed: int = 0) -> AutoencoderConcatPredictorWorldModel:
    wm = AutoencoderConcatPredictorWorldModel(ToroidalDotRobot(seed=seed), make_selector("alternate"), device="cpu",
                                              config=cfg)
    wm.run(4)
    return _jitter(wm, seed)


def _same_predictions(a: AutoencoderConcatPredictorWorldModel, b: AutoencoderConcatPredictorWorldModel,
                      canvas: np.ndarray) -> bool:
    """The same predicted slot and the same decoder attention (float32, every layer and head), bit for bit."""
    return (np.array_equal(a.predict_canvas(canvas), b.predict_canvas(canvas))
            and np.array_equal(a.capture_decoder_attention(canvas).weights, b.capture_decoder_attention(canvas).weights))


def _weights(wm) -> dict:
    return {k: v.clone() for k, v in wm.model.state_dict().items()}


# -----------------------------------------------------------------------------
# the engine


@pytest.mark.parametrize("saved_with, live", [
    (CANVAS, TORUS),
    (TORUS, CANVAS),
    (dataclasses.replace(CANVAS, decoder_mode="self"), CANVAS),  # the MAE decoder into a CrossMAE one
    (TORUS, dataclasses.replace(CANVAS, decoder_mode="self")),  # both codes at once
], ids=["canvas-into-torus", "torus-into-canvas", "self-into-cross", "torus-cross-into-canvas-self"])
def test_a_model_takes_on_the_decoder_code_of_the_file_and_predicts_as_the_saver(tmp_path, saved_with, live):
    saver = _trained(saved_with)
    path = saver.save_checkpoint(tmp_path / "saved.pth")
    live = dataclasses.replace(live, learning_rate=1e-3)  # a setting outside the architecture: the live one stays
    wm = AutoencoderConcatPredictorWorldModel(None, device="cpu", config=live)
    canvas = saver.last_prediction_canvas
    own_code = _same_predictions(wm, saver, canvas)
    rng = torch.get_rng_state()
    info = wm.load_checkpoint(path)
    assert torch.equal(torch.get_rng_state(), rng)  # loading leaves the seeded random streams alone
    assert (info["step"], info["iteration"]) == (saver.step, saver.iteration) == (wm.step, wm.iteration)
    assert wm.config == dataclasses.replace(live, decoder_position=saved_with.decoder_position,
                                            decoder_mode=saved_with.decoder_mode)
    assert _same_predictions(wm, saver, canvas)
    # the code matters: the same weights under the live model's own code predict otherwise
    kept = AutoencoderConcatPredictorWorldModel(None, device="cpu", config=live)
    kept.model.load_state_dict(saver.model.state_dict())
    assert not own_code and not _same_predictions(kept, saver, canvas)
    again = wm.save_checkpoint(tmp_path / "again.pth")  # a later save records the adopted code
    assert read_checkpoint(again)["architecture"] == saver.config.architecture()
    wm.attach_robot(ToroidalDotRobot(seed=5), make_selector("alternate"))
    assert wm.run(3)[-1]["training_loss"] is not None and wm.step == saver.step + 1  # it trains on from the file


def test_a_file_of_another_size_is_refused_as_before_and_the_model_is_untouched(tmp_path):
    path = _trained(dataclasses.replace(CANVAS, embed_dim=16)).save_checkpoint(tmp_path / "narrow.pth")
    wm = _trained(TORUS, seed=1)
    before, counters = _weights(wm), (wm.step, wm.iteration)
    with pytest.raises(CheckpointError) as refused:
        wm.load_checkpoint(path)
    diff = {"embed_dim": (32, 16), "decoder_position": ("torus", None)}
    assert str(refused.value) == f"narrow.pth was trained with another architecture (this model vs file: {diff})"
    assert wm.config == TORUS and (wm.step, wm.iteration) == counters
    assert all(torch.equal(before[k], v) for k, v in wm.model.state_dict().items())


def test_a_file_that_claims_a_decoder_code_no_model_has_is_refused_and_the_model_is_untouched(tmp_path):
    payload = read_checkpoint(_trained(CANVAS).save_checkpoint(tmp_path / "good.pth"))
    payload["architecture"]["decoder_position"] = "ring"
    path = write_checkpoint(tmp_path / "ring.pth", payload)
    wm = _trained(TORUS, seed=1)
    before = _weights(wm)
    with pytest.raises(CheckpointError, match="ring.pth records a decoder this model cannot be built with: "
                                              "decoder_position must be 'canvas' or 'torus', got 'ring'"):
        wm.load_checkpoint(path)
    assert wm.config == TORUS and all(torch.equal(before[k], v) for k, v in wm.model.state_dict().items())


# -----------------------------------------------------------------------------
# a tab's controller


def _controller(folder, cfg) -> RunController:
    c = RunController(checkpoint_path=folder / "autoencoder.pth", config=cfg, device="cpu",
                      refused_files=RefusedFiles())
    c.load_session(FakeSession(n=12))
    return c


def _run(c: RunController, n: int) -> None:
    for _ in c.run(n):
        pass


def test_a_tab_loads_the_shared_checkpoint_of_the_other_code_and_saves_it_with_that_code(tmp_path):
    saver = _controller(tmp_path, CANVAS)
    _run(saver, 4)
    _jitter(saver.world_model())
    saver.world_model().save_checkpoint(saver.checkpoint_path)
    tab = _controller(tmp_path, TORUS)
    wm = tab.analysis_model()  # a tab's first need of a model: the shared checkpoint
    assert tab.origin.kind == "loaded" and tab.origin.adopted == (("decoder_position", "canvas"),)
    assert tab.origin.note == f" {CANVAS_NOTE}" and CANVAS_NOTE in page_outputs.checkpoint_markdown(tab)
    assert tab.config == TORUS and tab.model_config == wm.config == CANVAS  # the tab's settings stay as set
    assert _same_predictions(wm, saver.world_model(), saver.world_model().last_prediction_canvas)
    _run(tab, 2)
    saved = read_checkpoint(tab.checkpoint_path)
    assert tab.saved.ok and saved["iteration"] == 6 and "decoder_position" not in saved["architecture"]  # canvas
    assert tab.park(tmp_path) and tab.is_parked and tab.model_config == CANVAS
    canvas = tab.world_model().last_prediction_canvas  # reloaded from its parked copy, code and all
    assert tab.world_model().config == CANVAS and tab.world_model().iteration == 6
    copy = AutoencoderConcatPredictorWorldModel(None, device="cpu", config=TORUS)
    copy.load_checkpoint(tab.checkpoint_path)
    assert _same_predictions(tab.world_model(), copy, canvas)


def test_load_named_takes_the_files_code_on_and_reset_goes_back_to_the_tabs_settings(tmp_path):
    saver = _controller(tmp_path / "elsewhere", TORUS)
    _run(saver, 4)
    _jitter(saver.world_model()).save_checkpoint(tmp_path / "torus-one.pth")
    tab = _controller(tmp_path, CANVAS)
    _run(tab, 3)
    origin = tab.load_named("torus-one")
    assert origin.adopted == (("decoder_position", "torus"),) and origin.note == " (decoder position code: torus, from the file)"
    canvas = saver.world_model().last_prediction_canvas
    assert tab.world_model().config == TORUS and _same_predictions(tab.world_model(), saver.world_model(), canvas)
    tab.save_named("kept")
    assert read_checkpoint(tmp_path / "kept.pth")["architecture"]["decoder_position"] == "torus"
    assert tab.load_named("kept").adopted == (("decoder_position", "torus"),)  # the model already had it
    tab.reset_model()  # a fresh model of the tab's settings, as any new tab gets
    assert tab.world_model().config == CANVAS and tab.model_config == CANVAS and tab.origin.note == ""
    _run(tab, 1)
    assert "decoder_position" not in read_checkpoint(tab.checkpoint_path)["architecture"]


def test_load_named_still_refuses_another_size_with_the_tab_untouched(tmp_path):
    other = _controller(tmp_path / "other", dataclasses.replace(CANVAS, decoder_depth=1))
    _run(other, 3)
    other.world_model().save_checkpoint(tmp_path / "shallow.pth")
    tab = _controller(tmp_path, TORUS)
    _run(tab, 3)
    before, origin, history = _weights(tab.world_model()), tab.origin, list(tab.history)
    with pytest.raises(CheckpointError, match=r"shallow.pth was trained with another architecture \(this model vs "
                                              r"file: \{'decoder_depth': \(2, 1\), 'decoder_position': \('torus', None\)\}\)"):
        tab.load_named("shallow")
    assert tab.origin == origin and tab.history == history and tab.model_config == TORUS
    assert all(torch.equal(before[k], v) for k, v in tab.world_model().model.state_dict().items())


def test_compare_loads_each_named_checkpoint_with_its_own_code(tmp_path):
    session = FakeSession(n=14)
    canvas_tab, torus_tab = _controller(tmp_path / "elsewhere", CANVAS), _controller(tmp_path, TORUS)
    for c in (canvas_tab, torus_tab):
        _run(c, 4)
        _jitter(c.world_model())
    canvas_tab.world_model().save_checkpoint(tmp_path / "canvas-one.pth")
    torus_tab.save_named("torus-one")
    cmp = torus_tab.compare("canvas-one", "torus-one", session, batch_size=4)
    assert cmp.names == (f"canvas-one {CANVAS_NOTE}", "torus-one")
    for ev, wm in zip(cmp.evaluations, (canvas_tab.world_model(), torus_tab.world_model())):
        expected = wa.evaluate_session(wm, session, batch_size=4)
        np.testing.assert_array_equal(ev.mse, expected.mse)
        np.testing.assert_array_equal(ev.dot_error, expected.dot_error)
    torus_tab.load_named("canvas-one")  # this tab's model, with the file's code, beside the file itself
    cmp = torus_tab.compare(None, "canvas-one", session, batch_size=4)
    assert cmp.names == (f"this tab's model {CANVAS_NOTE}", f"canvas-one {CANVAS_NOTE}")
    np.testing.assert_array_equal(cmp.evaluations[0].mse, cmp.evaluations[1].mse)


# -----------------------------------------------------------------------------
# the page


@pytest.fixture
def user(tmp_path, monkeypatch) -> page_common.UserState:
    """A tab set to the torus code, with a recorded session loaded and its checkpoints in a private folder."""
    record_session("alternate", 12, 0, name="alternate", root=tmp_path / "sessions")
    monkeypatch.setattr(config, "SESSIONS_ROOT", tmp_path / "sessions")
    monkeypatch.setattr(config, "CHECKPOINT_PATH", tmp_path / "checkpoints" / "autoencoder.pth")
    state = page_common.UserState(config=TORUS)
    page_sessions.load_session("alternate", state)
    return state


def test_the_page_says_which_code_a_loaded_checkpoint_brought_and_exports_it(user, tmp_path):
    saver = _controller(tmp_path / "elsewhere", CANVAS)
    _run(saver, 3)
    saver.world_model().save_checkpoint(tmp_path / "checkpoints" / "canvas-one.pth")
    text = page_workflow.load_checkpoint("canvas-one", user)[0]
    assert text.startswith(f"**Loaded** `canvas-one.pth` (step 1, iteration 3) {CANVAS_NOTE}.")
    assert f"at step 1 (iteration 3) {CANVAS_NOTE}." in page_outputs.checkpoint_markdown(user.controller)
    import zipfile
    with zipfile.ZipFile(page_workflow.export_results(user)) as zf:
        exported = json.loads(zf.read("config.json"))
    assert exported["decoder_position"] == "canvas" and "decoder_position" not in exported["architecture"]
    summary = page_play.compare_models(page_play.THIS_TAB, "canvas-one", "alternate", user)[0]
    assert f"**A**: this tab's model {CANVAS_NOTE} (step 1" in summary
    text = page_workflow.reset_model(user)[0]
    assert "from the file" not in text and user.controller.model_config == TORUS


# -----------------------------------------------------------------------------
# the headless trainer


def _set_flags(cfg) -> list[str]:
    """``cfg`` as the trainer's --set values: the fields where it differs from the defaults."""
    default = config.AutoencoderConcatPredictorWorldModelConfig()
    return [f"{f.name}={json.dumps(getattr(cfg, f.name)) if not isinstance(getattr(cfg, f.name), str) else getattr(cfg, f.name)}"
            for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(default, f.name)]


def test_the_trainer_resumes_from_a_checkpoint_of_the_other_code_and_says_so(tmp_path, monkeypatch, capsys):
    saved = tmp_path / "saved"
    for name in ("SAVED_ROOT", "SESSIONS_ROOT", "CHECKPOINT_DIR", "CHECKPOINT_PATH"):  # main() moves them
        monkeypatch.setattr(config, name, getattr(config, name))
    monkeypatch.setenv("CWM_SAVED_ROOT", str(saved))
    monkeypatch.delenv("CWM_DECODER_POSITION", raising=False)
    common = ["--live", "alternate", "--threads", "2", "--device", "cpu"]

    def train(cfg, *flags) -> str:
        code = train_world_model.main([*common, "--set", *_set_flags(cfg), *flags])
        out = capsys.readouterr().out
        assert code == 0, out
        return out.splitlines()[0]

    folder = saved / "checkpoints" / "toroidal_dot"
    assert train(CANVAS, "--iterations", "3", "--save-as", "old") == "Model: new (no shared checkpoint yet)"
    line = train(TORUS, "--iterations", "2", "--save-as", "next")  # from the shared checkpoint
    assert line == f"Model: autoencoder.pth (step 1, iteration 3) {CANVAS_NOTE}"
    resumed = read_checkpoint(folder / "next.pth")
    assert resumed["iteration"] == 5 and "decoder_position" not in resumed["architecture"]
    assert train(TORUS, "--iterations", "1", "--from-checkpoint", "old") == f"Model: old.pth (step 1, iteration 3) {CANVAS_NOTE}"
    assert train(CANVAS, "--iterations", "1", "--from-checkpoint", "old") == "Model: old.pth (step 1, iteration 3)"
