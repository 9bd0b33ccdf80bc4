"""One table says what needs the whole model (no lazy loading) and what needs one process (no torchrun):
the lazy decision, the torchrun refusal and --lazy's help all read it, and a recovery's registration
(its scope) is what puts it there."""
from __future__ import annotations

import pytest

from ebft.capabilities import NEEDS, WHOLE_MODEL_HELP, check_distributed, lazy_blockers
from ebft.config import RunConfig
from ebft.errors import ConfigError
from ebft.recover import register_recovery, unregister_recovery


def _config(**changes) -> RunConfig:
    config = RunConfig(model="some/model", out="x")
    for key, value in changes.items():
        section, _, name = key.rpartition(".")
        setattr(getattr(config, section) if section else config, name, value)
    return config


def test_nothing_blocks_a_plain_run():
    config = _config()
    assert lazy_blockers(config, config.pattern()) == []
    check_distributed(config, config.pattern(), 2)


@pytest.mark.parametrize("changes, lazy, refused", [
    ({"finish.method": "kd"}, "the finish (kd) trains the whole model at once", ("finish", "kd")),
    ({"eval.zeroshot": ["piqa", "boolq"]}, "zero-shot evaluation", ("eval.zeroshot", "piqa,boolq")),
    ({"eval.speed": True}, "speed measurement", ("eval.speed", True)),
    ({"recover.method": "lora"}, "recovery lora trains the whole model", ("recover", "lora")),
    ({"export": "gguf"}, "--export gguf reads the whole saved model", None),
    ({"calib.source": "self"}, "--calib self samples", None),
])
def test_each_row_blocks_lazy_loading_and_torchrun_as_it_declares(changes, lazy, refused):
    config = _config(**changes)
    pattern = config.pattern()
    assert [why for why in lazy_blockers(config, pattern) if lazy in why]
    if refused is None:
        check_distributed(config, pattern, 2)
        return
    with pytest.raises(ConfigError) as error:
        check_distributed(config, pattern, 2)
    assert (error.value.field, error.value.value) == refused


def test_a_model_scope_recovery_of_ones_own_is_in_the_table_by_its_registration():
    register_recovery("whole-toy", target=None, scope="model", summary="whole-toy: a toy")(lambda ctx, s: {})
    try:
        config = _config(**{"recover.method": "whole-toy"})
        assert lazy_blockers(config, config.pattern()) == ["recovery whole-toy trains the whole model at once"]
        with pytest.raises(ConfigError, match="without torchrun"):
            check_distributed(config, config.pattern(), 2)
    finally:
        unregister_recovery("whole-toy")


def test_lazy_help_names_every_row_that_needs_the_whole_model():
    for need in NEEDS:
        assert (need.what in WHOLE_MODEL_HELP) == (need.whole_model is not None)
    assert ".bin" in WHOLE_MODEL_HELP  # not a setting: the block store cannot read a pickle tensor by tensor
