"""Evaluation of FLAVA models, the paper's protocol on our evaluation sets (docs/interfaces.md, "Evaluation sets").

Each task is a function from (model, data) to metrics: ``zeroshot`` (CLIP-style prompts), ``retrieval`` (Recall@K,
chunked), ``probe`` (L-BFGS logistic regression on frozen image features), ``finetune`` (text CLS and multimodal
CLS heads on model copies). ``aggregate`` turns them into per-domain macro averages with chance baselines;
``run.run_evaluate`` is the ``flava evaluate`` stage; ``report``/``plots`` render its output.
"""
