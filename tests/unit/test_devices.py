"""Device kinds: the runtime takes device, backend and the vendor's torch extension from the one table."""

from __future__ import annotations

import dataclasses

import pytest

from farm._hydra import compose_from_argv
from farm.errors import StartupFailure
from farm.runtime.worker import import_device_module
from farm.topology import load_farm

pytestmark = pytest.mark.unit


def test_no_extension_is_imported_for_cpu_or_cuda() -> None:
    import_device_module(None)


def test_a_missing_vendor_extension_is_a_clear_startup_error() -> None:
    # torch_npu is not installed here: the NPU path reaches the import and says what to install.
    with pytest.raises(StartupFailure, match=r"'torch_npu'.*install the vendor's torch extension"):
        import_device_module("torch_npu")


@pytest.mark.parametrize(
    ("topology", "device", "backend", "module"),
    [("ascend-910b", "npu", "hccl", "torch_npu"), ("dgx-h100-superpod", "cuda", "nccl", None),
     ("gaudi2", "hpu", "hccl", "habana_frameworks.torch")],
)
def test_real_farms_take_their_device_and_emulation_takes_gloo(topology: str, device: str, backend: str,
                                                               module: str | None) -> None:
    cfg, _ = compose_from_argv([f"+topology={topology}"])
    farm = load_farm(cfg.topology)
    spec = farm.accelerator(farm.pools[0].name)
    assert (spec.torch_device, spec.backend, spec.torch_module) == (device, backend, module)
    emulated = load_farm({**cfg.topology, "emulate": "cpu"})
    spec = emulated.accelerator(emulated.pools[0].name)
    assert (spec.torch_device, spec.backend, spec.ds_accelerator, spec.torch_module) == ("cpu", "gloo", "cpu", None)
    assert dataclasses.asdict(spec)["ray_resource"].startswith("farm_")
