"""Visualizer and VideoRecorder: frame validation, real H.264/GIF files, odd sizes, inline HTML, MLflow artifact."""

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

from researchlab.design.core import State
from researchlab.design.visualizer import VideoRecorder, Visualizer, as_frame


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
