"""Visualizer and VideoRecorder: frame validation, real H.264/GIF files, odd sizes, inline HTML, MLflow artifact;
clips over training (one per render, logged to a real MLflow server, shown with a step slider)."""

import base64
import re
from pathlib import Path

import imageio.v3 as iio
import jax
import jax.numpy as jnp
import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from researchlab import Config, Loop, NoBatch
from researchlab.design.core import Clock, State
from researchlab.design.visualizer import VideoRecorder, Visualizer, as_frame, clip_slider, clips_from_mlflow


class Ball(State):
    x: jax.Array
    y: jax.Array


class BallViz(Visualizer[Ball]):
    "A red 4x4 square at (x, y) on a 37x51 (odd-sized) dark-grey canvas."

    def draw(self, state: Ball) -> np.ndarray:
        img = np.full((37, 51, 3), 30, np.uint8)
        x, y = int(state.x), int(state.y)
        img[y:y + 4, x:x + 4] = (255, 0, 0)
        return img


class VectorViz(BallViz):
    calls = 0

    def draw_batch(self, states: Ball) -> np.ndarray:
        VectorViz.calls += 1
        n = states.x.shape[0]
        frames = np.zeros((n, 10, 12, 4), np.float32)
        frames[..., 3] = 1.0
        frames[np.arange(n), 2, np.asarray(states.x) % 12, 1] = 1.0
        return frames


def rollout(n: int) -> Ball:
    return Ball(x=jnp.arange(n) % 47, y=(jnp.arange(n) * 2) % 33)


def test_recorded_mp4_has_every_frame_at_the_right_size_and_content(tmp_path: Path) -> None:
    viz = BallViz(record=True, fps=20, path=tmp_path / "ball.mp4")
    for i in range(30):
        frame = viz.render(Ball(jnp.int32(i), jnp.int32(i % 33)))
        assert frame.shape == (37, 51, 3) and frame.dtype == np.uint8
    video = viz.video()
    assert video.num_frames == 30 and video.path == tmp_path / "ball.mp4"
    frames = iio.imread(video.path)
    # odd 37x51 is padded to 38x52 by repeating the edge, never resized
    assert frames.shape == (30, 38, 52, 3)
    meta = iio.immeta(video.path)
    assert meta["codec"] == "h264" and meta["fps"] == pytest.approx(20)
    f = frames[10].astype(int)
    assert f[11:13, 11:13, 0].min() > 200 and f[11:13, 11:13, 1].max() < 60     # the ball where it was drawn
    assert abs(f[30, 40] - 30).max() < 10 and abs(f[37, 51] - 30).max() < 10   # background and padding


def test_render_batch_uses_the_vectorized_renderer_and_records(tmp_path: Path) -> None:
    viz = VectorViz(record=True, fps=10, path=tmp_path / "batch.gif")
    frames = viz.render_batch(rollout(7))
    assert VectorViz.calls == 1 and frames.shape == (7, 10, 12, 4) and frames.dtype == np.uint8
    assert frames[3, 2, 3, 1] == 255 and viz.last_frame is not None
    viz.close()
    gif = iio.imread(tmp_path / "batch.gif")
    assert gif.shape[0] == 7 and gif.shape[1:3] == (10, 12)
    assert viz.video().to_html().startswith('<img src="data:image/gif;base64,')


def test_default_render_batch_draws_each_state() -> None:
    frames = BallViz().render_batch(rollout(5))
    assert frames.shape == (5, 37, 51, 3)
    np.testing.assert_array_equal(frames[4], BallViz().render(Ball(jnp.int32(4), jnp.int32(8))))


def test_html_is_an_inline_base64_h264_video(tmp_path: Path) -> None:
    rec = VideoRecorder(tmp_path / "v.mp4", fps=5)
    rec.extend(np.random.default_rng(0).integers(0, 255, (6, 16, 16, 3), dtype=np.uint8))
    html = rec._repr_html_()
    m = re.fullmatch(r'<video controls loop autoplay muted playsinline><source src="data:video/mp4;base64,'
                     r'([A-Za-z0-9+/=]+)" type="video/mp4"></video>', html)
    assert m is not None
    assert base64.b64decode(m.group(1)) == (tmp_path / "v.mp4").read_bytes()
    assert 'width="320"' in rec.to_html(width=320)


def test_rgba_and_float_frames_are_converted(tmp_path: Path) -> None:
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255
    rgba[:4, :, 3] = 0  # the top half transparent: composited onto black
    rec = VideoRecorder(tmp_path / "a.mp4", fps=5)
    for _ in range(3):
        rec.append(rgba)
    rec.append(np.full((8, 8, 3), 0.5, np.float32))
    frames = iio.imread(rec.close()).astype(int)
    assert frames[0, 1, 1].max() < 20 and frames[0, 6, 6, 0] > 170
    assert abs(frames[3, 4, 4] - 128).max() < 10


