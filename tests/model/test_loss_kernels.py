"""parallel.loss_kernel: the fused kernels of other libraries are called with the loss's inputs
and settings and give the model's loss; where they cannot run, the config says so before any
model is built."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from model_helpers import build, make_cfg

from kha_train.config import ConfigError, load_config
from kha_train.config_checks import validate
from kha_train.model.loss import IGNORE_INDEX, chunked_cross_entropy


def _fake(monkeypatch, module: str, attr: str, calls: list) -> None:
    """A stand-in for the library's function that records its call and computes our loss."""

    def fn(hidden, weight, labels, **kwargs):
        calls.append((hidden.dtype, weight.dtype, kwargs))
        return chunked_cross_entropy(hidden, weight, labels, ignore_index=kwargs["ignore_index"],
                                     compiled=False)  # fmt: skip

    parts = module.split(".")
    for i in range(1, len(parts) + 1):
        monkeypatch.setitem(sys.modules, ".".join(parts[:i]), types.ModuleType(parts[i - 1]))
    setattr(sys.modules[module], attr, fn)


@pytest.mark.parametrize(
    ("kernel", "module", "attr", "kwargs"),
    [
        ("liger", "liger_kernel.transformers.functional", "liger_fused_linear_cross_entropy",
         {"ignore_index": IGNORE_INDEX, "accum_dtype": torch.float32}),
        ("cce", "cut_cross_entropy", "linear_cross_entropy", {"ignore_index": IGNORE_INDEX}),
    ],
)  # fmt: skip
def test_a_fused_kernel_gets_the_loss_inputs_and_gives_the_model_loss(
    monkeypatch, kernel, module, attr, kwargs
) -> None:
    calls: list = []
    _fake(monkeypatch, module, attr, calls)
    ids = torch.randint(0, 97, (2, 12))
    labels = ids.roll(-1, dims=1)
    labels[:, -1] = IGNORE_INDEX
    ref, fused = build(make_cfg(), seed=1), build(make_cfg(), seed=1)
    fused.loss_kernel = kernel
    want, got = ref(ids, labels), fused(ids, labels)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    got.backward()
    want.backward()
    for (name, p), q in zip(fused.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)
    assert calls == [(torch.float32, torch.float32, kwargs)]
    with torch.autocast("cpu", torch.bfloat16):  # the head's matmuls in autocast's dtype
        fused(ids, labels)
    assert calls[-1][:2] == (torch.bfloat16, torch.bfloat16)


@pytest.mark.parametrize("kernel", ["liger", "cce"])
def test_a_fused_kernel_is_refused_where_it_cannot_run(kernel) -> None:
    cfg = load_config("configs/tiny/kha_moe.yaml",
                      [f"parallel.loss_kernel={kernel}", "train.device=cpu"])  # fmt: skip
    with pytest.raises(ConfigError, match=f"parallel.loss_kernel={kernel} is a CUDA kernel") as e:
        validate(cfg)
    assert "parallel.loss_kernel=chunked" in str(e.value)
    validate(load_config("configs/tiny/kha_moe.yaml", ["train.device=cpu"]))  # chunked: fine
