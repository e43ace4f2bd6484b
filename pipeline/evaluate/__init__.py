"""Evaluation metrics: classification (accuracy ... ROC-AUC), calibration (temperature scaling,
ECE), generated text (ROUGE-L, EM) and its diversity (length, distinct-n, collapse)."""
