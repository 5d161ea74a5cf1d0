"""The simclr paradigm as paper B's code runs it (Nokia-Bell-Labs/SSLfairness, code/baselines/SimCLR): its
defaults, its views (scaling, then negation), its projection head, and the extra views kept as options."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from trainables import backbones as B
from trainables.paradigms import PARADIGMS, ParadigmError
from trainables.ssl import SSL_METHODS, TIMESERIES_AUGMENTATIONS, TimeseriesViews, augmenter


def test_simclr_defaults_are_paper_b_s() -> None:
    opts = PARADIGMS.get("simclr").resolve_options({})
    assert opts == {"temperature": 0.1, "hidden_dim": 256, "hidden_dim_2": 128, "projection_dim": 50,
                    "augmentations": "scale,negate", "scale_sigma": 0.1, "negate_p": 1.0}
    # the other two-view methods keep the wider set of views they had
    for name in ("vicreg", "byol"):
        assert PARADIGMS.get(name).resolve_options({})["augmentations"] == "time_warp,scale,negate,jitter,mask"


def test_default_views_scale_each_channel_then_negate_every_series() -> None:
    """Paper B composes scaling_transform_vectorized (a factor ~ N(1, 0.1) per example and channel) and
    negate_transform_vectorized (x * -1, always): every view is -s * x with s near 1, constant in time."""
    torch.manual_seed(0)
    views = augmenter("timeseries", PARADIGMS.get("simclr").resolve_options({}))
    assert views == TimeseriesViews(("scale", "negate"), 0.1, 1.0)
    x = torch.rand(4000, 3, 16) + 0.5  # positive, so the sign of the factor shows
    factor = views(x) / x
    assert torch.allclose(factor, factor[..., :1].expand_as(factor), atol=1e-5)  # one factor per series and channel
    f = factor[..., 0]
    assert (f < 0).all()  # negated, every one
    assert abs(float(f.mean()) + 1) < 0.01 and abs(float(f.std()) - 0.1) < 0.01
    assert float((f[:, 0] - f[:, 1]).abs().mean()) > 0.05  # channels scaled independently


def test_negate_p_and_extra_views_are_options() -> None:
    torch.manual_seed(0)
    x = torch.ones(4000, 2, 32)
    half = augmenter("timeseries", {"augmentations": "negate", "scale_sigma": 0.1, "negate_p": 0.5})(x)
    assert abs(float((half[:, 0, 0] < 0).float().mean()) - 0.5) < 0.03
    every = augmenter("timeseries", {"augmentations": ",".join(TIMESERIES_AUGMENTATIONS), "scale_sigma": 0.1,
                                     "negate_p": 0.5})
    out = every(torch.randn(8, 2, 64))
    assert out.shape == (8, 2, 64) and torch.isfinite(out).all()
    opts = PARADIGMS.get("simclr").resolve_options({"augmentations": "scale, time_warp,jitter,mask"})
    assert augmenter("timeseries", opts).names == ("scale", "time_warp", "jitter", "mask")


@pytest.mark.parametrize("value", ["scale,rotate", "scale,,negate", "flip"])
def test_unknown_views_are_a_paradigm_error_naming_the_field(value: str) -> None:
    with pytest.raises(ParadigmError, match=r"pretraining\.paradigms\.simclr\.augmentations: got .*scale, negate, "
                                            r"time_warp, jitter, mask"):
        PARADIGMS.get("simclr").resolve_options({"augmentations": value})


def test_projection_head_is_paper_b_s_three_dense_layers() -> None:
    """attach_simclr_head(hidden_1=256, hidden_2=128, hidden_3=50): Dense, ReLU, Dense, ReLU, Dense; no batch
    norm; Keras initialisers (zero biases). Temperature 0.1 reaches the NT-Xent loss."""
    model = B.create_backbone("cnn1d_paperb", num_classes=2, input_shape=(5, 101))
    opts = PARADIGMS.get("simclr").resolve_options({})
    objective = SSL_METHODS.get("simclr").build(model, 96, opts, "timeseries")
    layers = list(objective.head)
    assert [type(m).__name__ for m in layers] == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]
    assert [(m.in_features, m.out_features) for m in layers if isinstance(m, nn.Linear)] == [(96, 256), (256, 128),
                                                                                            (128, 50)]
    assert all(torch.count_nonzero(m.bias) == 0 for m in layers if isinstance(m, nn.Linear))
    assert objective.loss_fn.temperature == 0.1
    loss = objective.loss(model, torch.randn(8, 5, 101))
    assert loss.ndim == 0 and torch.isfinite(loss)
