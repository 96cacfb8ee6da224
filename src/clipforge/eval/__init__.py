"""Evaluation of a model: retrieval, zero-shot accuracy and linear probes on data sets, reports and suites.

- `tasks`: ``evaluate_retrieval``, ``evaluate_zeroshot``, ``evaluate_linear_probe``: a data set in, a result out;
- `retrieval`: retrieval metrics from embeddings, and ``evaluate_captioned_images``, the one retrieval
  evaluation of a model (the tasks' and training's validation);
- `accuracy`: classification metrics (acc1, acc5, per-class recall, confusion); `probe`: the linear probe;
- `datasets`: data sets read into rows; `features`: image features, with the on-disk feature cache;
- `report`: result JSON, plots and summary tables; `suite`: many tasks and models from a YAML file.

Submodules are imported directly (``from clipforge.eval.retrieval import retrieval_metrics``) so that
importing the package stays cheap.
"""
