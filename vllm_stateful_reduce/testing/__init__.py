"""Test and tooling modules, kept apart from the runtime a `vllm serve` process imports:
the plain-PyTorch oracle, the small-checkpoint and tokenizer builders, the procedural
video QA tasks, task examples as model inputs, video files, and a server launcher."""
