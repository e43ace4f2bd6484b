"""Evaluation metrics: classification (accuracy ... ROC-AUC), generated text (ROUGE-L, EM)."""
