"""Images, mixed media, vLLM's EVS and recipe-style `(frames, metadata)` videos through the
offline engine, against the plain-PyTorch oracle on the same pixels.

One engine as the recipe's offline example makes it (`trust_remote_code=True`,
`video_pruning_rate`, fps/num_frames media kwargs) on the recipe-shaped checkpoint, float32,
with images reduced too (`modalities`) and the vision tower in micro-batches. Unreduced
requests (`enabled: false` per request) must give the oracle's greedy tokens with |delta
log-prob| <= 1e-4; reduced ones the oracle's tokens and kept positions.
"""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.video_utils import VideoMetadata
from vllm import LLM, SamplingParams

from vllm_stateful_reduce import HF_OVERRIDES
from vllm_stateful_reduce.config import parse
from vllm_stateful_reduce.model.processing import frames_to_pixel_values
from vllm_stateful_reduce.model.tiling import image_tiles
from vllm_stateful_reduce.testing.checkpoint import build_recipe_checkpoint
from vllm_stateful_reduce.testing.oracle import ReferenceNanoVL

from .helpers import engine_kwargs, random_video, shutdown, video_metadata
from .test_reduction import engine_state, kept_of

pytestmark = pytest.mark.engine

# images reduced too; the vision tower in micro-batches of 4 frames or tiles (an 11-tile image
# takes three calls), which the oracle's one-pass tower must agree with
GLOBAL = {"modalities": ["video", "image"], "vision_micro_batch": 4, "record_kept": True}
EVS_RATE = 0.75
TOKENS = 3
LOGPROB_TOLERANCE = 1e-4  # float32, measured below it
TEMPLATE = "<|im_start|>user\n{media}Describe it.<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_recipe_checkpoint(tmp_path_factory.mktemp("recipe-oracle"))


@pytest.fixture(scope="module")
def llm(ckpt):
    engine = LLM(
        **engine_kwargs(
            ckpt,
            hf_overrides=HF_OVERRIDES,
            trust_remote_code=True,
            video_pruning_rate=EVS_RATE,
            media_io_kwargs={"video": {"fps": 2, "num_frames": 128}},
            max_model_len=16384,
            max_num_batched_tokens=16384,
            limit_mm_per_prompt={"image": 2, "video": 1},
            additional_config={"stateful_reduce": GLOBAL},
        )
    )
    yield engine
    shutdown(engine)


@pytest.fixture(scope="module")
def oracle(ckpt):
    return ReferenceNanoVL(ckpt)


