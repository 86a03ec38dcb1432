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

from ..model.hf_config import IMG_CONTEXT, IMG_END, IMG_START, VIDEO_PLACEHOLDER

PAD, BOS, EOS = "<pad>", "<s>", "</s>"  # ids 0, 1, 2 as NemotronH's config expects
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, IMG_CONTEXT, IMG_START, IMG_END, VIDEO_PLACEHOLDER, IM_START, IM_END]

# Content may be a string (vLLM inserts "<video>" itself) or a list of OpenAI parts;
# a video part renders as "<video>\n", the layout of a string prompt "<video>\n{question}".
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] in ('video', 'video_url') %}{{ '<video>\\n' }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def chat_prompt(question: str, with_video: bool = True) -> str:
    """CHAT_TEMPLATE's rendering of one user turn with the generation prompt, for
    offline prompts (tests check that the template renders exactly this)."""
    video = "<video>\n" if with_video else ""
    return f"{IM_START}user\n{video}{question}{IM_END}\n{IM_START}assistant\n"


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
    out_dir: Path, vocab_size: int = 512, corpus: Iterable[str] | None = None
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `corpus` and save it as an HF fast tokenizer."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus or default_corpus()), trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        additional_special_tokens=SPECIAL_TOKENS[3:],
    )
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(out_dir)
    # Generation stops at the end of the assistant turn.
    (out_dir / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [hf.convert_tokens_to_ids(IM_END), hf.eos_token_id]}, indent=2)
    )
    return hf
