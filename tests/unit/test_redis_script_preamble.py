"""Each Redis script carries only the preamble definitions it uses; none it uses may go missing."""

from __future__ import annotations

import re

import pytest

from offload.brokers import rabbitmq_scripts, redis_scripts
from offload.brokers.redis_keys import _DEFINITIONS, _PREAMBLE, script

SCRIPTS = {
    f"{module.__name__.rsplit('.', 1)[1]}.{name}": value
    for module in (redis_scripts, rabbitmq_scripts)
    for name, value in vars(module).items()
    if name.isupper() and not name.startswith("_") and name != "ENQUEUE_BODY" and "redis.call" in value
}


def test_the_definitions_cover_the_whole_preamble_in_order() -> None:
    assert "".join(text for _, text in _DEFINITIONS) == _PREAMBLE


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_every_preamble_name_a_script_uses_is_defined_before_its_body(name: str) -> None:
    text = SCRIPTS[name]
    for names, definition in _DEFINITIONS:
        # Comments and string literals ('signal:' in a key name) use nothing.
        code = re.sub(r"--[^\n]*|'[^'\n]*'", "", text.replace(definition, ""))
        for defined in names:
            if re.search(rf"\b{defined}\b", code):
                assert definition in text, f"{name} uses {defined} but lacks its definition"


def test_a_script_leaves_out_what_it_does_not_use() -> None:
    lean = script("return redis.call('GET', k_job(ARGV[2]))")
    assert "local function k_job" in lean and "local P = ARGV[1]" in lean
    assert "recover" not in lean and "next_token" not in lean
