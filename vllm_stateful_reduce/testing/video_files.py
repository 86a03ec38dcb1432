"""Video files for tests, demos and clients: write frames to a file and read them back, and
wrap a file as a data URL. (The frame metadata for raw frames is runtime: `vllm_stateful_reduce.media`.)"""

import base64
import mimetypes
import tempfile
from pathlib import Path

import numpy as np


def write_video(frames: np.ndarray, path: str | Path, fps: float = 2.0) -> Path:
    """(T, H, W, 3) uint8 RGB frames -> an MPEG-4 (.mp4) or MJPEG (.avi) file, by suffix."""
    import cv2

    path = Path(path)
    fourcc = {".mp4": "mp4v", ".avi": "MJPG"}[path.suffix]
    height, width = frames.shape[1:3]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*fourcc), fps, (width, height))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write {path}")
    for frame in frames:
        writer.write(np.ascontiguousarray(frame[..., ::-1]))  # OpenCV wants BGR
    writer.release()
    return path


def read_video(path: str | Path) -> np.ndarray:
    """All frames of a video file as (T, H, W, 3) uint8 RGB, decoded by OpenCV (as vLLM's
    default video backend does)."""
    import cv2

    capture, frames = cv2.VideoCapture(str(path)), []
    while (frame := capture.read())[0]:
        frames.append(frame[1][..., ::-1])
    capture.release()
    return np.stack(frames)


def codec_roundtrip(frames: np.ndarray, suffix: str = ".mp4") -> np.ndarray:
    """The frames as a server sees them after sending them as a (lossy) video file."""
    with tempfile.TemporaryDirectory() as tmp:
        return read_video(write_video(frames, Path(tmp) / f"video{suffix}"))


def video_data_url(path: str | Path) -> str:
    """A `data:video/...;base64,` URL for an OpenAI `video_url` content part."""
    mime = mimetypes.guess_type(str(path))[0] or "video/mp4"
    return f"data:{mime};base64," + base64.b64encode(Path(path).read_bytes()).decode()


def video_question(video: str | Path, question: str) -> list[dict]:
    """OpenAI chat `messages`: one user turn with the video (as a data URL) and the question."""
    part = {"type": "video_url", "video_url": {"url": video_data_url(video)}}
    return [{"role": "user", "content": [part, {"type": "text", "text": question}]}]
