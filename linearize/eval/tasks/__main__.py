"""``python -m linearize.eval.tasks`` prints the folder to give lm_eval as ``--include_path``."""

from linearize.eval.tasks import include_path

print(include_path())
