"""The evaluation stage: metric functions, loss and generation on eval data, base vs adapter, report.html.
May use: errors, hashing, run_folder, config, data, model."""
