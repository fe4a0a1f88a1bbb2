"""Using a fine-tuned model: ``predictor`` (loading, classify, generate), ``batch`` (ftcli
predict), ``chat`` (the terminal loops), ``feedback`` (verdicts that become training data)."""
