"""The plugin's one boundary with vLLM's internals: one module per seam.

| module | seam |
|---|---|
| `config_hook` | HF config class, per-architecture config hook, engine settings |
| `cli` | `--plugin stateful-reduce`, and vLLM's CLI on the CPU build |
| `request_checks` | front-end check of per-request options (HTTP 400) |
| `runner_glue` | the V1 runner: who is in the batch, the attention groups |
| `model_state` | Model Runner V2's per-request model state |
| `stage_metadata` | forward context, per-stage attention and Mamba2 metadata |
| `mixer_taps` | what scoring reads from vLLM's mixer forwards (hooks, no copies) |
| `kv_stages` | per-stage KV-cache specs, their block manager, the scheduler that sizes them |
| `model_parts` | underscore-named helpers the model and processor build on |

Outside this package the plugin imports from vLLM only what an in-tree model does
(`tests/test_vllm_boundary.py` checks it), and nothing here imports the model modules
(`vllm_stateful_reduce.model`): the config class comes in as an argument. Patches that vLLM's
seams leave no way around act only for the plugin's architecture: the runner glue is
installed by the plugin's model when it is built, the request checks and the scheduler
by its config hook; the `--plugin` flag passes through unless given. Checked against vLLM 0.32.
"""

CHECKED_VLLM_VERSIONS = ("0.32",)