@pytest.mark.parametrize("frame, culprit", [
    (np.zeros((3, 20, 30), np.uint8), "got shape (3, 20, 30) dtype uint8 (channels first?"),
    (np.zeros((20, 30), np.uint8), "got shape (20, 30)"),
    (np.zeros((20, 30, 2), np.uint8), "got shape (20, 30, 2)"),
    (np.zeros((0, 30, 3), np.uint8), "got shape (0, 30, 3)"),
    (np.zeros((5, 5, 3), np.int32), "dtype int32"),
    (np.full((5, 5, 3), 1.5, np.float32), "range [1.5, 1.5]"),
    (np.full((5, 5, 3), np.nan, np.float32), "range [nan, nan]"),
    (np.full((5, 5, 3), True), "dtype bool"),
])
def test_bad_frames_are_clear_errors_and_write_nothing(tmp_path: Path, frame: np.ndarray, culprit: str) -> None:
    class Bad(Visualizer[Ball]):
        def draw(self, state: Ball) -> np.ndarray:
            return frame

    viz = Bad(record=True, path=tmp_path / "bad.mp4")
    with pytest.raises(ValueError) as e:
        viz.render(Ball(jnp.int32(0), jnp.int32(0)))
    assert "Bad.draw" in str(e.value) and culprit in str(e.value)
    assert viz.last_frame is None and viz.recorder is None and not (tmp_path / "bad.mp4").exists()
    with pytest.raises(ValueError, match=re.escape(culprit)):
        as_frame(frame)


