import matplotlib.pyplot as plt

from pipeline.plots import plot_training_curves
from pipeline.stages.align_dpo import loss_label


def test_the_loss_plot_says_which_loss_it_is(tmp_path, monkeypatch):
    figures = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig: (figures.append(fig), close(fig)))
    history = [{"step": 1, "loss": 0.69}, {"step": 2, "loss": 0.6, "val_loss": 0.65}]
    label = loss_label("sigmoid", 0.0)
    path = plot_training_curves(history, tmp_path / "loss.png", title="align-dpo", ylabel=label)
    assert path.read_bytes()[:4] == b"\x89PNG"
    assert figures[0].axes[0].get_ylabel() == "DPO loss −log σ(βΔ)"
    plot_training_curves(history, tmp_path / "lm.png")
    assert figures[1].axes[0].get_ylabel() == "cross-entropy loss"


def test_the_dpo_loss_label_is_what_the_loss_computes():
    assert loss_label("ipo", 0.0) == "IPO loss (Δ − 1/(2β))²"
    assert loss_label("sigmoid", 0.1) == "cDPO loss −0.9·log σ(βΔ) − 0.1·log σ(−βΔ)"
