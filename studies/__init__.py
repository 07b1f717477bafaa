"""Quality studies: how well the demo's cascade, its samplers, editing and fine-tuning do, judged
from pixels. Each is runnable (`python -m studies.<name> --workdir=demo_run`) and prints a table
and a RESULT_JSON line; benchmarks/ holds the speed and memory measurements users run."""
