"""Integrations with the tools users already run: `lmms` is the lmms-eval model `dyrate_llava`
(imported only by lmms-eval, through the `lmms_eval.models` entry point) and `lmms_tasks/` the
testbed's task YAMLs for lmms-eval's --include_path."""
