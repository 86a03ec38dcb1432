"""The seed paper's three analyses, run on a checkpoint through the plain-PyTorch reference.

    python -m vllm_stateful_reduce.analyze --model models/video-qa-small --json out.json --png out.png

1. Layerwise sparsity (`scores`): how few visual tokens carry a scoring block's score mass.
2. Importance stability across depth (`scores`): top-k overlap and rank correlation between
   every pair of scoring blocks, and each block's recall of the question's target tokens.
   Unstable importance is why the schedule drops little early and much late.
3. What dropped tokens leave behind (`dropping`): the same kept set, removed after block l
   (stateful: earlier blocks, Mamba states among them, saw the dropped tokens) or before the
   language model (stateless); the answer's log-likelihood and accuracy, and a linear probe
   for the colour of a dropped object, per l.

Questions come from the procedural task family (`--task`) or a JSONL file (`--questions`).
"""
