"""The special tokens of a Nano VL v2 checkpoint, read from its tokenizer.

vLLM's in-tree model takes every media token id from the tokenizer (it encodes
`<image>`, `<img>`, `</img>`, `<video>`) and never reads a config's
`img_context_token_id`; so does the plugin. A token the tokenizer does not know as
one piece would leave the plugin unable to find visual rows, so it is an error at
start-up, never a silently unreduced request.
"""

from dataclasses import dataclass
from typing import Any

from ..plan import PromptMarkers

# whitespace a chat template or a client puts between media and the end of a turn
WHITESPACE = ("\n", "\n\n", " ", " \n", "\n ", "\t", "\r\n")

IMG_START = "<img>"
IMG_END = "</img>"
IMG_CONTEXT = "<image>"  # every visual row, of images and of video frames
VIDEO_PLACEHOLDER = "<video>"  # where a video goes in a prompt (replaced by the processor)
IMAGE_PLACEHOLDER = IMG_CONTEXT  # where an image goes (the in-tree model uses the same string)


@dataclass(frozen=True)
class SpecialTokens:
    """Token ids of the media wrappers (the wrappers may be several tokens), and what
    tells a question after the media from a chat template's tail."""

    image_context: int
    image_start: tuple[int, ...]
    image_end: tuple[int, ...]
    video: int
    turn_end: frozenset[int]  # the tokenizer's other special tokens (`<|im_end|>`, ...)
    blank: frozenset[int]  # tokens of whitespace only

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> "SpecialTokens":
        def ids(text: str) -> tuple[int, ...]:
            return tuple(tokenizer.encode(text, add_special_tokens=False))

        def single(text: str) -> int:
            found = ids(text)
            if len(found) != 1:
                raise ValueError(
                    f"the tokenizer encodes {text!r} as {len(found)} tokens {list(found)}, not one: the plugin finds "
                    "media rows by that token's id (as vLLM's in-tree Nano VL model does); use the checkpoint's own "
                    "tokenizer, which has it as a special token"
                )
            return found[0]

        context, start, end, video = single(IMG_CONTEXT), ids(IMG_START), ids(IMG_END), single(VIDEO_PLACEHOLDER)
        turn_end = frozenset(tokenizer.all_special_ids) - {context, video, *start, *end}
        blank = frozenset(t for text in WHITESPACE for t in ids(text) if not tokenizer.decode([t]).strip())
        return cls(context, start, end, video, turn_end, blank)

    def markers(self) -> PromptMarkers:
        """What the reduction planner reads a prompt by."""
        return PromptMarkers(self.image_context, self.turn_end, self.blank)


def prompt_markers(tokenizer: Any) -> PromptMarkers:
    """What the reduction planner reads a prompt by, from the checkpoint's tokenizer."""
    return SpecialTokens.from_tokenizer(tokenizer).markers()
