"""The diagnosis on real MNIST runs at a reduced budget: each regime appears where it should."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import compose_config
from optimlab.train import run

QUIET = ["trainer.progress_bar=false", "data.test_every_epoch=false"]

CASES = {
    "diverging": ["lr=2.0", "data.subset=5000", "epochs=3"],
    "underfit": ["model.hidden=[4]", "epochs=8"],
    "slow": ["lr=1e-4", "data.subset=5000", "epochs=3"],
    # a big net memorising 1,000 images, half of them with shuffled labels
    "overfit": ["model.hidden=[1024,1024]", "model.init=default", "optimizer=adam", "lr=0.001",
                "data.subset=1000", "data.label_noise=0.5", "epochs=15", "data.val_size=2000"],
    "healthy": ["data.subset=20000", "epochs=4"],
}


@pytest.mark.slow
@pytest.mark.parametrize("expected", list(CASES))
def test_regime_appears_on_real_mnist(expected: str, tmp_path: Path, mnist_root: Path) -> None:
    summary = run(compose_config(*CASES[expected], *QUIET), tmp_path)
    assert summary.regime == expected, (summary.regime_evidence, summary.epochs)