def image(h: int, w: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def pixels(oracle, item, max_num_tiles: int = 12) -> torch.Tensor:
    c, size = oracle.config, oracle.config["force_image_size"]
    if isinstance(item, Image.Image):
        return image_tiles(item, size, max_num_tiles, True, c["norm_mean"], c["norm_std"])
    return frames_to_pixel_values(item[0], size, c["norm_mean"], c["norm_std"])


def generate(llm, media: list, options: dict | None = None, max_num_tiles: int | None = None):
    placeholders = "".join("<image>\n" if isinstance(m, Image.Image) else "<video>\n" for m in media)
    data: dict = {}
    for m in media:
        key = "image" if isinstance(m, Image.Image) else "video"
        data[key] = [*data.get(key, []), m]
    kwargs = {k: v for k, v in {"stateful_reduce": options, "max_num_tiles": max_num_tiles}.items() if v is not None}
    prompt = {"prompt": TEMPLATE.format(media=placeholders), "multi_modal_data": data, "mm_processor_kwargs": kwargs}
    params = SamplingParams(max_tokens=TOKENS, temperature=0.0, ignore_eos=True, logprobs=1)
    return llm.generate(prompt, params, use_tqdm=False)[0]


def max_logprob_error(out, logprobs: torch.Tensor) -> float:
    got = out.outputs[0]
    return max(abs(got.logprobs[i][t].logprob - float(logprobs[i][t])) for i, t in enumerate(got.token_ids))


CASES = {
    "image, 4 tiles at most": ([image(300, 700, 1)], 4),
    "two images": ([image(300, 700, 1), image(400, 600, 2)], None),
    "image + video": ([image(400, 600, 2), (random_video(3, 512, 512, seed=3), video_metadata(3))], None),
}


@pytest.mark.parametrize("name", CASES)
def test_unreduced_media_match_the_oracle(llm, oracle, name: str) -> None:
    """Tiling, tile order, thumbnail, RADIO's position-grid interpolation and the media's
    order in the prompt all agree with the oracle (EVS off for the video: evs_rate 0)."""
    media, tiles = CASES[name]
    out = generate(llm, media, {"enabled": False, "evs_rate": 0.0}, tiles)
    kinds = ["image" if isinstance(m, Image.Image) else "video" for m in media]
    tokens, logprobs, _ = oracle.greedy(
        list(out.prompt_token_ids),
        [pixels(oracle, m, tiles or 12) for m in media],
        parse({"enabled": False}),
        TOKENS,
        kinds,
    )
    assert list(out.outputs[0].token_ids) == tokens
    error = max_logprob_error(out, logprobs)
    print(f"{name}: max |delta logprob| {error:.2e}")
    assert error <= LOGPROB_TOLERANCE


def test_a_reduced_image_matches_the_oracle(llm, oracle) -> None:
    """With images among `modalities`, an image prompt goes through the same scoring."""
    media = [image(400, 600, 4)]
    out = generate(llm, media)
    ours = kept_of(engine_state(llm), out.request_id)
    assert ours is not None and len(ours[-1]) < len(ours[0])
    tokens, _, kept = oracle.greedy(
        list(out.prompt_token_ids), [pixels(oracle, media[0])], parse(GLOBAL), TOKENS, ["image"]
    )
    assert list(out.outputs[0].token_ids) == tokens
    assert ours == [k.tolist() for k in kept]


def test_evs_then_reduction_matches_the_oracle(llm, oracle) -> None:
    """`video_pruning_rate` shortens the prompt (vLLM's EVS, in-tree's length); reduction
    runs on what is left. The oracle runs the video's full prompt and drops EVS's tokens
    before block 0 - the same rows - so tokens agree and kept positions map one to one."""
    video = random_video(6, 512, 512, seed=9)
    video[3:5] = video[2]
    item = (video, video_metadata(6))
    out = generate(llm, [item])
    full = generate(llm, [item], {"evs_rate": 0.0, "enabled": False})  # the unpruned layout, for the oracle
    assert len(full.prompt_token_ids) - len(out.prompt_token_ids) == 6 * 256 - int(6 * 256 * (1 - EVS_RATE))
    ours = kept_of(engine_state(llm), out.request_id)
    tokens, _, kept = oracle.greedy(
        list(full.prompt_token_ids), [pixels(oracle, item)], parse(GLOBAL | {"evs_rate": EVS_RATE}), TOKENS
    )
    assert list(out.outputs[0].token_ids) == tokens
    assert len(ours[0]) == len(kept[0]) == int(6 * 256 * (1 - EVS_RATE))
    to_full = dict(zip(ours[0], kept[0].tolist(), strict=True))  # served position -> full-layout position
    assert [[to_full[p] for p in stage] for stage in ours] == [k.tolist() for k in kept]


def test_frames_with_metadata_give_in_tree_timestamps(llm) -> None:
    """The recipe's offline form: frames sampled by the caller, with transformers'
    VideoMetadata (fps 30, every 15th frame). Timestamps follow the in-tree rule
    `index * int(1000 / fps) / 1000`, two decimals (15 * 33 ms = 0.495 s prints as "0.49")."""
    frames = random_video(4, 512, 512, seed=4)
    meta = VideoMetadata(
        total_num_frames=60, fps=30.0, duration=2.0, frames_indices=[0, 15, 30, 45], video_backend="opencv_dynamic"
    )
    out = generate(llm, [(frames, meta)], {"enabled": False})
    text = llm.get_tokenizer().decode(out.prompt_token_ids)
    stamps = [f"Frame {i + 1} sampled at {t} seconds: " for i, t in enumerate(["0.00", "0.49", "0.99", "1.49"])]
    assert all(s in text for s in stamps), text[:400]
