"""``triton.utils``' launch configs: the autotuner's candidates trimmed to each dim (the interpreter
never autotunes, so this path is checked directly), and the single config without autotuning."""

from __future__ import annotations

import pytest

from linearize.kernels.triton import utils


def test_autotune_tiles_fit_the_dims(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(utils, "AUTOTUNE", True)
    monkeypatch.setattr(utils, "INTERPRETER", False)
    configs = utils.launch_configs("BK", "BF", "BD")
    assert {c.kwargs["BK"] for c in configs} == {32, 64} and len(configs) == 2 * len(utils.TILE_WARPS)
    assert all(c.kwargs["BK"] == c.kwargs["BF"] == c.kwargs["BD"] <= utils.MAX_TILE for c in configs)
    # Llama-3-8B heads with Hedgehog's 256 features keep both tile sizes; a 16-wide dim keeps 16.
    fitted = utils.fit_tiles(configs, {"K": 128, "F": 256}, D=20)
    assert {(c.kwargs["BK"], c.kwargs["BF"], c.kwargs["BD"]) for c in fitted} == {(32, 32, 32), (64, 64, 32)}
    small = utils.fit_tiles(configs, {"K": 16, "F": 16, "D": 16})
    assert {tuple(c.kwargs.values()) for c in small} == {(16, 16, 16)}
    assert len(small) == 4  # 4 and 8 warps, 1 and 2 stages: the duplicates are dropped


@pytest.mark.parametrize("interpreter", [True, False], ids=["interpreter", "gpu"])
def test_one_config_without_autotuning(interpreter: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(utils, "AUTOTUNE", False)
    monkeypatch.setattr(utils, "INTERPRETER", interpreter)
    (config,) = utils.launch_configs("BK", "BN")
    size = utils.MAX_TILE if interpreter else utils.FIXED_TILE_WARPS[0]
    assert config.kwargs == {"BK": size, "BN": size}
