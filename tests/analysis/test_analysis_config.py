"""conf/callbacks/analysis*.yaml compose with the training and evaluation configs and build the callbacks."""

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from cednet_pl.callbacks import DetectionQuality, GradientRegions, Panels
from cednet_pl.utils.instantiate import instantiate_callbacks
from cednet_pl.utils.run import CONF_DIR


@pytest.mark.parametrize(
    ("config", "overrides", "with_default"),
    [
        ("train", ["+experiment=det_demo", "callbacks=analysis"], True),
        ("eval", ["ckpt=x.ckpt", "callbacks=analysis_only", "callbacks.panels=null"], False),
    ],
)
def test_analysis_callbacks_compose(config, overrides, with_default):
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose(config_name=config, overrides=overrides)
    GlobalHydra.instance().clear()
    assert ("model_checkpoint" in cfg.callbacks) == with_default
    analysis = {
        k: v for k, v in cfg.callbacks.items() if k in ("detection_quality", "gradient_regions", "panels")
    }
    built = instantiate_callbacks(type(cfg.callbacks)(analysis))
    types = {type(cb) for cb in built}
    assert {DetectionQuality, GradientRegions} <= types
    assert (Panels in types) == with_default
    regions = next(cb for cb in built if isinstance(cb, GradientRegions))
    assert regions.every_n_validations == 0 and regions.at_fit_end
