"""Start-up on a CPU host without a C++ compiler (the CPU image had none, and died).

The plugin compiles vLLM's log-prob rank op at start-up (adapter.runner_glue.warm_up_logprob_ranks);
where inductor cannot compile, that must be a logged best effort, never a failed start.
"""

import ast
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import sys
    from vllm import LLM, SamplingParams
    sys.path.insert(0, {repo!r})
    from tests.helpers import chat_prompt, engine_kwargs, random_video, video_metadata

    if __name__ == "__main__":
        llm = LLM(**engine_kwargs({checkpoint!r}))
        video = random_video(4)
        out = llm.generate(
            {{"prompt": chat_prompt("What?"), "multi_modal_data": {{"video": (video, video_metadata(4))}}}},
            SamplingParams(max_tokens=3, temperature=0.0),
        )
        print("TOKENS", list(out[0].outputs[0].token_ids))
    """
)


@pytest.mark.engine
def test_engine_starts_and_answers_without_a_cpp_compiler(checkpoint, tmp_path) -> None:
    from .helpers import REPO

    env = os.environ | {
        "CXX": str(tmp_path / "no-such-g++"),  # inductor's compiler: not there
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),  # no kernel compiled earlier to fall back on
    }
    script = SCRIPT.format(repo=str(REPO), checkpoint=str(checkpoint))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "TOKENS [" in done.stdout and len(ast.literal_eval(done.stdout.split("TOKENS ")[1].splitlines()[0])) == 3
    assert "could not compile vLLM's log-prob rank op at start-up (InductorError: InvalidCxxCompiler" in output
