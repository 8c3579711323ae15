"""Multi-view TTA (evaluate.predict with tta_translate) and lookahead weight averaging, on tiny CPU modules."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.training.evaluate import evaluate, predict, shift, tta_views
from trainer.training.lookahead import Lookahead

# ---------------------------------------------------------------- lookahead


def _net(seed: int) -> nn.Module:
    # BatchNorm: float running statistics that must be averaged, and an integer counter that must not.
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))


def _train_step(net: nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
    """One real SGD step on a batch fixed by `step`, so two runs see the same data."""
    g = torch.Generator().manual_seed(step)
    x, target = torch.randn(8, 4, generator=g), torch.randn(8, 3, generator=g)
    net.train()
    loss = F.mse_loss(net(x), target)
    opt.zero_grad()
    loss.backward()
    opt.step()


def _state(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.state_dict().items()}


def _assert_states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k, value in a.items():
        assert torch.equal(value, b[k]), k


def test_lookahead_pulls_the_weights_on_schedule():
    every, decay, total = 3, 0.9, 9
    net = _net(0)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    la = Lookahead(net, every, decay)
    expected_slow = _state(net)
    for step in range(1, total + 1):
        _train_step(net, opt, step)
        fast = _state(net)
        la.step(net, step, total)
        if step % every:  # between updates neither the network nor the slow copy moves
            _assert_states_equal(_state(net), fast)
            _assert_states_equal(la.state_dict(), expected_slow)
            continue
        d = decay * (step / total) ** 3
        for k, f in fast.items():
            expected_slow[k] = d * expected_slow[k] + (1 - d) * f if f.is_floating_point() else f
        slow = la.state_dict()
        assert slow["1.num_batches_tracked"] == step  # the counter is copied, not averaged
        for k in fast:
            assert torch.allclose(slow[k], expected_slow[k], rtol=1e-6, atol=1e-7), k
        expected_slow = {k: v.clone() for k, v in slow.items()}  # lerp rounds apart from the formula: go on from it
        _assert_states_equal(_state(net), slow)  # the network is reset to the slow copy
        # The pull moved the weights and BatchNorm's statistics off the trained values.
        assert not torch.equal(net[0].weight, fast["0.weight"])
        assert not torch.equal(net[1].running_mean, fast["1.running_mean"])


def test_lookahead_decay_rises_as_the_cube_of_progress():
    la = Lookahead(_net(0), every=1, decay=0.8)
    assert la.decay_at(10, 10) == pytest.approx(0.8)
    assert la.decay_at(5, 10) == pytest.approx(0.8 / 8)
    assert [la.decay_at(s, 40) / la.decay_at(1, 40) for s in (2, 3, 4)] == pytest.approx([8, 27, 64])
    for step in (0, 11):
        with pytest.raises(ValueError, match=f"step {step} is outside the plan of 10 steps"):
            la.decay_at(step, 10)
    with pytest.raises(ValueError, match="lookahead_every"):
        Lookahead(_net(0), every=0, decay=0.5)


def test_lookahead_finish_puts_the_slow_weights_into_the_network():
    net = _net(0)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    la = Lookahead(net, every=2, decay=0.9)
    for step in range(1, 6):  # step 5 is no update: the network ends off the slow copy
        _train_step(net, opt, step)
        la.step(net, step, 6)
    slow = {k: v.clone() for k, v in la.state_dict().items()}
    assert not torch.equal(net[0].weight, slow["0.weight"])
    la.finish(net)
    _assert_states_equal(_state(net), slow)


def _run(net: nn.Module, opt: torch.optim.Optimizer, la: Lookahead, steps: range, total: int) -> None:
    for step in steps:
        _train_step(net, opt, step)
        la.step(net, step, total)


def test_lookahead_state_dict_round_trip_continues_exactly():
    total, every = 10, 2
    net = _net(0)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    la = Lookahead(net, every, 0.9)
    _run(net, opt, la, range(1, 6), total)  # stops between updates, so the slow copy differs from the network
    buffer = io.BytesIO()
    torch.save({"model": net.state_dict(), "opt": opt.state_dict(), "lookahead": la.state_dict()}, buffer)
    _run(net, opt, la, range(6, total + 1), total)
    la.finish(net)

    resumed = _net(1)  # another initialisation, so a slow copy that failed to load would show
    resumed_opt = torch.optim.SGD(resumed.parameters(), lr=0.1, momentum=0.9)
    resumed_la = Lookahead(resumed, every, 0.9)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    resumed.load_state_dict(state["model"])
    resumed_opt.load_state_dict(state["opt"])
    resumed_la.load_state_dict(state["lookahead"])
    _run(resumed, resumed_opt, resumed_la, range(6, total + 1), total)
    resumed_la.finish(resumed)
    _assert_states_equal(_state(resumed), _state(net))

    with pytest.raises(ValueError, match="other keys than the model"):
        resumed_la.load_state_dict({"0.weight": state["lookahead"]["0.weight"]})


# ---------------------------------------------------------------- TTA


class Probe(nn.Module):
    """Logits = the channels of pixel (1, 1), one class per channel; records each forward's batch
    size and whether its input was channels_last."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones((), dtype=torch.float64))
        self.calls: list[tuple[int, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append((x.shape[0], x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()))
        return self.scale * x[:, :, 1, 1]


def _images(n: int = 4, size: int = 6) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def test_tta_view_count_is_the_number_of_forwards():
    assert [tta_views(False, 0), tta_views(True, 0), tta_views(True, 2)] == [1, 2, 6]
    with pytest.raises(ValueError, match="tta_translate: the shifted views are mirror pairs"):
        tta_views(False, 1)
    x = _images().contiguous(memory_format=torch.channels_last)
    for tta, k in ((False, 0), (True, 0), (True, 1), (True, 2)):
        net = Probe()
        predict(net, x, tta, None, tta_translate=k)
        # Each view is one forward of the whole batch, in the batch's memory format.
        assert net.calls == [(4, True)] * tta_views(tta, k)


def test_six_views_are_the_weighted_mirror_pairs_of_the_shifted_images():
    x, k, w = _images(), 1, 6
    # Probe reads pixel (1, 1); of a mirror image, (1, w - 2). Shifted down-right by 1, pixel (1, 1)
    # shows the original (0, 0); shifted up-left, (2, 2).
    pair = (x[:, :, 1, 1] + x[:, :, 1, w - 2]) / 2
    pair_down_right = (x[:, :, 0, 0] + x[:, :, 0, w - 3]) / 2
    pair_up_left = (x[:, :, 2, 2] + x[:, :, 2, w - 1]) / 2
    expected = (pair / 2 + pair_down_right / 4 + pair_up_left / 4).float()  # predict returns float32
    assert torch.allclose(predict(Probe(), x, True, None, tta_translate=k), expected)
    assert torch.allclose(predict(Probe(), x, True, None), pair.float())


def test_six_views_equal_one_view_for_a_translation_and_mirror_invariant_input():
    # Images of one colour each look the same mirrored and shifted with reflection (a zero or mean
    # fill would not), so any net's 6-view logits equal its plain ones iff the weights sum to 1.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(8, 5))
    net.eval()
    x = torch.randn(4, 3, 1, 1).expand(4, 3, 8, 8).contiguous()
    with torch.no_grad():
        one = predict(net, x, False, None)
        assert torch.allclose(predict(net, x, True, None, tta_translate=2), one, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(net(torch.randn(4, 3, 8, 8)), one)  # the net does depend on its input


def test_shift_moves_the_image_the_stated_way_with_reflection():
    x = _images(2, 6)
    padded = F.pad(x, (2, 2, 2, 2), mode="reflect")
    assert torch.equal(shift(x, 2, 2), padded[..., 0:6, 0:6])  # airbench's crop at the padded origin
    assert torch.equal(shift(x, -2, -2), padded[..., 4:10, 4:10])
    assert torch.equal(shift(x, 1, -1), F.pad(x, (1, 1, 1, 1), mode="reflect")[..., 0:6, 2:8])
    dot = torch.zeros(1, 1, 6, 6)
    dot[0, 0, 2, 3] = 1
    assert shift(dot, 1, 1)[0, 0, 3, 4] == 1 and shift(dot, -1, -1)[0, 0, 1, 2] == 1  # positive = down, right
    assert shift(x.contiguous(memory_format=torch.channels_last), 1, 1).is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="tta_translate: a shift of 6 pixels needs images larger than that, got 6x6"):
        shift(x, 6, 6)


def test_evaluate_pads_every_view_to_pad_to():
    x, y = _images(7), torch.arange(7) % 3
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]
    net = Probe()
    padded = evaluate(net, batches, True, None, pad_to=4, tta_translate=1)
    assert net.calls == [(4, False)] * 12  # two batches of six views, the short one padded
    plain = evaluate(Probe(), batches, True, None, tta_translate=1)
    assert padded == pytest.approx(plain)
    assert padded != pytest.approx(evaluate(Probe(), batches, True, None))  # the shifted views count


class DtypeProbe(nn.Module):
    """Records the dtype of every view it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.dtypes: list[torch.dtype] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.dtypes.append(x.dtype)
        return self.conv(x).mean((2, 3))


def test_shifted_views_keep_the_input_dtype_under_autocast():
    """Autocast runs reflect padding in float32: without a cast back, the 4 shifted views of a bf16
    batch reach the network as float32, and a compiled network traces a second graph for them."""
    from torch._dynamo.utils import counters

    x = _images(4, 8).to(torch.bfloat16)
    net = DtypeProbe()
    predict(net, x, True, torch.bfloat16, tta_translate=1)
    assert net.dtypes == [torch.bfloat16] * 6
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert shift(x, 1, 1).dtype == torch.bfloat16 and shift(x.float(), 1, 1).dtype == torch.float32

    torch._dynamo.reset()
    counters.clear()
    plain = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    compiled = torch.compile(plain, backend="eager")  # dynamo's graphs without inductor's time
    with torch.no_grad():
        predict(compiled, x, True, torch.bfloat16, tta_translate=1)
    assert counters["stats"]["unique_graphs"] == 1
