"""A small byte-level BPE tokenizer for checkpoints built here (nothing is downloaded).

It carries the special tokens the Nano VL v2 layout needs (`<image>`, `<img>`,
`</img>`, `<video>`) and a ChatML-style chat template, so vLLM's chat API,
processor and model treat it like the real tokenizer.
"""

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from ..model.tokens import IMG_CONTEXT, IMG_END, IMG_START, VIDEO_PLACEHOLDER

PAD, BOS, EOS = "<pad>", "<s>", "</s>"  # ids 0, 1, 2 as NemotronH's config expects
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, IMG_CONTEXT, IMG_START, IMG_END, VIDEO_PLACEHOLDER, IM_START, IM_END]

# Content may be a string (vLLM inserts "<video>" itself) or a list of OpenAI parts;
# a video part renders as "<video>\n", the layout of a string prompt "<video>\n{question}",
# an image part as "<image>\n" (vLLM's in-tree placeholder for this model's images).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] in ('video', 'video_url') %}{{ '<video>\\n' }}"
    "{% elif part['type'] in ('image', 'image_url') %}{{ '<image>\\n' }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


ORDERS = ("video_first", "text_first")  # where a question stands relative to its video


def chat_messages(question: str, order: str = "video_first", with_video: bool = True) -> list[dict]:
    """One user turn as OpenAI content parts, the way clients send it: `video_first`
    (video, then question; this project's examples) or `text_first` (question, then video;
    the model's published recipe and most clients)."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    text = {"type": "text", "text": question}
    if not with_video:
        return [{"role": "user", "content": [text]}]
    video = {"type": "video"}
    return [{"role": "user", "content": [video, text] if order == "video_first" else [text, video]}]


def chat_prompt(question: str, with_video: bool = True, order: str = "video_first") -> str:
    """CHAT_TEMPLATE's rendering of `chat_messages` with the generation prompt, for
    offline prompts (tests check that the template renders exactly this)."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    video = "<video>\n" if with_video else ""
    content = video + question if order == "video_first" else question + video
    return f"{IM_START}user\n{content}{IM_END}\n{IM_START}assistant\n"


def default_corpus() -> list[str]:
    """Text the tokenizer should compress well: frame wrappers, numbers, chat words."""
    frames = [f"\nFrame {i} sampled at {i * 0.5:.2f} seconds: " for i in range(1, 200)]
    words = (
        "What is in the video? Which frame shows the red square? How many times does a circle "
        "appear? Answer with one word. The answer is yes no red green blue yellow white black "
        "square circle triangle cross first second third before after left right top bottom "
        "user assistant system describe the scene count colour shape object event order time"
    )
    return frames + [words] * 20 + [str(n) for n in range(1000)]


def build_tokenizer(
    out_dir: Path, vocab_size: int = 512, corpus: Iterable[str] | None = None, reserved: int = 0
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `corpus` and save it as an HF fast tokenizer.
    `reserved`: that many `<SPECIAL_i>` tokens after pad/bos/eos (as the real tokenizer
    has), which moves the media tokens' ids away from small constants."""
    fillers = [f"<SPECIAL_{i}>" for i in range(3, 3 + reserved)]
    special = [*SPECIAL_TOKENS[:3], *fillers, *SPECIAL_TOKENS[3:]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus or default_corpus()), trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        additional_special_tokens=special[3:],
    )
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(out_dir)
    # Generation stops at the end of the assistant turn.
    (out_dir / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [hf.convert_tokens_to_ids(IM_END), hf.eos_token_id]}, indent=2)
    )
    return hf
