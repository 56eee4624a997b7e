"""The evaluation stage: metric definitions (metrics), eval examples (examples), loss on eval data (loss), the one
generation function (generate), one model's results (scoring), `lorafit eval` and training-time evaluation (run),
report.html (report).
May use: errors, hashing, run_folder, config, data, model."""
