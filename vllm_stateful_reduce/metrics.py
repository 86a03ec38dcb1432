"""Prometheus figures of token reduction, counted where reduction happens (the worker).

Named as vLLM names its own (prefix `vllm:`, counters exported with `_total`, labels
`model_name` = the served model name and `engine` = the data-parallel engine index):

    vllm:stateful_reduce_visual_tokens_total            visual tokens in the prompts of video prefills
    vllm:stateful_reduce_visual_tokens_kept_total       of those, the ones the language model processes
        {stage}                                         in each stage; stage "0" enters the LLM (after EVS);
                                                        a request served unreduced keeps all, in every stage
    vllm:stateful_reduce_requests_reduced_total         video prefills reduced, by what scored them (`query`):
        {query}                                         "question" (asked after the media) or "template_tail"
                                                        (asked before it; `reduce_question_before_media`)
    vllm:stateful_reduce_requests_unreduced_total       video prefills served unreduced, by `reason`: disabled,
        {reason}                                        question_before_media, no_text_after_video, infeasible, ...
    vllm:stateful_reduce_work_seconds_total{phase}      time in reduction work per phase (see timing.py)
    vllm:stateful_reduce_kv_blocks_not_allocated_total  KV blocks the scheduler did not allocate to reduced
                                                        prefills (stages' groups, at admission; vLLM's own
                                                        vllm:kv_cache_usage_perc shows what is held)

The KV-block counter is counted by the scheduler (the engine core process), the others by
the worker. A prefill counts once per time it runs (a preempted request that recomputes its prompt
counts again); text-only requests are not counted.

How the figures reach `/metrics`: vLLM 0.32 hands the front end's stat loggers only the
fields of `SchedulerStats` / `IterationStats`, built by the scheduler and the output
processor from fixed sources; nothing a model computes travels with them. vLLM's route
for metrics made in other processes is Prometheus' multiprocess mode: with
`PROMETHEUS_MULTIPROC_DIR` set (an empty directory, before vLLM starts; vLLM sets it
itself for `--api-server-count` > 1) every process writes its metric values to files
there and the API server's `/metrics` sums them. So the worker counts here, with
prometheus_client, and needs no patch of vLLM; without that variable the figures stay
in the worker process (a start-up line says so). Under tensor parallelism only rank 0
of each engine counts (every rank plans the same step).
"""

import os
from collections.abc import Callable, Mapping

from prometheus_client import Counter
from vllm.logger import init_logger

from .adapter.model_parts import first_tensor_parallel_rank
from .plan import StepPlan
from .timing import PHASES

logger = init_logger(__name__)

LABELS = ("model_name", "engine")
QUERIES = ("question", "template_tail")  # what scored a reduced prefill (plan.Reducing.query)
_counters: dict[str, Counter] = {}  # one set per process, whatever the number of models


def counters() -> dict[str, Counter]:
    """The plugin's counters, created on first use (prometheus_client refuses a name twice)."""
    if not _counters:
        _counters.update(
            visual=Counter(
                "vllm:stateful_reduce_visual_tokens",
                "Visual tokens in the prompts of video prefills.",
                LABELS,
            ),
            kept=Counter(
                "vllm:stateful_reduce_visual_tokens_kept",
                "Visual tokens the language model processes in each stage (stage 0: entering the LLM).",
                (*LABELS, "stage"),
            ),
            reduced=Counter(
                "vllm:stateful_reduce_requests_reduced",
                "Video prefills reduced, by the rows that scored them: the question, or the template's tail.",
                (*LABELS, "query"),
            ),
            unreduced=Counter(
                "vllm:stateful_reduce_requests_unreduced",
                "Prefills with images or video served unreduced, by reason.",
                (*LABELS, "reason"),
            ),
            work=Counter(
                "vllm:stateful_reduce_work_seconds",
                "Time spent in token-reduction work, by phase.",
                (*LABELS, "phase"),
            ),
            kv_blocks=Counter(
                "vllm:stateful_reduce_kv_blocks_not_allocated",
                "KV-cache blocks not allocated to reduced prefills' attention stages, at admission.",
                LABELS,
            ),
        )
    return _counters


def engine_labels(vllm_config) -> tuple[str, str]:
    """(model_name, engine) of this engine's figures."""
    return str(vllm_config.model_config.served_model_name), str(vllm_config.parallel_config.data_parallel_index)


def kv_blocks_counter(vllm_config) -> Callable[[int], None]:
    """Counts KV blocks not allocated thanks to reduction (the scheduler, one per engine)."""
    return counters()["kv_blocks"].labels(*engine_labels(vllm_config)).inc


class ReductionMetrics:
    """Counts one engine's reduction figures (a no-op on ranks that do not count)."""

    def __init__(self, model_name: str, engine: str, num_stages: int, active: bool) -> None:
        self.active = active
        self.labels = (model_name, engine)
        if not active:
            return
        c = counters()
        self._visual = c["visual"].labels(*self.labels)
        self._kept = [c["kept"].labels(*self.labels, str(j)) for j in range(num_stages)]
        self._reduced = {query: c["reduced"].labels(*self.labels, query) for query in QUERIES}
        self._unreduced = c["unreduced"]
        self._work = {phase: c["work"].labels(*self.labels, phase) for phase in PHASES}

    @classmethod
    def for_engine(cls, vllm_config, num_stages: int) -> "ReductionMetrics":
        active = first_tensor_parallel_rank()
        if active and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
            logger.info_once(
                "stateful_reduce: the vllm:stateful_reduce_* metrics are counted in the worker process; to see "
                "them on the server's /metrics, set PROMETHEUS_MULTIPROC_DIR to an empty directory before "
                "starting vLLM (Prometheus multiprocess mode)",
                scope="local",
            )
        return cls(*engine_labels(vllm_config), num_stages, active)

    def record_plan(self, plan: StepPlan) -> None:
        """The prefills with media of one step: reduced, or unreduced and why (an image-only
        prompt whose modality is not reduced too; its visual tokens are not counted)."""
        if not self.active:
            return
        for request in plan.reducing:
            self._visual.inc(len(request.visual))
            for counter, kept in zip(self._kept, request.keep, strict=True):
                counter.inc(kept)
            self._reduced[request.query].inc()
        for skip in (*plan.skipped, *plan.disabled):
            self._visual.inc(skip.num_visual)
            for counter in self._kept:
                counter.inc(skip.num_visual)
            self._unreduced.labels(*self.labels, skip.kind).inc()

    def record_work(self, seconds: Mapping[str, float]) -> None:
        """One forward's time per reduction phase."""
        if not self.active:
            return
        for phase, value in seconds.items():
            if value:
                self._work[phase].inc(value)
