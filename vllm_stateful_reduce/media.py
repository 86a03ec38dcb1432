"""The frame metadata vLLM's video loader attaches to decoded videos: the processor's dummy
inputs use it, and offline callers pass it next to raw frames (`(frames, video_metadata(n))`)."""


def video_metadata(num_frames: int, fps: float = 2.0) -> dict:
    """Metadata for `num_frames` consecutive frames, in the video loader's format."""
    return {
        "fps": fps,
        "duration": num_frames / fps,
        "total_num_frames": num_frames,
        "frames_indices": list(range(num_frames)),
        "video_backend": "opencv",
        "do_sample_frames": False,
    }
