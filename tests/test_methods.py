"""The method table and engine settings: one place says what each method needs, what `auto`
means, and which flags exist — for the engine, both CLIs and the server alike."""

import argparse
from types import SimpleNamespace

import pytest

from domino_backend import settings as engine_settings
from domino_backend.methods import METHODS, available, check, resolve
from domino_backend.settings import EngineSettings, NgramConfig, TreeConfig

HEAD = SimpleNamespace(has_head=True)
PLAIN = SimpleNamespace(has_head=False)


def test_available_methods_follow_the_drafter():
    assert available(None) == ["ar", "ngram"]
    assert available(PLAIN) == ["ar", "ngram", "dflash"]
    assert available(HEAD) == list(METHODS)


def test_check_says_why_a_method_cannot_run():
    with pytest.raises(ValueError, match="unknown method 'magic'"):
        check("magic", HEAD)
    with pytest.raises(ValueError, match="needs a drafter"):
        check("domino", None)
    with pytest.raises(ValueError, match="needs a Domino head"):
        check("domino+ngram", PLAIN)
    assert check("dflash", PLAIN).needs_drafter


@pytest.mark.parametrize("draft, trained, gpu, adaptive, expected", [
    (HEAD, True, True, True, "domino"),
    (HEAD, True, False, True, "domino+ngram"),
    (HEAD, True, False, False, "domino+ngram"),
    (HEAD, False, True, True, "ngram"),  # a random placeholder drafter is useless for speed
    (HEAD, False, False, False, "ar"),  # fixed-length lookup drafts lose on prose
    (None, False, False, True, "ngram"),
    (PLAIN, True, False, True, "ngram"),  # auto needs the head's methods
])
def test_auto_resolves_by_drafter_and_hardware(draft, trained, gpu, adaptive, expected):
    assert resolve("auto", draft, trained, gpu, adaptive) == expected


def test_a_named_method_the_engine_cannot_run_falls_back_to_ar():
    assert resolve("domino", None, False, False, True) == "ar"
    assert resolve("ngram", None, False, False, True) == "ngram"
    with pytest.raises(ValueError):
        resolve("magic", HEAD, True, False, True)


def test_every_setting_is_one_flag_and_round_trips():
    p = argparse.ArgumentParser()
    engine_settings.add_arguments(p)
    assert engine_settings.from_args(p.parse_args([])) == EngineSettings()
    got = engine_settings.from_args(p.parse_args(
        ["--no-adaptive-drafts", "--tree-width", "1.5", "--ngram-num-draft", "8", "--max-drafts", "4",
         "--prefix-cache", "0"]))
    assert got == EngineSettings(adaptive_drafts=False, tree=TreeConfig(width=1.5), ngram=NgramConfig(num_draft=8),
                                 max_drafts=4, prefix_cache=0)


def test_bad_settings_are_refused():
    for bad in (dict(prefill_chunk=0), dict(tree=TreeConfig(width=0)), dict(ngram=NgramConfig(min_ngram=4))):
        with pytest.raises(ValueError):
            EngineSettings(**bad)
