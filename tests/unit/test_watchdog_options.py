"""The watchdog's strategy options: checked by the constructor, defaults as documented."""

import pytest

from lightning_firecaffe import FireCaffeStrategy, InvalidOption


@pytest.mark.parametrize(
    "kwargs, option, allowed",
    [
        ({"watchdog": "yes"}, "watchdog", "True or False"),
        ({"stall_action": "kill"}, "stall_action", "fail, warn"),
        ({"stall_grace": -1}, "stall_grace", ">= 0"),
        ({"stall_grace": float("nan")}, "stall_grace", "finite"),
        ({"stall_allowance": {"lunch": 5}}, "stall_allowance", "unknown phase kind 'lunch'"),
        ({"stall_allowance": {"checkpoint": -5}}, "stall_allowance", ">= 0"),
    ],
)
def test_bad_watchdog_options_raise_naming_the_option(kwargs, option, allowed):
    with pytest.raises(InvalidOption) as err:
        FireCaffeStrategy(**kwargs)
    assert err.value.option == option and allowed in str(err.value)


def test_defaults_are_the_documented_ones():
    o = FireCaffeStrategy(stall_timeout=20, stall_allowance={"checkpoint": 1200}).options
    assert o.watchdog and o.stall_action == "fail" and o.grace_s == 10.0
    assert o.allowances == {"setup": 300.0, "warmup": 300.0, "checkpoint": 1200, "normal": 0.0}
    assert FireCaffeStrategy(watchdog=False, stall_action="warn", stall_grace=0).options.grace_s == 0.0
