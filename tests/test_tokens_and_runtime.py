import pytest
import torch

import icl_course as icl


def test_tokens_layout_and_readout():
    xs, ys, xq = torch.randn(2, 3, 4), torch.randn(2, 3), torch.randn(2, 4)
    Z = icl.make_tokens(xs, ys, xq)
    assert Z.shape == (2, 4, 5)
    assert torch.equal(Z[:, :3, :4], xs) and torch.equal(Z[:, :3, 4], ys)
    assert torch.equal(Z[:, 3, :4], xq) and (Z[:, 3, 4] == 0).all()
    Z[:, -1, -1] = torch.tensor([1.5, -2.0])
    assert torch.equal(icl.read_prediction(Z), torch.tensor([-1.5, 2.0]))


@pytest.mark.parametrize(
    "shapes, word",
    [(((2, 3), (2, 3), (2, 4)), "xs"), (((2, 3, 4), (2, 4), (2, 4)), "ys"), (((2, 3, 4), (2, 3), (3, 4)), "x_query")],
)
def test_token_shape_errors_name_the_argument(shapes, word):
    with pytest.raises(ValueError, match=word):
        icl.make_tokens(*(torch.zeros(s) for s in shapes))


def test_profile_resolution(monkeypatch):
    monkeypatch.setenv("ICL_COURSE_PROFILE", "smoke")
    assert icl.get_profile() == "smoke"
    assert icl.get_profile("quick") == "quick"
    monkeypatch.setenv("ICL_COURSE_PROFILE", "auto")
    assert icl.get_profile() == "quick"  # on every device: `full` is opt-in
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert icl.get_profile() == "quick"
    monkeypatch.setenv("ICL_COURSE_PROFILE", "huge")
    with pytest.raises(ValueError, match="ICL_COURSE_PROFILE"):
        icl.get_profile()
    with pytest.raises(ValueError, match="profile"):
        icl.get_profile("tiny")


def test_device_is_cuda_only_when_available():
    assert icl.get_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
