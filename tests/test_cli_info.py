"""The informational commands: `robustft methods`, `presets`, `config`, `--help`, `--version`."""

from __future__ import annotations

import pytest
import yaml

from robustft import __version__
from robustft.cli import build_parser, main
from robustft.config import build_config, config_to_dict, list_presets
from robustft.methods import METHODS, list_methods


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse's --help / --version
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_methods_lists_every_registered_method_with_its_description(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "methods")
    assert code == 0
    lines = out.strip().split("\n\n")[0].splitlines()  # the table; the composable parts follow a blank line
    registered = list_methods()
    assert len(lines) == len(registered) >= 14
    for line, (name, description) in zip(lines, registered):
        assert line.split()[0] == name
        assert line.rstrip().endswith(description)
    names = {line.split()[0] for line in lines}
    assert {"zeroshot", "lp", "ft", "lp-ft", "wise-ft", "kd", "fd", "kd-refill", "fd-refill", "fd-tokendrop",
            "fd-attnmask", "l2sp", "flyp", "flyp-fd-refill"} <= names
    assert names == set(METHODS.names())


def test_methods_shows_each_composition_and_the_parts_that_compose(capsys: pytest.CaptureFixture[str]) -> None:
    from robustft.methods.objective import REGULARISERS, TASKS

    code, out, _ = _run(capsys, "methods")
    assert code == 0
    table, parts = out.strip().split("\n\n", 1)
    rows = {line.split()[0]: line for line in table.splitlines()}
    # name, composition, description: the composition column sits between the two.
    for name, composition in [("ft", "ce"), ("fd-refill", "ce + cf-fd"), ("l2sp", "ce + l2sp"), ("flyp", "contrastive"),
                              ("flyp-fd-refill", "contrastive + cf-fd"), ("lp-ft", "lp -> ft"), ("lp", "ce(probe)"),
                              ("wise-ft", "ce, then WiSE-FT weight interpolation"), ("zeroshot", "-")]:
        description = METHODS.get(name).description
        middle = rows[name][len(name):-len(description)].strip()
        assert middle == composition, (name, middle)
    # Below the table: one example, then every task objective, regulariser and the weight step.
    first, *rest = parts.splitlines()
    assert "--set method.name=TASK+REG[+REG...][+wise]" in first and "--set method.name=flyp+cf-fd" in first
    listed = {line.split()[0]: line for line in rest if line.startswith("  ")}
    assert set(listed) == set(TASKS) | set(REGULARISERS) | {"wise"}
    for key, cls in {**TASKS, **REGULARISERS}.items():
        assert cls.description in listed[key]
    assert "(also written ft)" in listed["ce"] and "(also written flyp)" in listed["contrastive"]
    headings = [line for line in rest if not line.startswith("  ")]
    assert headings == ["task objectives (TASK):", "regularisers (REG):", "weight-space steps (last, optional):"]
    # The example is made of listed parts (checked without registering it: the registry is process-wide).
    head, *regs = "flyp+cf-fd".split("+")
    assert head in listed["contrastive"] and all(reg in listed for reg in regs)


def test_presets_lists_every_shipped_preset(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "presets")
    assert code == 0
    listed = out.split()
    assert listed == list_presets()
    assert "smoke" in listed
    for arch in ("b32", "b16", "l14"):
        assert f"paper-vit-{arch}-fd-refill" in listed and f"paper-vit-{arch}-ft" in listed


def test_config_prints_the_resolved_tree_with_overrides(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys, "config", "--config", "smoke", "--set", "optim.lr=1e-5", "--set",
                          "method.name=fd-refill", "--set", "method.masking=CtxMaskMultiFill(0.4)")
    assert code == 0, err
    printed = yaml.safe_load(out)
    expected = config_to_dict(build_config("smoke", ["optim.lr=1e-5", "method.name=fd-refill",
                                                     "method.masking=CtxMaskMultiFill(0.4)"]))
    assert printed == expected
    assert printed["optim"]["lr"] == 1e-5 and printed["method"]["name"] == "fd-refill"
    assert printed["model"]["name"] == "robustft-tiny"  # from the preset
    assert printed["optim"]["weight_decay"] == 0.1  # from the defaults


def test_config_of_every_preset_resolves(capsys: pytest.CaptureFixture[str]) -> None:
    for preset in list_presets():
        code, out, err = _run(capsys, "config", "-c", preset)
        assert code == 0, f"{preset}: {err}"
        assert yaml.safe_load(out) == config_to_dict(build_config(preset))


def test_paper_presets_name_their_method_and_model(capsys: pytest.CaptureFixture[str]) -> None:
    arch = {"b32": "ViT-B-32", "b16": "ViT-B-16", "l14": "ViT-L-14"}
    for preset in list_presets():
        if not preset.startswith("paper-vit-") or preset.count("-") < 3:
            continue
        cfg = build_config(preset)
        assert cfg.model.name == arch[preset.split("-")[2]], preset
        assert cfg.method.name in METHODS, preset
        assert cfg.model.pretrained == "openai", preset


def test_version_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "--version")
    assert code == 0 and out.strip() == f"robustft {__version__}"
    code, out, _ = _run(capsys, "--help")
    assert code == 0
    for command in ("train", "zeroshot", "eval", "wise", "report", "methods", "presets", "config", "datasets"):
        assert command in out


def test_every_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name in sub.choices:  # type: ignore[union-attr]
        code, out, _ = _run(capsys, name, "--help")
        assert code == 0 and out.startswith(f"usage: robustft {name}"), name


def test_usage_errors_are_one_line_with_exit_code_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys, "train", "--config", "smoke", "--out", "x", "--bogus")
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("robustft: error: unrecognized arguments: --bogus")
