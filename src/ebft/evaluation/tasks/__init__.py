"""lm-eval task configs for the offline zero-shot tasks (``ebft_<task>``), read from local JSON lines.

Register them with ``lm_eval.tasks.TaskManager(include_path=<this folder>, metadata={"ebft_task_data":
{"piqa": "path/piqa.jsonl", ...}})``; :mod:`ebft.evaluation.zeroshot` does that for you.
"""
