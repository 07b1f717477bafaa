"""Stage and job configs: `get_config(arg)` per file; `arg` selects a variant (tiny, 500m, paper),
and a stage file's `,finetune` adds fine-tuning's settings (`common.finetuning`)."""
