"""Every --help: plain text that says what each option means, printed without importing torch."""

from __future__ import annotations

import argparse
import dataclasses

from glasslstm import config
from glasslstm.cli import build_parser

RST = ("``", ":func:", ":class:", ":meth:", ":data:", "\n.. ")  # reStructuredText markup


def _parsers(parser=None, path=()):
    parser = parser or build_parser()
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, (*path, name))


def test_every_option_says_what_it_means_in_plain_text():
    seen = 0
    for path, parser in _parsers():
        text = parser.format_help()
        assert not any(mark in text for mark in RST), (path, text)
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            if isinstance(action, argparse._VersionAction):
                continue
            assert action.help and len(action.help) >= 8, (path, action.option_strings)
            seen += 1
        assert "(default: None)" not in text, path
    assert seen > 80  # every command's options were looked at


def test_train_options_come_from_the_config_with_their_meaning():
    names = {f.name for f in dataclasses.fields(config.TrainConfig)}
    assert set(config.TRAIN_HELP) == names  # a new field needs its help text
    help_text = dict(_parsers())[("train",)].format_help()
    for name in names:
        assert "--" + name.replace("_", "-") in help_text
    assert "{char,word,byte}" in help_text  # choices shown where the option has them
    # defaults that depend on --level are shown per level
    assert "(default: char 256, word 256, byte 256" in " ".join(help_text.split())


def test_the_names_help_lists_are_the_implementations():
    from glasslstm.bench.memory import INITS, MODELS
    from glasslstm.inspection.cells import PROBES
    from glasslstm.inspection.common import QUANTITIES
    from glasslstm.tasks import TASKS

    assert tuple(PROBES) == config.PROBES
    assert QUANTITIES == config.QUANTITIES and TASKS == config.TASKS
    assert MODELS == config.MEMORY_MODELS and INITS == config.INITS


def test_help_does_not_import_torch(modules_after):
    """`glasslstm ... --help` answers at once: building every parser imports no torch/numpy."""
    code = (
        "from glasslstm.cli import build_parser, main\n"
        "build_parser().format_help()\n"
        "for argv in (['--help'], ['train', '--help'], ['bench', 'speed', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
    )
    out, heavy = modules_after(code, ("torch", "numpy", "matplotlib"))
    assert heavy == [] and "--max-steps" in out
