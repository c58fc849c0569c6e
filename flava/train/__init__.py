"""Training: typed config (``config``), AdamW groups and schedule (``optim``), precision and parallelism
(``parallel``), checkpoints (``checkpoint``), the loop (``loop``), progress output (``progress``), FLOPs for MFU
(``flops``) and the pretraining stages (``stages.run_pretrain``). Importing the package loads none of them."""