def test_recorder_misuse_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="must end in .mp4 or .gif"):
        VideoRecorder(tmp_path / "v.avi")
    with pytest.raises(ValueError, match="fps=0"):
        VideoRecorder(tmp_path / "v.mp4", fps=0)
    with pytest.raises(ValueError, match="no frames were recorded"):
        VideoRecorder(tmp_path / "empty.mp4").close()
    rec = VideoRecorder(tmp_path / "v.mp4")
    rec.append(np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match=r"frame 1 has size \(8, 10\), but the video is \(8, 8\)"):
        rec.append(np.zeros((8, 10, 3), np.uint8))
    rec.close()
    with pytest.raises(RuntimeError, match="append after close"):
        rec.append(np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(RuntimeError, match="nothing recorded"):
        BallViz().video()
    with pytest.raises(RuntimeError, match="render\\(state\\) first"):
        BallViz().show()


def test_show_displays_a_png(monkeypatch: pytest.MonkeyPatch) -> None:
    shown = []
    monkeypatch.setattr("IPython.display.display", lambda obj: shown.append(obj))
    viz = BallViz()
    viz.render(Ball(jnp.int32(3), jnp.int32(3)))
    viz.show()
    png = shown[0].data
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert iio.imread(png).shape == (37, 51, 3)


def test_log_to_mlflow_stores_the_video_as_an_artifact(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    try:
        exp = mlflow.create_experiment("videos", artifact_location=(tmp_path / "artifacts").as_uri())
        rec = VideoRecorder(tmp_path / "clip.mp4", fps=5)
        rec.extend(np.zeros((3, 8, 8, 3), np.uint8))
        with pytest.raises(RuntimeError, match="no active MLflow run"):
            rec.log_to_mlflow()
        with mlflow.start_run(experiment_id=exp) as run:
            artifact_uri = rec.log_to_mlflow()
        assert artifact_uri.endswith("videos/clip.mp4")
        files = [f.path for f in MlflowClient(uri).list_artifacts(run.info.run_id, "videos")]
        assert files == ["videos/clip.mp4"]
        local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="videos/clip.mp4",
                                                    dst_path=str(tmp_path / "dl"))
        assert Path(local).read_bytes() == (tmp_path / "clip.mp4").read_bytes()
    finally:
        mlflow.set_tracking_uri(None)


def test_close_and_del_finish_the_recording(tmp_path: Path) -> None:
    viz = BallViz(record=True, fps=5, path=tmp_path / "del.mp4")
    for i in range(3):
        viz.render(Ball(jnp.int32(i), jnp.int32(i)))
    del viz  # __del__ closes the recorder, so the file is complete
    assert iio.imread(tmp_path / "del.mp4").shape[0] == 3


# ---- clips over training -------------------------------------------------------------------------
class Walker(State):
    x: jax.Array
    clock: Clock


class WalkerViz(Visualizer[Walker]):
    "A frame shows the position as a bright column; a clip lasts 1 + step // 5 frames."

    def draw(self, state: Walker) -> np.ndarray:
        img = np.zeros((16, 32, 3), np.uint8)
        img[:, int(state.x) % 32] = 255
        return img

    def clip(self, state: Walker) -> np.ndarray:
        n = 1 + int(state.clock.step) // 5
        return np.stack([self.draw(state)] * n)


class WalkCfg(Config):
    speed: int = 1


def walk_step(state: Walker, config: WalkCfg, batch: object) -> tuple[Walker, dict]:
    return Walker(x=state.x + config.speed, clock=state.clock), {"x": state.x.astype(jnp.float32)}


def walk_loop(viz: WalkerViz) -> Loop:
    return Loop(WalkCfg(), Walker(x=jnp.int32(0), clock=Clock()), walk_step, NoBatch(), visualizer=viz,
                render_every=5, log_every=1, progress=False)


def test_render_every_records_one_clip_per_render_logged_to_the_run(tmp_path: Path, mlflow_server) -> None:
    "The Loop's render_every: a clip per render, kept by step, logged as videos/step_NNNNNN.mp4, fetched back."
    mlflow.set_tracking_uri(mlflow_server.uri)
    try:
        with mlflow.start_run(experiment_id=mlflow.create_experiment(f"clips-{tmp_path.name}")) as run:
            viz = WalkerViz(clips=True, fps=10, clips_dir=tmp_path / "clips")
            walk_loop(viz).run(12)
        assert sorted(viz.clips) == [5, 10]
        assert [len(iio.imread(viz.clips[s])) for s in (5, 10)] == [2, 3]
        names = [f.path for f in MlflowClient().list_artifacts(run.info.run_id, "videos")]
        assert names == ["videos/step_000005.mp4", "videos/step_000010.mp4"]
        back = clips_from_mlflow(run.info.run_id, tmp_path / "back")
        assert list(back) == [5, 10]
        assert all(back[s].read_bytes() == viz.clips[s].read_bytes() for s in back)
    finally:
        mlflow.set_tracking_uri(None)


def test_clips_rendered_in_a_thread_go_to_the_run_active_at_creation(tmp_path: Path, sqlite_uri: str) -> None:
    "The widget renders in a worker thread, which has no active MLflow run: the creator's run gets the clips."
    import threading

    mlflow.set_tracking_uri(sqlite_uri)
    try:
        exp = mlflow.create_experiment("thread-clips", artifact_location=(tmp_path / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=exp) as run:
            viz = WalkerViz(clips=True, clips_dir=tmp_path / "clips")
            t = threading.Thread(target=lambda: viz.render(Walker(x=jnp.int32(3), clock=Clock(step=jnp.int32(7)))))
            t.start()
            t.join()
        assert [f.path for f in MlflowClient().list_artifacts(run.info.run_id, "videos")] == ["videos/step_000007.mp4"]
        local = WalkerViz(clips=True, clips_dir=tmp_path / "local")  # no run: the clip is only kept on disk
        local.render(Walker(x=jnp.int32(0), clock=Clock(step=jnp.int32(1))))
        assert local.clips[1].exists() and local.run_id is None
    finally:
        mlflow.set_tracking_uri(None)


def test_a_clip_that_cannot_be_logged_warns_and_stays_on_disk(tmp_path: Path, sqlite_uri: str) -> None:
    mlflow.set_tracking_uri(sqlite_uri)
    try:
        viz = WalkerViz(clips=True, clips_dir=tmp_path / "clips", run_id="0" * 32)  # no such run
        with pytest.warns(UserWarning, match=r"could not log step_000002.mp4 to MLflow run 0{32} .* stays in"):
            viz.render(Walker(x=jnp.int32(0), clock=Clock(step=jnp.int32(2))))
        assert (tmp_path / "clips" / "step_000002.mp4").exists()
    finally:
        mlflow.set_tracking_uri(None)


def test_clip_slider_shows_the_chosen_steps_clip(tmp_path: Path) -> None:
    viz = WalkerViz(clips=True, clips_dir=tmp_path)
    walk_loop(viz).run(15)
    view = clip_slider(viz)
    slider, caption, video = view.children
    assert slider.options == (("5", 5), ("10", 10), ("15", 15)) and slider.value == 15
    assert video.value == viz.clips[15].read_bytes() and video.format == "mp4"
    slider.value = 5
    assert video.value == viz.clips[5].read_bytes() and "step 5" in caption.value
    with pytest.raises(ValueError, match="no clips to show"):
        clip_slider({})


def test_clips_need_a_clip_and_a_step() -> None:
    with pytest.raises(NotImplementedError, match=r"BallViz.clip\(state\) returned None"):
        BallViz(clips=True).record_clip(Ball(jnp.int32(0), jnp.int32(0)), step=3)
    with pytest.raises(TypeError, match="Ball has no .clock"):
        BallViz(clips=True).render(Ball(jnp.int32(0), jnp.int32(0)))
    viz = BallViz(clips=True, step_of=lambda s: int(s.x) * 10)
    with pytest.raises(NotImplementedError):  # the step came from step_of; the clip is still missing
        viz.render(Ball(jnp.int32(2), jnp.int32(0)))
