"""A task example as the model sees it through vLLM: prompt ids with the processor's
video layout, answer ids, pixel values. For training and for reference-side
diagnostics, which run the plain PyTorch reference instead of the engine."""

from pathlib import Path

import torch
from transformers import AutoTokenizer

from ..media import video_metadata
from ..model.hf_config import NemotronNanoVLConfig
from ..model.processing import NanoVLPreprocessor, frames_to_pixel_values
from .tasks import Example
from .tokenizer import chat_messages


class Encoder:
    def __init__(self, checkpoint: str | Path) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        self.config = NemotronNanoVLConfig.from_pretrained(checkpoint)
        self.processor = NanoVLPreprocessor(self.config, self.tokenizer)
        self.video_id = self.tokenizer.convert_tokens_to_ids("<video>")

    def prompt_ids(self, example: Example, order: str = "video_first") -> list[int]:
        """The prompt as the server builds it from OpenAI content parts in `order`
        (`tokenizer.ORDERS`), rendered by the checkpoint's own chat template."""
        text = self.tokenizer.apply_chat_template(
            chat_messages(example.question, order), add_generation_prompt=True, tokenize=False
        )
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        at = ids.index(self.video_id)
        meta = video_metadata(len(example.frames))  # what the benchmark passes with the frames
        video = self.processor.video_replacement(
            len(example.frames), meta["frames_indices"], int(1000 / meta["fps"])
        ).full
        return ids[:at] + video + ids[at + 1 :]

    def answer_ids(self, example: Example) -> list[int]:
        return self.tokenizer.encode(example.answer + "<|im_end|>", add_special_tokens=False)

    def pixels(self, example: Example) -> torch.Tensor:
        c = self.config
        return frames_to_pixel_values(example.frames, c.force_image_size, c.norm_mean, c.norm_std)
