"""An audit's settings (memorize/audit/settings.py): the defaults the documentation states, and each bad setting
refused by check() in one ConfigError naming it."""

import pytest

from memk.memorize.audit.settings import AuditSettings
from memk.memorize.errors import ConfigError


def test_the_defaults_are_the_documented_ones():
    settings = AuditSettings()
    settings.check()
    assert (settings.window, settings.stride, settings.batch_tokens, settings.min_k, settings.min_k_pp) == (
        None, None, 8192, 0.2, True)
    assert (settings.bootstrap, settings.seed, settings.top, settings.recall_shots, settings.dc_pdd_cap) == (
        1000, 0, 20, 0, 0.01)
    assert (settings.extract_prefixes, settings.extract_length, settings.fail_if) == ((8, 16, 32), 32, ())


@pytest.mark.parametrize("bad, says", [
    ({"window": 1}, "--window 1 is too small"), ({"stride": 0}, "--stride 0 must be at least 1"),
    ({"batch_tokens": 0}, "--batch-tokens 0 must be positive"), ({"min_k": 0.0}, "--min-k 0.0 must be a fraction"),
    ({"min_k": 1.5}, "--min-k 1.5 must be a fraction"), ({"bootstrap": -1}, "--bootstrap"), ({"top": -1}, "--top"),
    ({"chunk": 0}, "chunk"), ({"extract_prefixes": (0,)}, "at least 1 token"),
    ({"extract_prefixes": (8, 8)}, "names a prefix twice"), ({"extract_length": 0}, "--extract-length 0"),
    ({"recall_shots": -1}, "--recall-shots -1"), ({"dc_pdd_cap": 0.0}, "--dc-pdd-cap 0.0 must be positive"),
    ({"fail_if": ("auc=0.6",)}, "METRIC OP NUMBER"), ({"fail_if": ("bits>3",)}, "unknown metric 'bits'"),
])
def test_a_bad_setting_is_refused_naming_it(bad, says):
    with pytest.raises(ConfigError, match=says):
        AuditSettings(**bad).check()
