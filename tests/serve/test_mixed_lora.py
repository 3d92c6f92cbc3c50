"""RowAdapters on a small peft model: every row of a mixed batch gets exactly what its adapter
alone gives, through the gathered path (LoRA on linear layers) and peft's own per-adapter path
(LoRA on a convolution), with the rows seen once or twice (classifier-free guidance)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer

from dreambooth_trainer.serve.mixed_lora import BASE_ROW, RowAdapters


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.proj = torch.nn.Linear(4, 6)
        self.out = torch.nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x).flatten(2).transpose(1, 2)  # rows x pixels x channels
        return self.out(torch.relu(self.proj(h)))


def model_with_adapters() -> torch.nn.Module:
    torch.manual_seed(0)
    model = Tiny().eval()
    # Different ranks (padding), and an adapter without `out` (its rows get no delta there).
    configs = {
        "a": LoraConfig(r=2, lora_alpha=4, target_modules=["conv", "proj", "out"]),
        "b": LoraConfig(r=3, lora_alpha=3, target_modules=["conv", "proj"]),
    }
    for name, config in configs.items():
        model = inject_adapter_in_model(config, model, adapter_name=name)
    with torch.no_grad():
        for parameter_name, parameter in model.named_parameters():
            if "lora_B" in parameter_name:  # peft starts B at zero: a no-op adapter
                parameter.normal_(0, 0.5)
    return model


def lora_layers(model: torch.nn.Module) -> list[LoraLayer]:
    return [module for module in model.modules() if isinstance(module, LoraLayer)]


def alone(model: torch.nn.Module, x: torch.Tensor, name: str) -> torch.Tensor:
    """The model's output with one adapter active, or none."""
    for layer in lora_layers(model):
        if name == BASE_ROW:
            layer.enable_adapters(False)
        else:
            layer.enable_adapters(True)
            layer.set_adapter(name)
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("repeats", [1, 2])
def test_each_row_gets_what_its_adapter_gives_alone(repeats):
    model = model_with_adapters()
    names = ["a", "b", BASE_ROW, "a"]
    x = torch.randn(len(names) * repeats, 3, 4, 4)
    expected = torch.cat([alone(model, x[i : i + 1], names[i % len(names)]) for i in range(len(x))])
    for layer in lora_layers(model):
        layer.enable_adapters(True)
    with RowAdapters(names).applied(lora_layers(model)), torch.no_grad():
        mixed = model(x)
    torch.testing.assert_close(mixed, expected, rtol=1e-5, atol=1e-5)
    # ... and the adapters matter here: rows of `a` differ from the base's.
    assert not torch.allclose(expected[0], alone(model, x[:1], BASE_ROW)[0], atol=1e-2)


def test_rows_that_do_not_tile_the_batch_are_refused():
    model = model_with_adapters()
    rows = RowAdapters(["a", "b", BASE_ROW])
    refused = pytest.raises(RuntimeError, match="got 4 rows for 3 prompts")
    with rows.applied(lora_layers(model)), torch.no_grad(), refused:
        model(torch.randn(4, 3, 4, 4))


def test_the_hooks_are_gone_after_the_block():
    model = model_with_adapters()
    x = torch.randn(2, 3, 4, 4)
    before = alone(model, x, "a")
    with RowAdapters(["b", BASE_ROW]).applied(lora_layers(model)):
        pass
    torch.testing.assert_close(alone(model, x, "a"), before, rtol=0, atol=0)
